"""The sans-I/O NBD connection: one state machine that observes both directions.

The machine does not care which role *we* play: every message, sent or received, goes through
``_process(sender, event, raw)``, which looks it up in the transition table (``_state``), checks it
against the rules that bind the *sender's* role (``_negotiation`` / ``_transmission``) and then moves
the state. A failed check on our own message raises ``LocalProtocolError`` (nothing is sent); on the
peer's message it becomes a ``Violation`` (fatal ones raise ``RemoteProtocolError``); ``_checker`` is
the one place where that conversion happens. ``_parse`` turns the peer's bytes into events.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from collections.abc import Callable

from . import _events as ev
from . import _wire as w
from ._buffer import ReceiveBuffer
from ._checker import _DATA_CAP, UNRECORDED, _Reply
from ._constants import (
    ClientFlag,
    Cmd,
    HandshakeFlag,
    Magic,
    Opt,
    ReplyType,
)
from ._errors import LocalProtocolError, ProtocolError, RemoteProtocolError, Violation
from ._negotiation import NegotiationRules
from ._parse import PAYLOAD_STEP, Parsers
from ._state import ACK_TRANSITIONS, CLIENT, NEED_DATA, SERVER, TRANSITIONS, Role, State, _NeedData
from ._strict import Strictness
from ._transcript import Transcript
from ._transmission import TransmissionRules

__all__ = ["ACK_TRANSITIONS", "NEED_DATA", "TRANSITIONS", "Connection", "Role", "State"]

# Module-level aliases: reading an enum member off its class costs several times a global lookup.
_ERROR, _CLOSED, _TLS_HANDSHAKE = State.ERROR, State.CLOSED, State.TLS_HANDSHAKE
_DISC = int(Cmd.DISC)
_NO_ZEROES, _C_NO_ZEROES = int(HandshakeFlag.NO_ZEROES), int(ClientFlag.NO_ZEROES)
_OFFSET_DATA = int(ReplyType.OFFSET_DATA)
_REQUEST_MAGICS = (Magic.REQUEST.to_bytes(4, "big"), Magic.EXTENDED_REQUEST.to_bytes(4, "big"))

# (state, sender, event class) -> next state, filled from TRANSITIONS as classes are first seen.
_TARGETS: dict[tuple[State, Role, type], State] = {}
# event class -> handler (or _NO_HANDLER), filled from Connection._HANDLERS the same way.
_HANDLER_CACHE: dict[type, object] = {}
_NO_HANDLER = object()
_SILENT = Transcript(enabled=False)  # what observe() records into: the decoding connection recorded it
_FAST_KINDS = (ev.Request, ev.SimpleReply, ev.OffsetData)  # encoded without an isinstance chain


def _target(state: State, sender: Role, kind: type) -> State | None:
    """Look ``kind`` (or its nearest base class) up in the transition table, and remember it."""
    row = TRANSITIONS.get((state, sender), {})
    for cls in kind.__mro__:
        if cls in row:
            _TARGETS[(state, sender, kind)] = row[cls]
            return row[cls]
    return None


def _handler(handlers: dict, kind: type) -> object:
    for cls in kind.__mro__:
        if cls in handlers:
            _HANDLER_CACHE[kind] = handlers[cls]
            return handlers[cls]
    _HANDLER_CACHE[kind] = _NO_HANDLER
    return _NO_HANDLER


class Connection(NegotiationRules, TransmissionRules, Parsers):
    """Shared implementation of ClientConnection / ServerConnection (see ``connection.py``)."""

    def __init__(
        self,
        role: Role,
        strictness: Strictness | None = None,
        transcript: Transcript | None = None,
        *,
        discard_payloads: bool = False,
    ) -> None:
        self.role = role
        # An observer (a proxy) forwards payloads and need not keep them: WRITE data of 64 KiB or more
        # and READ data are then counted past, not stored (events carry payload/data None).
        self.discard_payloads = discard_payloads
        self._discarding = False  # the sink in progress counts bytes past instead of storing them
        self._scratch: memoryview | None = None  # where get_buffer lets discarded bytes land
        self.peer = SERVER if role is CLIENT else CLIENT
        self.strictness = strictness or Strictness()
        self.transcript = transcript if transcript is not None else Transcript()
        self.violations: list[Violation] = []
        # Ids of the rules checked on the peer's messages, held or broken: what this connection really
        # observed of the peer (a suite's req marker claims no more; the coverage listing counts these).
        self.checked: set[str] = set()
        self._after_peer_write = False  # the peer's last request was a WRITE (see WR-002 in _on_request)
        self._state = State.GREETING
        self._buf = ReceiveBuffer()
        self._eof = False
        self._queue: deque[ev.Event] = deque()
        self._want = 0  # bytes the parser waits for (get_buffer sizehint)
        # Zero-copy sink: READ data landing in a caller's buffer, or a payload in a buffer of its own
        # that grows as the bytes arrive (_sink_grow, then the event's _sink_field).
        self._sink: memoryview | None = None
        self._sink_left = 0
        self._sink_total = 0
        self._sink_grow: bytearray | None = None
        self._sink_field = ""
        self._sink_event: ev.Event | None = None
        self._sink_handed = 0  # bytes of the sink the last get_buffer() handed out
        self._trailing = bytearray()
        # Negotiated state.
        self.handshake_flags: int | None = None
        self.client_flags: int | None = None
        self.oldstyle = False
        self.structured_replies = False
        self.extended_headers = False
        self.tls_negotiated = False
        self.meta_contexts: dict[int, str] = {}
        self.export_name: str | None = None
        self.export_size: int | None = None
        self._transmission_flags: int | None = None
        self._tx = 0  # transmission flags as a plain int (0 until known), for the per-request checks
        self._negotiated_key: tuple | None = None
        self._negotiated_cache = None
        self.block_size: tuple[int, int, int] | None = None
        self._block_size_requested = False
        # Option phase.
        self._pending: ev.Option | None = None
        self._pending_infos: list[ev.RepInfo] = []
        self._pending_contexts: dict[int, str] = {}
        self._sent_state_options: set[int] = set()
        self._meta_export: str | None = None
        # Transmission phase.
        self._inflight: dict[int, _Reply] = {}
        self._completed: deque[int] = deque(maxlen=256)  # recently completed cookies (SR-011)
        self._next_cookie = 1
        self._sender: Role = role
        # Where the ids of rules that held go for the message being processed: ``checked`` for the
        # peer's messages, nowhere for ours (set with ``_sender``; one C call per check on the hot path).
        self._record: Callable[[str], None] = UNRECORDED.add
        self._dir = role.value  # "C" or "S": transcript direction of what we send
        self._peer_dir = self.peer.value
        self._raw: bytes = b""
        self._found: list[Violation] = []
        self._fatal_ids: set[int] = set()
        self._sink_raw: tuple[int, bytes] = (0, b"")
        self._zeroes_suspect = ""  # requirement id if zero padding would break a rule right now
        self._shutdown_seen = False  # NBD_REP_ERR_SHUTDOWN / NBD_ESHUTDOWN received from the server
        self._last_info: tuple | None = None  # (name, info, RepInfoExport) of the last successful INFO
        self._options_since_info = 0
        self._last_reply_failed = False  # the last final option reply was a TLS failure (see _closed)
        self._parse_noted: set[tuple[str, str]] = set()  # parse-time breaches of the current message
        # We sent raw bytes or broke a mandatory rule: the peer's hard disconnect is then legitimate.
        self.local_breach = False
        # How the peer's TLS session ended before its EOF (peer_tls_eof): True = close_notify first,
        # False = a bare EOF under TLS, None = not told (no TLS, or a driver that cannot tell).
        self.peer_close_notify: bool | None = None

    # ------------------------------------------------------------------ read-only state
    @property
    def state(self) -> State:
        return self._state

    @property
    def transmission_flags(self) -> int | None:
        """Transmission flags of the export in use (a plain int), None before they are known."""
        return self._transmission_flags

    @transmission_flags.setter
    def transmission_flags(self, value: int | None) -> None:
        self._transmission_flags = None if value is None else int(value)
        self._tx = self._transmission_flags or 0

    @property
    def in_flight(self) -> dict[int, ev.Request]:
        return {c: r.request for c, r in self._inflight.items()}

    @property
    def trailing_data(self) -> bytes:
        """Bytes received after the STARTTLS ACK: they belong to the TLS layer."""
        return bytes(self._trailing)

    @property
    def no_zeroes(self) -> bool:
        """Both sides agreed to omit the 124 zero bytes after NBD_OPT_EXPORT_NAME."""
        return bool((self.handshake_flags or 0) & _NO_ZEROES and (self.client_flags or 0) & _C_NO_ZEROES)

    @property
    def buffered_bytes(self) -> int:
        """Bytes from the peer the connection holds for messages not yet delivered: the unread receive
        buffer plus a payload received so far (data landing in a caller's ``read_buffer`` is not ours).
        Drivers account memory with it."""
        n = len(self._buf)
        if self._sink_grow is not None:
            n += self._sink_total - self._sink_left
        return n

    @property
    def payload_length(self) -> int:
        """Length the peer declared for the payload being received into a buffer of ours (a WRITE's data
        of 64 KiB or more, OFFSET_DATA without ``read_buffer``); 0 when none.  Not yet allocated."""
        return self._sink_total if self._sink_grow is not None else 0

    @property
    def receiving(self) -> bool:
        """The peer has started a message it has not finished (a driver's stall timeout applies)."""
        return self._sink is not None or len(self._buf) > 0

    @property
    def pending_option(self) -> ev.Option | None:
        """The option whose final reply has not been seen yet."""
        return self._pending

    def next_cookie(self) -> int:
        """A cookie not in flight (CMD-001), for drivers that do not choose their own."""
        while self._next_cookie in self._inflight:
            self._next_cookie += 1
        c = self._next_cookie
        self._next_cookie = (c + 1) & 0xFFFFFFFFFFFFFFFF or 1
        return c

    # ------------------------------------------------------------------ the state machine
    def _next_state(self, sender: Role, e: ev.Event) -> State:
        kind = type(e)
        target = _TARGETS.get((self._state, sender, kind))
        if target is None:
            target = _target(self._state, sender, kind)
            if target is None:
                raise ProtocolError(
                    f"{kind.__name__} from the {sender.name.lower()} is not allowed in state {self._state.name}"
                )
        if kind is ev.RepAck and self._pending is not None:
            target = ACK_TRANSITIONS.get(self._pending.option, target)
        elif kind is ev.Request and e.command == _DISC:  # type: ignore[attr-defined]
            target = State.DISCONNECTING
        return target

    def _process(self, sender: Role, e: ev.Event, raw: bytes) -> None:
        """Check ``e`` against the rules binding ``sender`` and apply its effects."""
        self._sender, self._raw = sender, raw
        self._record = self.checked.add if sender is self.peer else UNRECORDED.add
        if self._found:
            self._found = []
        if self._fatal_ids:
            self._fatal_ids = set()
        try:
            target = self._next_state(sender, e)
        except ProtocolError as exc:
            if sender is self.role:
                raise LocalProtocolError(str(exc)) from None
            raise RemoteProtocolError(str(exc)) from None
        kind = type(e)
        handler = _HANDLER_CACHE.get(kind)
        if handler is None:
            handler = _handler(self._HANDLERS, kind)
        if handler is not _NO_HANDLER:
            handler(self, e)  # checks first (may raise LocalProtocolError), then effects
        if self._found:
            self._record_violations()
        if self._state is not _ERROR:
            self._state = target
        if target is _TLS_HANDSHAKE and len(self._buf):
            # Whatever follows the STARTTLS ACK belongs to the TLS layer, not to NBD.
            self._trailing += self._buf.take_all()

    _HANDLERS = {
        ev.NewstyleGreeting: NegotiationRules._on_newstyle,
        ev.OldstyleGreeting: NegotiationRules._on_oldstyle,
        ev.ClientFlags: NegotiationRules._on_client_flags,
        ev.Option: NegotiationRules._on_option,
        ev.OptionReply: NegotiationRules._on_option_reply,
        ev.ExportNameReply: NegotiationRules._on_export_name_reply,
        ev.Request: TransmissionRules._on_request,
        ev.SimpleReply: TransmissionRules._on_simple_reply,
        ev.Chunk: TransmissionRules._on_chunk,
    }

    # ------------------------------------------------------------------ sending
    def send(self, event: ev.Event) -> bytes:
        """Encode a message we send, check it against our role's rules and advance the state."""
        parts = self.send_iov(event)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def send_iov(self, event: ev.Event) -> list[bytes | memoryview]:
        """Like send(), but a WRITE / READ payload is returned as its own buffer (no copy)."""
        if self._state is _ERROR or self._state is _CLOSED:
            raise LocalProtocolError(f"cannot send {type(event).__name__} in state {self._state.name}")
        parts = self._encode(event)
        head = parts[0]
        self._process(self.role, event, head if len(head) <= _DATA_CAP else head[:_DATA_CAP])  # type: ignore[arg-type]
        if self.transcript.enabled:
            nbytes = len(head) + memoryview(parts[1]).nbytes if len(parts) > 1 else len(head)
            self.transcript.record(self._dir, self._as_sent(event), nbytes)
        return parts

    def _as_sent(self, e: ev.Event) -> ev.Event:
        """The event with its "as negotiated" fields resolved, so the transcript shows what went out."""
        if type(e) is ev.BlockStatus and e.extended is None:
            return dataclasses.replace(e, extended=self._extended_bs(e))
        if type(e) is ev.ExportNameReply and e.zeroes is None:
            return dataclasses.replace(e, zeroes=not self.no_zeroes)
        return e

    def observe(self, event: ev.Event) -> None:
        """Apply a message that *our* role's side sent, decoded by another connection (a proxy).

        A validating proxy runs a ServerConnection on the client's bytes and a ClientConnection on the
        server's; each is told what the other side sent, so both follow the same negotiation.  The
        message moves the state exactly as ``send`` would, but nothing is encoded or recorded here: the
        connection that decoded it already checked it and put it in its transcript (share one
        Transcript for a single C:/S: log).  Use a lenient Strictness (``check_local=False``): a breach
        found again here is the other side's, already a Violation over there; it only sets
        ``local_breach``, so this side's hang-up after it is legitimate (DISC-003 / DISC-017).
        """
        if self._state is _ERROR or self._state is _CLOSED:
            raise LocalProtocolError(f"cannot observe {type(event).__name__} in state {self._state.name}")
        transcript = self.transcript
        self.transcript = _SILENT
        try:
            self._process(self.role, event, b"")
        finally:
            self.transcript = transcript

    def send_raw(self, data: bytes) -> bytes:
        """Arbitrary bytes for fault injection: recorded as raw, the state does not move."""
        self.local_breach = True
        self.transcript.note(self.role.value, "raw", f"raw {len(data)} bytes {bytes(data[:16]).hex()}", len(data))
        return bytes(data)

    def _fixed_newstyle(self) -> bool:
        """Both sides set the fixed-newstyle bit (NBD_FLAG_FIXED_NEWSTYLE / NBD_FLAG_C_FIXED_NEWSTYLE)."""
        return bool((self.handshake_flags or 0) & 1 and (self.client_flags or 0) & 1)

    def answered_raw(self, cookie: int) -> None:
        """The reply to request ``cookie`` went out as raw bytes (``send_raw``, fault injection): the
        request is no longer in flight, so the peer is not held to rules about requests in flight
        (DISC-023, CMD-001) for it.  A no-op for a cookie not in flight."""
        if self._inflight.pop(cookie, None) is not None:
            self._completed.append(cookie)

    def _encode(self, e: ev.Event) -> list[bytes | memoryview]:
        kind = type(e)
        if kind not in _FAST_KINDS:  # a subclass of a hot-path event: encode it as its base
            kind = next((k for k in _FAST_KINDS if isinstance(e, k)), kind)
        if kind is ev.Request:
            payload = e.payload  # type: ignore[attr-defined]
            head = w.encode_request_header(e, self.extended_headers)  # type: ignore[arg-type]
            return [head, payload] if payload is not None and w.nbytes(payload) else [head]
        if kind is ev.SimpleReply:
            data = e.data  # type: ignore[attr-defined]
            head = w.encode_simple_reply_header(e.cookie, e.error)  # type: ignore[attr-defined]
            return [head, data] if data is not None and w.nbytes(data) else [head]
        if kind is ev.OffsetData:
            reply = self._inflight.get(e.cookie)  # type: ignore[attr-defined]
            data = e.data if e.data is not None else b""  # type: ignore[attr-defined]
            n = w.nbytes(data)
            head = w.encode_chunk_header(
                1 if e.done else 0,  # type: ignore[attr-defined]
                _OFFSET_DATA,
                e.cookie,  # type: ignore[attr-defined]
                n + 8,
                self.extended_headers,
                reply.request.offset if reply is not None else 0,
            ) + w.OFFSET.pack(e.offset)  # type: ignore[attr-defined]
            return [head, data] if n else [head]
        if isinstance(e, ev.Chunk):
            reply = self._inflight.get(e.cookie)
            hdr_offset = reply.request.offset if reply is not None else 0
            bs_ext = self._extended_bs(e)
            payload = w.chunk_payload(e, bs_ext)
            flags = 1 if e.done else 0  # NBD_REPLY_FLAG_DONE
            head = w.encode_chunk_header(
                flags, w.chunk_type(e, bs_ext), e.cookie, len(payload), self.extended_headers, hdr_offset
            )
            return [head + payload]
        if isinstance(e, ev.Option):
            return [w.encode_option(e)]
        if isinstance(e, ev.OptionReply):
            return [w.encode_option_reply(e)]
        if isinstance(e, ev.NewstyleGreeting):
            return [w.encode_newstyle_greeting(e)]
        if isinstance(e, ev.OldstyleGreeting):
            return [w.encode_oldstyle_greeting(e)]
        if isinstance(e, ev.ClientFlags):
            return [w.encode_client_flags(e)]
        if isinstance(e, ev.ExportNameReply):
            zeroes = (not self.no_zeroes) if e.zeroes is None else e.zeroes
            return [w.encode_export_name_reply(e, zeroes)]
        raise LocalProtocolError(f"{type(e).__name__} is not a message that can be sent")

    # ------------------------------------------------------------------ receiving
    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Bytes from the peer; ``b""`` means EOF."""
        if not data:
            self._eof = True
            return
        if self._eof:
            raise ProtocolError("receive_data after EOF")
        if type(data) is memoryview and data.itemsize != 1:
            data = data.cast("B")  # len() and slices below count bytes
        if self._state is _TLS_HANDSHAKE:
            self._trailing += data
            return
        if self._sink is not None and self._sink_left and not len(self._buf):
            n = min(len(data), self._sink_left)
            if not self._discarding:
                self._sink_room(n)[:n] = memoryview(data)[:n]
            self._sink_left -= n
            data = memoryview(data)[n:]
            if not data:
                return
        self._buf.feed(data)

    def get_buffer(self, sizehint: int = -1) -> memoryview:
        """Writable memory for the next bytes from the peer (``recv_into`` it, then buffer_updated).

        While the payload of a READ reply with a ``read_buffer`` is arriving, this is the right slice
        of that buffer, so the data lands in place; a payload received into a buffer of its own gets
        the free part of that buffer (grown by one step when full).  Otherwise the receive buffer
        reserves what the parser waits for, but never more than ``PAYLOAD_STEP`` ahead of the bytes
        already there: the length waited for may be the peer's word (a chunk header).
        """
        if self._sink is not None and self._sink_left and not len(self._buf):
            view = self._discard_room(sizehint) if self._discarding else self._sink_room(0, sizehint)
            self._sink_handed = len(view)
            return view
        self._sink_handed = 0
        need = max(sizehint, min(self._want - len(self._buf), PAYLOAD_STEP), 0)
        return self._buf.get_buffer(need or -1)

    def buffer_updated(self, nbytes: int) -> None:
        """``nbytes`` arrived in the memory returned by the last get_buffer(); 0 means EOF."""
        if nbytes == 0:
            self._eof = True
            return
        if self._sink_handed:
            if nbytes > self._sink_handed:
                raise ValueError("buffer_updated beyond the slice handed out")
            self._sink_handed -= nbytes
            self._sink_left -= nbytes
            return
        self._buf.buffer_updated(nbytes)
        if self._state is State.TLS_HANDSHAKE:
            self._trailing += self._buf.take_all()

    def tls_established(self) -> None:
        """The TLS handshake is done: negotiation restarts in OPTIONS over the TLS channel.

        "the server MUST forget all earlier negotiation state" (TLS-054, EXT-015).
        """
        if self._state is not State.TLS_HANDSHAKE:
            raise LocalProtocolError(f"tls_established() in state {self._state.name}")
        self._state = State.OPTIONS
        self.tls_negotiated = True
        self.structured_replies = self.extended_headers = False
        self.meta_contexts = {}
        self._meta_export = None
        self._sent_state_options.clear()
        self._trailing = bytearray()
        self._buf = ReceiveBuffer()

    def tls_first_bytes(self, data: bytes) -> None:
        """The first bytes the peer sent after the ACK to NBD_OPT_STARTTLS (a driver tells us, before its
        TLS layer reads them): "all further data MUST be sent and received over TLS" (TLS-014), so they
        must open a TLS record (content type 20-23, protocol major version 3)."""
        head = bytes(data[:_DATA_CAP])
        self._sender, self._raw = self.peer, head
        self._record = self.checked.add
        self._found, self._fatal_ids = [], set()
        ok = bool(head) and 20 <= head[0] <= 23 and (len(head) < 2 or head[1] == 3)
        what = ("NBD option magic (IHAVEOPT)" if head.startswith(b"IHAVEOPT") else
                "an NBD request magic" if head[:4] in _REQUEST_MAGICS else
                "not a TLS record")
        self._check(ok, "TLS-014", f"plaintext after the STARTTLS ACK, {what}: {head[:16].hex()}")
        if self._found:
            self._record_violations()

    def peer_tls_eof(self, close_notify: bool) -> None:
        """The peer's TLS session ended: with its close_notify (True) or by a bare EOF (False).  Call it
        before feeding the EOF; judged with the EOF (DISC-002 / DISC-016)."""
        self.peer_close_notify = close_notify

    def _tls_shutdown_first(self) -> None:
        """"A party initiating a hard disconnect while TLS is running should shut TLS down first": during
        haggling (DISC-002), in transmission (DISC-016).  After NBD_CMD_DISC (DISCONNECTING) or
        NBD_OPT_ABORT the disconnect is soft, and the TLS shutdown is the server's (DISC-015) or judged
        as DISC-001: not judged here."""
        if self.peer_close_notify is None or not self.tls_negotiated:
            return
        if self._state is State.OPTIONS:
            self._check(self.peer_close_notify, "DISC-002", "EOF during haggling without TLS close_notify")
        elif self._state is State.TRANSMISSION:
            self._check(self.peer_close_notify, "DISC-016", "EOF in transmission without TLS close_notify")

    def next_event(self) -> ev.Event | _NeedData:
        """The next event decoded from the peer's bytes, or NEED_DATA."""
        if self._queue:
            return self._queue.popleft()
        st = self._state
        if st is _ERROR:
            raise RemoteProtocolError("the connection is in state ERROR")
        if st is _CLOSED:
            return ev.ConnectionClosed()
        if st is _TLS_HANDSHAKE:
            if len(self._buf):
                self._trailing += self._buf.take_all()
            return self._closed() if self._eof else NEED_DATA
        try:
            e = self._parse_from_server() if self.role is CLIENT else self._parse_from_client()
        except w.WireError as exc:  # pragma: no cover - parsers convert these themselves
            raise self._fail(str(exc)) from None
        if e is NEED_DATA:
            if self._eof:
                return self._closed()
            return NEED_DATA
        return e

    def _closed(self) -> ev.Event:
        """EOF from the peer: check what it left unfinished, then close."""
        self._sender, self._raw = self.peer, self._buf.peek(_DATA_CAP)
        self._record = self.checked.add
        self._found, self._fatal_ids = [], set()
        if len(self._buf) or self._sink_left:
            self.transcript.note("!", "truncated", f"EOF inside a message ({len(self._buf)} bytes pending)")
        self._tls_shutdown_first()
        if self.local_breach:
            # "Either party may hard-disconnect on detecting a violation" by the other (DISC-003/017): a
            # close during haggling is then one the listed circumstances allow (DISC-006 held).
            if self._state is State.OPTIONS and self._fixed_newstyle():
                self._record("DISC-006")
        elif self.role is CLIENT and self._state in (State.TRANSMISSION, State.DISCONNECTING) and self._inflight:
            partial = [r for r in self._inflight.values() if r.chunks]
            if partial:
                # "NBD_REPLY_FLAG_DONE MUST be set on the final chunk" (SR-023)
                self._check(False, "SR-023", f"EOF before the final chunk of cookie {partial[0].request.cookie}")
            elif self._state is State.DISCONNECTING:
                # "the server MUST finish all outstanding requests" before closing (DISC-025)
                self._check(False, "DISC-025", f"EOF with {len(self._inflight)} requests unanswered")
            else:
                # "Neither side may disconnect in transmission phase except by NBD_CMD_DISC" (DISC-024)
                self._check(False, "DISC-024", f"EOF with {len(self._inflight)} requests in flight")
        elif self._state is State.DISCONNECTING:
            # The close came after NBD_CMD_DISC, every request answered: the disconnect rules held
            # (DISC-024 for either side; DISC-025, the server finishing its requests, when we are the client).
            self._record("DISC-024")
            if self.role is CLIENT:
                self._record("DISC-025")
        elif self._state is State.OPTIONS and not self._fixed_newstyle():
            # Plain newstyle knows no option but NBD_OPT_EXPORT_NAME and no NBD_OPT_ABORT: a server ends
            # the session on any other option, and a client that does not want to go on can only close
            # (the rules of "Termination of the session during option haggling" are fixed newstyle's).
            pass
        elif self.role is CLIENT and self._state is State.OPTIONS:
            # The server may close after an unsatisfiable NBD_OPT_EXPORT_NAME (OPT-001), NBD_OPT_ABORT
            # (OPT-014) or client flags it must refuse (HS-017); "No party may hard-disconnect during
            # haggling" otherwise (DISC-006).
            pending = self._pending.option if self._pending is not None else None
            if pending not in (Opt.EXPORT_NAME, Opt.ABORT) and not self._bad_client_flags():
                self._check(False, "DISC-006", f"server closed during option haggling (pending {pending})")
            else:
                self._record("DISC-006")    # a close the listed circumstances allow
        elif self.role is SERVER and self._state is State.OPTIONS and self._pending is None:
            # proto.md allows a client's hard disconnect "following a failed TLS negotiation" (DISC-005):
            # after an error reply to STARTTLS, or ERR_TLS_REQD (TLS-031/036/040/041). Otherwise "it MUST
            # NOT use a hard disconnect" (DISC-007), whatever other option failed.
            # DISC-006 ("no party may hard-disconnect during haggling ...") for the client is judged as
            # its client-side form, DISC-007; either way this close was held to it.
            if not self._last_reply_failed:
                # The breach is reported once, as DISC-007 (DISC-006 is not recorded as held).
                self._check(False, "DISC-007", "client closed during option haggling without NBD_OPT_ABORT")
            else:
                self._record("DISC-006")
                self._record("DISC-007")
        elif self.role is SERVER and self._state is State.TRANSMISSION:
            # "Neither side may disconnect in transmission phase except by NBD_CMD_DISC" (DISC-024)
            self._check(False, "DISC-024", "client closed without NBD_CMD_DISC")
        for v in self._found:
            self.violations.append(v)
            self.transcript.note("!", "violation", str(v), len(v.data))
        self._found = []
        self._state = State.CLOSED
        self.transcript.note(self.peer.value, "eof", "EOF")
        return ev.ConnectionClosed()

    # -- helpers for the parsers
