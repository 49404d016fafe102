"""One client connection: the reader loop, a small worker pool, and serialised replies.

Thread model (docs/design.md): the session thread reads and decodes; each request runs on a worker of a
per-connection pool, so replies can go out in any order; one lock keeps each reply's bytes together on
the wire and in the core's state.  The core (ServerConnection) is not thread-safe: every call into it
holds ``_core_lock``, which is never held during blocking I/O.
"""

from __future__ import annotations

import dataclasses
import logging
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

from .. import events as ev
from .._constants import DEFAULT_MAX_PAYLOAD, ClientFlag, Cmd, Err, HandshakeFlag, Magic, Opt, Rep
from .._errors import ProtocolError, RemoteProtocolError
from .._strict import Strictness
from .._transcript import Transcript
from ..backends import MemoryBackend
from ..connection import NEED_DATA, ServerConnection
from ..faults import Fault, ReplyContext
from ..personas import Persona
from ._commands import Executor, ReadShape
from ._config import Account, Budget, ConnectionRecord
from ._export import Export
from ._options import Negotiation, Outcome
from ._transport import TLSTransport, Transport

log = logging.getLogger("nbdref.server")

# Size hint of each read: what the receive buffer reserves (a connection that only says hello costs
# that much), and the first step of a payload buffer.  Payload buffers double up to 1 MiB steps.
_RECV_SIZE = 64 << 10
_RECV_MAX = 1 << 20  # at most this much is charged to the byte budget and read at once
TRANSCRIPT_MAX = 20000


class Disconnect(Exception):
    """End the connection now; the message is the reason recorded and logged."""


class Session:
    """Serve one connection until the client leaves, breaks the protocol, or the server stops."""

    def __init__(
        self,
        transport: Transport,
        record: ConnectionRecord,
        *,
        exports: Sequence[Export],
        persona: Persona,
        fault: Fault | None,
        tls_mode: str,
        tls_context: ssl.SSLContext | None,
        handshake_timeout: float | None,
        io_timeout: float,
        workers: int,
        read_shape: ReadShape,
        stopping: threading.Event,
        strictness: Strictness | None = None,
        transcript: bool = True,
        tls_handshake_timeout: float = 10.0,
        oldstyle: bool = False,
        mask_handshake: int = 0xFFFF,
        threads: Budget | None = None,
        account: Account | None = None,
        max_in_flight: int = 256,
    ) -> None:
        self.t = transport
        self.record = record
        self.persona = persona
        self.fault = fault
        self.tls_context = tls_context
        self.handshake_timeout = handshake_timeout
        self.io_timeout = io_timeout
        self.workers = workers
        self.read_shape = read_shape
        self.stopping = stopping
        # Client violations are recorded, never fatal by themselves: the server answers what it can with
        # the spec's error replies and disconnects only where the byte stream cannot be followed.
        local_ok = fault is None and not persona.info_size_zero and persona.abort_ack
        self.conn = ServerConnection(
            strictness=strictness or Strictness(fatal_levels=frozenset(), check_local=local_ok),
            # Capped (head and tail kept) so a long-lived connection cannot grow without bound.
            transcript=Transcript(max_entries=TRANSCRIPT_MAX, enabled=transcript),
        )
        self.nego = Negotiation(exports=exports, persona=persona, tls_mode=tls_mode)
        self._core_lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._seen_violations = 0
        self._handshake_bytes = 0
        self._fault_used = False
        self._fault_lock = threading.Lock()  # fault injection is test-and-set across the workers
        # Set when the client is gone (EOF, error, our own hang-up): a stall fault ends then, not only
        # when the server stops, so the connection's record completes.
        self._client_gone = threading.Event()
        self._in_handshake = True
        self._dead = threading.Event()
        self.tls_handshake_timeout = tls_handshake_timeout
        self.oldstyle = oldstyle
        self.mask_handshake = mask_handshake
        # The server's shares: worker threads (taken when the first request needs one) and bytes read
        # and not yet answered (see _recv).
        self.threads = threads
        self.account = account
        # Requests read and not yet answered: the reader takes a slot before reading each request and
        # waits while none is free (a client that pipelines without reading replies is held up by TCP).
        self.max_in_flight = max_in_flight
        self._slots = threading.BoundedSemaphore(max_in_flight)
        self._count_lock = threading.Lock()
        self.in_flight = 0
        self.in_flight_peak = 0
        # Server.shutdown (begin_shutdown): options get NBD_REP_ERR_SHUTDOWN, requests NBD_ESHUTDOWN, and
        # the connection closes once nothing is in flight.  A plain attribute: one check per request.
        self.closing = False
        self._in_recv = False  # the reader is (about to be) blocked reading: set per read, not per request

    def begin_shutdown(self) -> None:
        """The server is shutting down gracefully: "SHOULD error further options received (other than an
        NBD_OPT_ABORT) with NBD_REP_ERR_SHUTDOWN" (DISC-013); in transmission, finish what is in flight
        (DISC-018), answer later requests with NBD_ESHUTDOWN (DISC-020), then close, TLS first."""
        self.closing = True
        if not self._in_handshake:
            self._wake_if_idle()

    def _wake_if_idle(self) -> None:
        """Closing, and idle: the reader waits for bytes between messages and holds the only slot in use
        (no request unanswered).  Then end its wait: it reads EOF and the session closes.  Never earlier:
        a request that arrives meanwhile must still be read and answered (NBD_ESHUTDOWN)."""
        if not self._in_recv:
            return  # the reader checks again before its next read
        with self._count_lock:
            idle = self.in_flight <= 1
        if idle:
            with self._core_lock:
                idle = not self.conn.receiving
        if idle and not self.t.readable():  # what the client sent already is read and answered first
            self.t.shutdown_read()

    # ------------------------------------------------------------------ entry point

    def run(self) -> None:
        r = self.record
        try:
            export = self._handshake()
            if export is not None:
                r.export = export.name
                self._transmission(export)
        except Disconnect as e:
            r.reason = r.reason or str(e)
        except RemoteProtocolError as e:
            r.reason = r.reason or f"client broke the protocol: {e}"
        except ProtocolError as e:
            r.reason = r.reason or f"protocol error: {e}"
            r.error = e
        except TimeoutError:
            r.reason = r.reason or "socket operation timed out"
        except (ConnectionError, BrokenPipeError) as e:
            r.reason = r.reason or f"connection lost: {e.__class__.__name__}"
        except ssl.SSLError as e:
            r.reason = r.reason or f"TLS error: {e.reason or e}"
        except OSError as e:
            r.reason = r.reason or ("server stopping" if self.stopping.is_set() else f"OS error: {e}")
        except Exception as e:  # a bug of ours: record it, never take the server down
            log.exception("connection %d: internal error", r.id)
            r.reason = r.reason or f"internal error: {e!r}"
            r.error = e
        finally:
            self._dead.set()
            self._client_gone.set()
            self._collect_violations()
            r.tls = self.t.tls
            r.violations = list(getattr(self.conn, "violations", []))
            r.checked = set(getattr(self.conn, "checked", ()))
            r.transcript = getattr(self.conn, "transcript", None)
            if self.closing:
                self.t.discard_input()  # no TCP reset over replies the client has not read yet
            try:
                self.t.close()
            except OSError:
                pass
            if self.account is not None:
                self.account.close()
            log.info("connection %d from %s closed: %s", r.id, r.peer, r.reason or "?")
            r.ended.set()

    # ------------------------------------------------------------------ I/O helpers

    def _collect_violations(self) -> None:
        vs = getattr(self.conn, "violations", [])
        for v in vs[self._seen_violations :]:
            log.warning("connection %d: client violation %s", self.record.id, v)
        self._seen_violations = len(vs)

    def _recv(self, timeout: float | None) -> int:
        """Feed the core one read from the transport (b"" at EOF); the number of bytes read.

        With a byte budget, the read is charged before it happens (up to ``_RECV_MAX``, at least 64 KiB
        or what the core offers) and settled after: while the connection's share or the server's total
        is used up, it waits instead of reading (the client is held up by TCP), and raises TimeoutError
        after ``timeout`` like a silent socket.  A declared WRITE payload that could never fit is
        refused at once (BSZ-023: "either side MAY hard-disconnect" on a denial-of-service payload).
        """
        self.t.set_timeout(timeout)
        acct = self.account
        get_buffer = getattr(self.conn, "get_buffer", None)
        if get_buffer is not None:
            with self._core_lock:
                buf = get_buffer(_RECV_SIZE)
                declared = self.conn.payload_length
                in_core = self.conn.buffered_bytes
            if acct is not None:
                if declared > acct.max_payload:
                    raise Disconnect(f"WRITE payload of {declared} bytes exceeds the {acct.max_payload}-byte "
                                     "buffer budget of a connection")
                wait = 30.0 if timeout is None else timeout
                if declared and (acct.pledged or in_core):
                    # A payload is arriving (some of it is here; the read below lands in its own buffer):
                    # charge all of it once, then read the rest without charging each read.  Not before its
                    # first byte: a header whose data never comes must not hold the budget (a flood of
                    # such headers would otherwise lock every other client out, handshakes included).
                    if not acct.pledged and not acct.pledge(declared, in_core, wait, self.stopping):
                        if self.stopping.is_set():
                            raise Disconnect("server stopping")
                        raise TimeoutError("no room in the server's buffer budget")
                    buf = buf[:_RECV_MAX]
                else:
                    acct.settle(in_core)
                    want = min(len(buf), _RECV_MAX)
                    got = acct.reserve(want, min(want, _RECV_SIZE), wait, self.stopping)
                    if not got:
                        if self.stopping.is_set():
                            raise Disconnect("server stopping")
                        raise TimeoutError("no room in the server's buffer budget")
                    buf = buf[:got]
            try:
                n = self.t.recv_into(buf)
                # Any EOF while closing is taken for our own shutdown_read: a client that hard-disconnects
                # during the grace is then not judged (DISC-024 / DISC-016).  Acceptable: the two EOFs look
                # alike on the socket, and charging our own wake-up to a correct client would be worse; a
                # client's disconnect is judged on every connection that is not being shut down.
                if not n and self.closing and not self._in_handshake:  # our own shutdown_read
                    raise Disconnect("server shut down: nothing left in flight")
                with self._core_lock:
                    if n:
                        self.conn.buffer_updated(n)
                    else:
                        self.conn.receive_data(b"")
            finally:
                if acct is not None:
                    with self._core_lock:
                        in_core = self.conn.buffered_bytes
                    acct.settle(in_core)
            return n
        data = bytearray(_RECV_SIZE)
        n = self.t.recv_into(memoryview(data))
        if not n and self.closing and not self._in_handshake:  # likewise: a client's EOF here is not judged
            raise Disconnect("server shut down: nothing left in flight")
        with self._core_lock:
            self.conn.receive_data(bytes(data[:n]))
        return n

    def _next_event(self, deadline: float | None) -> ev.Event:
        while True:
            try:
                with self._core_lock:
                    e = self.conn.next_event()
            finally:
                self._collect_violations()
            if e is not NEED_DATA:
                return e
            if self.stopping.is_set():
                raise Disconnect("server stopping")
            if deadline is None:
                timeout: float | None = self.io_timeout
            else:
                timeout = deadline - time.monotonic()
                if timeout <= 0:
                    raise Disconnect(f"handshake not finished within {self.handshake_timeout} s")
                timeout = min(timeout, self.io_timeout)
            self._in_recv = True
            if self.closing and not self._in_handshake:
                self._wake_if_idle()  # (begin_shutdown may have found the reader busy)
            try:
                self._recv(timeout)
            except TimeoutError:
                if deadline is None:
                    with self._core_lock:
                        stalled = self.conn.receiving
                    if stalled:
                        # Inside a message nothing moved for io_timeout (the client stopped sending, or
                        # the buffer budget stayed full): what this connection holds goes back.
                        raise Disconnect(f"no progress inside a message for {self.io_timeout} s") from None
                    continue  # an idle client in transmission is fine (stop() wakes us with a shutdown)
                if time.monotonic() < deadline:
                    continue
                raise Disconnect(f"handshake not finished within {self.handshake_timeout} s") from None
            finally:
                self._in_recv = False

    def _next_message(self, deadline: float | None, eof_reason: str) -> ev.Event:
        """The next message from the client: StartTLS (the core's pause marker) is skipped, and EOF
        ends the session with ``eof_reason``."""
        while True:
            e = self._next_event(deadline)
            if isinstance(e, ev.ConnectionClosed):
                raise Disconnect(eof_reason)
            if not isinstance(e, ev.StartTLS):
                return e

    def _send(self, events: Sequence[ev.Event], edit: Callable[[bytes], bytes] | None = None) -> None:
        """Encode ``events`` through the core and write them as one unit; ``edit`` rewrites the bytes
        (faults: the core records what should have been sent, the wire carries the edited bytes)."""
        with self._write_lock:
            iov: list = []
            with self._core_lock:
                for e in events:
                    iov.extend(self.conn.send_iov(e))
            if edit is not None:
                iov = [edit(b"".join(bytes(b) for b in iov))]
            self._write(iov)

    def _send_raw(self, data: bytes, *, answers: int | None = None) -> None:
        """Send bytes the core did not build.  ``answers``: the cookie they reply to, marked answered in
        the core before the bytes leave: once they are out the client may go on at once (NBD_CMD_DISC),
        and the reader must not see that request still in flight (a false DISC-023)."""
        with self._write_lock:
            with self._core_lock:
                out = self.conn.send_raw(data)
                if answers is not None:
                    self.conn.answered_raw(answers)   # that was its reply, however broken
            self._write([out if out is not None else data])

    def _fault_applied(self) -> None:
        """A fault is about to break the protocol: from now on the client's hang-up is legitimate
        (DISC-003/017), so the core must not charge it with DISC-006/007/024."""
        with self._core_lock:
            self.conn.local_breach = True

    def _stall(self, seconds: float, *, read: bool) -> str:
        """Say nothing for ``seconds``; ends early when the server stops or the client leaves.  ``read``:
        this is the reader thread (handshake), so watch the socket for EOF here (what the client sends
        meanwhile still goes to the core, for the transcript)."""
        deadline = time.monotonic() + seconds
        while True:
            if self.stopping.is_set():
                return "the server stopped"
            if self._client_gone.is_set():
                return "the client closed the connection"
            left = deadline - time.monotonic()
            if left <= 0:
                return f"{seconds:g} s passed"
            if not read:
                self._client_gone.wait(min(left, 0.1))
                continue
            try:
                if self._recv(min(left, 0.1)) == 0:
                    self._client_gone.set()
            except TimeoutError:
                continue
            except OSError:  # reset, or stop() shut the socket down
                self._client_gone.set()

    def _write(self, iov: list) -> None:
        cut = self.fault.cut_handshake_at if self.fault and self._in_handshake else None
        if cut is not None:
            size = sum(len(b) for b in iov)
            if self._handshake_bytes + size >= cut:
                self._fault_applied()
                joined = b"".join(bytes(b) for b in iov)[: cut - self._handshake_bytes]
                self.t.send([joined])
                raise Disconnect(f"fault {self.fault.spec}: cut after {cut} handshake bytes")  # type: ignore[union-attr]
            self._handshake_bytes += size
        self.t.send(iov)

    # ------------------------------------------------------------------ handshake

    def _oldstyle(self) -> Export:
        """Oldstyle: the greeting carries size and flags of the one export; no options, no TLS."""
        export = self.nego.exports[0]
        self._send([ev.OldstyleGreeting(export_size=export.size,
                                        transmission_flags=self.nego.transmission_flags(export))])
        self._in_handshake = False
        return export

    def _handshake(self) -> Export | None:
        if self.oldstyle:
            return self._oldstyle()
        deadline = None if not self.handshake_timeout else time.monotonic() + self.handshake_timeout
        flags = 0
        if self.persona.fixed_newstyle:
            flags |= HandshakeFlag.FIXED_NEWSTYLE
        if self.persona.no_zeroes:
            flags |= HandshakeFlag.NO_ZEROES
        flags &= self.mask_handshake  # like nbdkit --mask-handshake: test clients' fallbacks
        if self.fault and self.fault.greeting_flags:
            self._fault_applied()
            flags |= self.fault.greeting_flags  # undefined bits: the client must ignore them (HS-005)
        greeting = ev.NewstyleGreeting(flags=flags)
        if self.fault and self.fault.greeting_magic is not None:
            self._fault_applied()
            with self._core_lock:
                self.conn.send(greeting)  # keep the core's state right; put other bytes on the wire
            magic = self.fault.greeting_magic.to_bytes(8, "big")
            self._write([magic + Magic.IHAVEOPT.to_bytes(8, "big") + flags.to_bytes(2, "big")])
        else:
            self._send([greeting])
        if self.fault and self.fault.stall_handshake:
            self._fault_applied()
            why = self._stall(self.fault.stall_seconds, read=True)
            raise Disconnect(f"fault {self.fault.spec}: stalled the handshake until {why}")
        while True:
            e = self._next_message(deadline, "client closed the connection during the handshake")
            if isinstance(e, ev.ClientFlags):
                # "The server MUST operate in NOTLS mode unless the server set flag NBD_FLAG_FIXED_NEWSTYLE
                # and the client replied with NBD_FLAG_C_FIXED_NEWSTYLE".
                self.nego.fixed_newstyle = bool(e.flags & 1) and bool(flags & HandshakeFlag.FIXED_NEWSTYLE)
                if e.flags & ~3:
                    # Clients "MUST NOT set any other flags" (HS-016, recorded by the core); a server
                    # that does not understand them cannot know what the client expects: hang up.
                    raise Disconnect(f"unknown client flags {e.flags:#x}")
                if e.flags & ClientFlag.NO_ZEROES and not flags & HandshakeFlag.NO_ZEROES:
                    # NBD_FLAG_C_NO_ZEROES "MUST NOT be set if the server did not set NBD_FLAG_NO_ZEROES";
                    # "the server MUST close the TCP connection if it does not recognize the client's flags".
                    raise Disconnect("client set NBD_FLAG_C_NO_ZEROES, which was not offered")
                if not self.nego.fixed_newstyle and self.nego.tls_mode == "require":
                    raise Disconnect("client cannot do fixed newstyle, and TLS is required")
                continue
            if not isinstance(e, ev.Option):
                raise Disconnect(f"unexpected {type(e).__name__} during the handshake")
            if not self.nego.fixed_newstyle and e.option != 1:
                # Without fixed newstyle the server cannot reply to other options: it can only hang up.
                raise Disconnect(f"option {e.option} without fixed newstyle")
            if self.closing and e.option != Opt.ABORT:
                self._refuse_option_shutdown(e)
                continue
            outcome = self._option_fault(e) or self.nego.handle(e)
            if self.fault and self.fault.transmission_flags:
                outcome.replies = [self._with_tx_flags(r) for r in outcome.replies]
            if self.fault and (self.fault.unknown_info is not None or self.fault.reverse_info):
                outcome.replies = self._info_fault(e.option, outcome.replies)
            if self.fault and self.fault.context_ids:
                outcome.replies = self._context_id_fault(e.option, outcome.replies)
            if outcome.replies:
                # The ACK to STARTTLS is spared: over TLS the wrong magic then hits the haggling inside
                # TLS (the client's hard disconnect there is judged by DISC-002), not the plaintext part.
                mangle = (self.fault is not None and self.fault.option_reply_magic is not None
                          and e.option != Opt.STARTTLS)
                if mangle:
                    self._fault_applied()
                self._send(outcome.replies, self._mangle_option_replies if mangle else None)
            if outcome.close:
                if e.option == Opt.ABORT and outcome.replies:
                    self._watch_close_after_abort()
                raise Disconnect(outcome.close)
            if outcome.starttls:
                self._start_tls()
            if outcome.go is not None:
                self._in_handshake = False
                return outcome.go

    def _refuse_option_shutdown(self, opt: ev.Option) -> None:
        """An option while the server shuts down: NBD_REP_ERR_SHUTDOWN (DISC-013); NBD_OPT_EXPORT_NAME
        has no error reply, so that client is hung up on."""
        if opt.option == Opt.EXPORT_NAME:
            raise Disconnect("server shutting down: NBD_OPT_EXPORT_NAME cannot be refused")
        self._send([ev.RepError(option=opt.option, reply_type=Rep.ERR_SHUTDOWN, message="server shutting down")])

    def _option_fault(self, opt: ev.Option) -> Outcome | None:
        """Fault ``option_error``: the first option (not STARTTLS, ABORT or EXPORT_NAME, which has no
        error reply) gets that error instead of its answer; the negotiation goes on."""
        f = self.fault
        if f is None or f.option_error is None or self._fault_used or opt.option in (Opt.STARTTLS, Opt.ABORT,
                                                                                      Opt.EXPORT_NAME):
            return None
        self._fault_used = True
        self._fault_applied()
        return Outcome([ev.RepError(option=opt.option, reply_type=f.option_error, message=f"fault {f.spec}")])

    def _info_fault(self, option: int, replies: list[ev.Event]) -> list[ev.Event]:
        """Faults ``unknown_info`` / ``reverse_info`` on an INFO/GO answer: what a future or merely
        different server may legally send (no local breach: a client that hangs up is charged)."""
        infos = [r for r in replies if isinstance(r, ev.RepInfo)]
        if not infos:
            return replies
        rest = [r for r in replies if not isinstance(r, ev.RepInfo)]
        if self.fault.reverse_info:  # type: ignore[union-attr]
            infos.reverse()
        if self.fault.unknown_info is not None:  # type: ignore[union-attr]
            infos.insert(0, ev.RepInfoUnknown(option=option, info_type=self.fault.unknown_info,  # type: ignore[union-attr]
                                              data=b"\0\0\0\0"))
        return infos + rest

    def _context_id_fault(self, option: int, replies: list[ev.Event]) -> list[ev.Event]:
        """Fault ``context_ids``: LIST_META_CONTEXT replies carry nonzero IDs (which a client must
        disregard, BS-042); SET_META_CONTEXT IDs start at 1000 + 17 x the connection's number, so no two
        connections share them (BS-052).  The negotiation's map follows, so BLOCK_STATUS uses them."""
        if option == Opt.LIST_META_CONTEXT:
            self._fault_applied()  # "The metadata context ID in these replies is reserved and SHOULD be set to zero"
            return [dataclasses.replace(r, context_id=0x7000 + i) if isinstance(r, ev.RepMetaContext) else r
                    for i, r in enumerate(replies)]
        if option != Opt.SET_META_CONTEXT:
            return replies
        shift = 1000 + 17 * self.record.id
        self.nego.contexts = {cid + shift: name for cid, name in self.nego.contexts.items()}
        return [dataclasses.replace(r, context_id=r.context_id + shift) if isinstance(r, ev.RepMetaContext) else r
                for r in replies]

    def _shape_block_status(self, req: ev.Request, events: list[ev.Event]) -> list[ev.Event]:
        """Faults ``status_bits`` / ``split_extents`` on a BLOCK_STATUS answer (base:allocation only for
        the bits, every context for the split)."""
        f = self.fault
        if f is None or req.command != Cmd.BLOCK_STATUS or not (f.status_bits or f.split_extents):
            return events
        from .._constants import CONTEXT_BASE_ALLOCATION
        out: list[ev.Event] = []
        for e in events:
            if isinstance(e, ev.BlockStatus):
                extents = list(e.extents)
                if f.status_bits and self.nego.contexts.get(e.context_id) == CONTEXT_BASE_ALLOCATION:
                    self._fault_applied()  # "Servers SHOULD set [the reserved bits] to all-zero"
                    extents = [(n, flags | f.status_bits) for n, flags in extents]
                if f.split_extents:
                    extents = [part for n, flags in extents
                               for part in (((n // 2, flags), (n - n // 2, flags)) if n >= 2 else ((n, flags),))]
                e = dataclasses.replace(e, extents=tuple(extents))
            out.append(e)
        return out

    def _with_tx_flags(self, reply: ev.Event) -> ev.Event:
        """Fault ``transmission_flags``: undefined bits in the export's flags (CMD-013)."""
        if isinstance(reply, (ev.RepInfoExport, ev.ExportNameReply)):
            self._fault_applied()
            return dataclasses.replace(reply, transmission_flags=reply.transmission_flags
                                       | self.fault.transmission_flags)  # type: ignore[union-attr]
        return reply

    def _watch_close_after_abort(self, seconds: float = 1.0) -> None:
        """After the ACK to NBD_OPT_ABORT "the client shut[s] down TLS (if it is running), and ... drop[s]
        the connection" (DISC-001): wait up to ``seconds`` for that and record what came."""
        deadline = time.monotonic() + seconds
        how = "open"
        try:
            while time.monotonic() < deadline:
                n = self._recv(max(0.05, deadline - time.monotonic()))
                if n:
                    how = "data"
                    continue
                end = "close_notify" if getattr(self.t, "close_notify", False) else "eof"
                how = f"data, then {end}" if how == "data" else end
                break
        except TimeoutError:
            pass
        except OSError:
            how = "eof"
        self.record.after_abort = how

    def _mangle_option_replies(self, data: bytes) -> bytes:
        magic: int = self.fault.option_reply_magic  # type: ignore[union-attr,assignment]
        return data.replace(Magic.OPT_REPLY.to_bytes(8, "big"), magic.to_bytes(8, "big"))

    def _start_tls(self) -> None:
        # The core pauses after the ACK (next_event() gives StartTLS, then NEED_DATA) until
        # tls_established(); bytes it already holds belong to the TLS layer.
        if self.tls_context is None:
            raise Disconnect("STARTTLS acknowledged without a TLS context")
        with self._core_lock:
            trailing = bytes(getattr(self.conn, "trailing_data", b"") or b"")
        # A correct client sends nothing between STARTTLS and the ACK (the core records the breach);
        # whatever came early is handed to TLS rather than dropped.
        self.t = TLSTransport(self.t, self.tls_context, timeout=self.tls_handshake_timeout, initial=trailing,
                              on_first=self._tls_first_bytes, on_eof=self._tls_eof)
        with self._core_lock:
            self.conn.tls_established()
        self.nego.tls_started()
        self.record.tls = True
        self.record.tls_version = self.t.version  # type: ignore[attr-defined]

    def _tls_first_bytes(self, data: bytes) -> None:
        """The client's first bytes after the STARTTLS ACK, for the core's TLS-014 check."""
        with self._core_lock:
            self.conn.tls_first_bytes(data)

    def _tls_eof(self, close_notify: bool) -> None:
        """How the client's TLS session ended (DISC-002 / DISC-016); not when our own stop made the EOF
        (nor our shutdown_read of a graceful shutdown: ``closing``)."""
        if not self.stopping.is_set() and not self.closing:
            with self._core_lock:
                self.conn.peer_tls_eof(close_notify)

    # ------------------------------------------------------------------ transmission

    def _transmission(self, export: Export) -> None:
        self.t.set_timeout(self.io_timeout)
        executor = Executor(export, self.nego, self.read_shape, refusals=self._refusals)
        pool: ThreadPoolExecutor | None = None  # made when the first request needs a worker
        taken = 0  # worker threads taken from the server's thread budget
        inline_reads = isinstance(export.backend, MemoryBackend)
        try:
            while True:
                self._take_slot()
                e = self._next_message(None, "client closed the connection (hard disconnect)")
                if not isinstance(e, ev.Request):
                    raise Disconnect(f"unexpected {type(e).__name__} in transmission")
                self.record.requests += 1
                self.record.timeline.append((time.monotonic_ns(), "C", e.command, e.cookie))
                if e.command == Cmd.DISC:
                    # "The server MUST handle all outstanding requests, shut down the TLS session (if one
                    # is running), and close the TCP session."
                    if pool is not None:
                        pool.shutdown(wait=True)
                    raise Disconnect("client sent NBD_CMD_DISC")
                held = self._hold(e)
                if self.closing:
                    self._refuse_shutdown(executor, e, held)
                    continue
                inline = inline_reads and e.command == Cmd.READ and not self.fault
                if self.workers > 0 and pool is None and not inline:
                    taken, pool = self._worker_pool()
                if pool is None or inline:
                    # RAM reads never block: answering on the reader thread saves two thread switches.
                    # Without a worker (workers=0, or none left in the server's budget) every request
                    # is answered here.
                    self._serve_held(executor, e, held)
                else:
                    pool.submit(self._serve_held, executor, e, held)
        finally:
            self._client_gone.set()  # before the join: a stalled worker must not keep the pool alive
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=False)
            if taken and self.threads is not None:
                self.threads.give(taken)

    def _take_slot(self) -> None:
        """Wait for an in-flight slot before reading the next request; its reply gives it back."""
        while not self._slots.acquire(timeout=0.25):
            if self.stopping.is_set():
                raise Disconnect("server stopping")
            if self._dead.is_set():
                raise Disconnect(self.record.reason or "connection failed")
        with self._count_lock:
            self.in_flight += 1
            self.in_flight_peak = max(self.in_flight_peak, self.in_flight)

    def _give_slot(self) -> None:
        with self._count_lock:
            self.in_flight -= 1
        self._slots.release()
        if self.closing:  # after the decrement: begin_shutdown reads the count under the same lock
            self._wake_if_idle()

    def _refuse_shutdown(self, executor: Executor, req: ev.Request, held: int) -> None:
        """A request read while the server shuts down: "The error value issued in respect of ... any
        subsequently received requests SHOULD be NBD_ESHUTDOWN" (DISC-020); answered on the reader."""
        try:
            self._send(executor.error_reply(req, Err.ESHUTDOWN, "server shutting down"))
            self.record.timeline.append((time.monotonic_ns(), "S", req.command, req.cookie))
        finally:
            if held:
                self.account.done(held)  # type: ignore[union-attr]
            self._give_slot()

    def _worker_pool(self) -> tuple[int, ThreadPoolExecutor | None]:
        """Up to ``workers`` threads of what the server's thread budget has left (none: answer inline).

        Taken at the first request that needs one, not at GO: a connection that never completes a
        request (an idle or hostile client) holds no worker threads."""
        n = self.workers if self.threads is None else self.threads.take(self.workers, minimum=0)
        if n <= 0:
            return 0, None
        return n, ThreadPoolExecutor(max_workers=n, thread_name_prefix=f"nbdref-c{self.record.id}")

    def _hold(self, req: ev.Request) -> int:
        """A request's payload stays charged to the byte budget until its reply is sent."""
        if self.account is None:
            return 0
        n = len(req.payload) if req.payload is not None else 0
        self.account.queue(n)  # also ends the payload's pledge, even when the core kept no payload
        return n

    def _serve_held(self, executor: Executor, req: ev.Request, held: int) -> None:
        try:
            self._serve(executor, req)
        finally:
            if held:
                self.account.done(held)  # type: ignore[union-attr]
            self._give_slot()

    def _refusals(self, req: ev.Request) -> list[tuple[str, int | None]]:
        """The core's "which error does a correct server owe" table, for the executor's workers."""
        with self._core_lock:
            return self.conn.refusals(req)

    def _serve(self, executor: Executor, req: ev.Request) -> None:
        if self._dead.is_set():
            return
        try:
            if self.fault and not self._fault_used and self.fault.applies(req.command, executor.structured):
                with self._fault_lock:
                    mine, self._fault_used = not self._fault_used, True
                if mine and self._inject(executor, req):
                    return
            self._send(self._shape_block_status(req, executor.execute(req)))
            self.record.timeline.append((time.monotonic_ns(), "S", req.command, req.cookie))
        except Disconnect as e:
            self.record.reason = self.record.reason or str(e)  # the first reason is the real one
            self._dead.set()
            self.t.shutdown()
        except Exception as e:  # a worker must never die silently
            if not self._dead.is_set():
                log.warning("connection %d: reply to cookie %d failed: %r", self.record.id, req.cookie, e)
                self.record.reason = self.record.reason or f"reply failed: {e!r}"
                self._dead.set()
                self.t.shutdown()

    def _inject(self, executor: Executor, req: ev.Request) -> bool:
        """Apply the fault to this request; True when it replaced the normal reply."""
        f = self.fault
        assert f is not None
        if f.stall_reply:
            self._fault_applied()
            why = self._stall(f.stall_seconds, read=False)
            raise Disconnect(f"fault {f.spec}: stalled the reply until {why}")
        if f.reply_error is not None:
            self._fault_applied()
            self._send(executor.error_reply(req, f.reply_error, f"fault {f.spec}"))
            return True
        if f.cut_reply_at is not None:
            self._fault_applied()
            cut = f.cut_reply_at
            self._send(executor.execute(req), lambda data: data[:cut])
            raise Disconnect(f"fault {f.spec}: cut after {f.cut_reply_at} reply bytes")
        data = b""
        if (req.command == Cmd.READ and req.length <= DEFAULT_MAX_PAYLOAD
                and req.offset + req.length <= executor.export.size):
            data = bytes(executor.export.backend.pread(req.offset, req.length))
        ctx = ReplyContext(cookie=req.cookie, command=req.command, offset=req.offset, length=req.length,
                           structured=executor.nego.structured, extended=executor.nego.extended, data=data)
        raw = f.reply_bytes(ctx)
        if raw is None:
            return False
        self._send_raw(raw, answers=req.cookie)  # the core's send_raw marks the local breach
        return True
