"""The listener: accept connections and run a Session per connection in its own thread."""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import socket
import ssl
import threading
import time
from collections.abc import Sequence

from .. import faults as faults_mod
from .. import personas as personas_mod
from .._strict import Strictness
from ..faults import Fault
from ..personas import Persona
from ._commands import ReadShape
from ._config import Account, Budget, ConnectionRecord, TLSConfig
from ._export import Export
from ._listen import describe_peer, listen_tcp, listen_unix, uri_for
from ._session import Session
from ._transport import SocketTransport, Transport

log = logging.getLogger("nbdref.server")

DEFAULT_HANDSHAKE_TIMEOUT = 60.0
# Caps against clients that hold resources (defaults of Server and of ``serve``; see docs/design.md).
DEFAULT_MAX_CONNECTIONS = 128
DEFAULT_MAX_THREADS = 512  # connection threads (one each) + their workers
DEFAULT_MAX_BUFFER = 512 << 20  # bytes read from clients and not yet answered, all connections
DEFAULT_MAX_CONNECTION_BUFFER = 128 << 20  # the same for one connection (4 WRITEs of 2^25 in flight)
DEFAULT_MAX_REQUESTS_IN_FLIGHT = 256  # requests read and not yet answered, per connection
_REFUSAL_LOG_INTERVAL = 5.0
DEFAULT_SHUTDOWN_GRACE = 5.0  # seconds shutdown() gives connections to finish before stop() hangs up


class Server:
    """The reference NBD server.

    ``Server(exports=[Export.memory("exp", 1 << 20)], unix=path)``; ``start()`` serves from a background
    thread (for fixtures), ``serve_forever()`` from the caller's; ``stop()`` ends everything
    (``shutdown(grace)`` gracefully).  Every connection leaves a ``ConnectionRecord`` in ``records`` (violations, transcript, reason), complete once
    its ``ended`` event is set: ``wait_closed()`` waits for all of them.

    Caps: at most ``max_connections`` connections and ``max_threads`` threads (each connection's own,
    plus its workers, taken from what is left when its first request needs one); connections beyond
    them are closed at once (``refused`` counts them).  ``max_buffer`` / ``max_connection_buffer``
    bound the bytes read from clients and not yet answered (see ``Account``); a connection reads no
    new request while ``max_requests_in_flight`` of its requests are unanswered.
    """

    def __init__(
        self,
        exports: Export | Sequence[Export],
        *,
        persona: Persona | str | None = None,
        fault: Fault | str | None = None,
        tls: TLSConfig | None = None,
        unix: str | os.PathLike[str] | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        sockets: Sequence[socket.socket] = (),
        handshake_timeout: float | None = 0,
        io_timeout: float = 30.0,
        workers: int = 4,
        read_chunk_size: int = 0,
        reverse_chunks: bool = False,
        strictness: Strictness | None = None,
        transcript: bool = True,
        max_records: int | None = None,
        oldstyle: bool = False,
        mask_handshake: int = 0xFFFF,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        max_threads: int = DEFAULT_MAX_THREADS,
        max_buffer: int = DEFAULT_MAX_BUFFER,
        max_connection_buffer: int = DEFAULT_MAX_CONNECTION_BUFFER,
        max_requests_in_flight: int = DEFAULT_MAX_REQUESTS_IN_FLIGHT,
    ) -> None:
        self.exports: list[Export] = [exports] if isinstance(exports, Export) else list(exports)
        if not self.exports:
            raise ValueError("a server needs at least one export")
        # Oldstyle has no option haggling: one export, no name, no TLS ("oldstyle negotiation").
        if oldstyle and len(self.exports) != 1:
            raise ValueError("an oldstyle server serves exactly one export")
        if oldstyle and tls is not None and tls.mode != "off":
            raise ValueError("oldstyle negotiation cannot do TLS")
        self.oldstyle = oldstyle
        self.mask_handshake = mask_handshake
        if min(max_connection_buffer, max_buffer) < 1 << 20:
            raise ValueError("buffer budgets must be at least 1 MiB (one read of a payload)")
        self.connection_slots = Budget(max_connections)
        self.thread_slots = Budget(max_threads)
        self.buffer_budget = Budget(max_buffer)
        self.max_connection_buffer = max_connection_buffer
        if max_requests_in_flight < 1:
            raise ValueError(f"max_requests_in_flight must be positive, not {max_requests_in_flight}")
        self.max_requests_in_flight = max_requests_in_flight
        self.refused = 0  # connections closed at once because a cap was reached
        self._refusal_logged = 0.0
        self.persona = personas_mod.get(persona)
        self.fault = faults_mod.get(fault)
        self.tls = tls or TLSConfig()
        self._tls_context: ssl.SSLContext | None = self.tls.context()
        if self.tls.mode != "off" and (
            (self.tls.psk_file and not self.persona.tls_psk) or (self.tls.certificates and not self.persona.tls_x509)
        ):
            log.warning("persona %s did not offer this kind of TLS; serving it anyway", self.persona.name)
        # 0: the persona's limit (qemu >= 9.1: 10 s) or 60 s; None: no limit; > 0: that many seconds.
        self.handshake_timeout = handshake_timeout
        self.io_timeout = io_timeout
        self.workers = workers
        self.read_shape = ReadShape(chunk_size=read_chunk_size, reverse=reverse_chunks)
        self.strictness = strictness
        self.transcript = transcript
        self.records: list[ConnectionRecord] = []
        self.max_records = max_records  # None: keep every record (tests); the CLI keeps the last few
        self._ids = itertools.count(1)
        self._stopping = threading.Event()
        self._draining = False  # shutdown() began: no new connections, sessions wind down
        self._drainer: threading.Thread | None = None
        self._listeners_closed = False
        self._threads: list[threading.Thread] = []
        self._sessions: dict[int, Session] = {}
        self._lock = threading.Lock()
        self._accept_threads: list[threading.Thread] = []
        if sockets:
            self._listeners = list(sockets)
        elif unix is not None:
            self._listeners = [listen_unix(os.fspath(unix))]
        else:
            self._listeners = [listen_tcp(host, port)]
        self._unix_path = os.fspath(unix) if unix is not None else None

    # ------------------------------------------------------------------ addressing

    @property
    def uri(self) -> str:
        """URI of the first export on the first listener (nbds... when TLS is on)."""
        return self.uri_for(self.exports[0].name)

    def uri_for(self, export: str) -> str:
        return uri_for(self._listeners[0], export, tls=self.tls.mode != "off")

    @property
    def address(self) -> str | tuple[str, int]:
        return self._listeners[0].getsockname()

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> Server:
        """Accept connections from background threads; returns self (handy in fixtures)."""
        for lsock in self._listeners:
            t = threading.Thread(target=self._accept_loop, args=(lsock,), name="nbdref-accept", daemon=True)
            t.start()
            self._accept_threads.append(t)
        log.info("serving %s (persona %s%s)", self.uri, self.persona.name,
                 f", fault {self.fault.spec}" if self.fault else "")
        return self

    @property
    def stopped(self) -> bool:
        """stop() was called."""
        return self._stopping.is_set()

    def serving(self) -> bool:
        """Started, not stopped, and every listener still accepting."""
        return (not self._stopping.is_set() and not self._draining and bool(self._accept_threads)
                and all(t.is_alive() for t in self._accept_threads))

    @property
    def shutting_down(self) -> bool:
        """shutdown() was called (the server may still be finishing its connections)."""
        return self._draining

    def serve_forever(self) -> None:
        self.start()
        try:
            while not self._stopping.wait(0.5):
                pass
        finally:
            self.stop()

    def shutdown(self, grace: float = DEFAULT_SHUTDOWN_GRACE, *, wait: bool = False) -> None:
        """Shut down gracefully: stop accepting at once; a connection in option haggling answers every
        further option but NBD_OPT_ABORT with NBD_REP_ERR_SHUTDOWN (DISC-013); one in transmission
        answers the requests in flight (DISC-018), later ones with NBD_ESHUTDOWN (DISC-020), and closes
        (TLS first) once nothing is in flight.  After ``grace`` seconds stop() hangs up on what is left.
        Returns at once (``wait``: once stopped); a second call changes nothing."""
        with self._lock:
            first, self._draining = not self._draining, True
            sessions = list(self._sessions.values())
        if first:
            self._close_listeners()
            for s in sessions:
                s.begin_shutdown()
            log.info("shutting down: %d connection(s) get up to %g s to finish", len(sessions), grace)
            drainer = threading.Thread(target=self._drain, args=(grace,), name="nbdref-shutdown", daemon=True)
            drainer.start()
            self._drainer = drainer  # only once started: stop() may join it from another thread
        if wait:
            self._join_drainer(None)

    def _drain(self, grace: float) -> None:
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and not self._stopping.is_set():
            with self._lock:
                if not self._sessions:
                    break
            self._stopping.wait(0.01)
        self.stop()

    def _close_listeners(self) -> None:
        with self._lock:
            if self._listeners_closed:
                return
            self._listeners_closed = True
        for lsock in self._listeners:
            try:
                lsock.shutdown(socket.SHUT_RDWR)  # wakes a blocked accept() at once on Linux
            except OSError:
                pass
            lsock.close()

    def _join_drainer(self, timeout: float | None) -> None:
        """Wait for the shutdown thread (it ends in stop()), unless this is that thread."""
        drainer = self._drainer
        if drainer is not None and drainer is not threading.current_thread():
            drainer.join(timeout)

    def stop(self, timeout: float = 10.0) -> None:
        """Close the listeners, hang up on every client, wait for every connection thread, and for a
        graceful shutdown's thread (so a caller that returns has a stopped server, not one mid-stop())."""
        self._stopping.set()
        self._close_listeners()
        with self._lock:
            sessions = list(self._sessions.values())
        for s in sessions:
            s.t.shutdown()
        with self.buffer_budget.cond:
            self.buffer_budget.cond.notify_all()  # readers waiting for the budget see _stopping
        for t in self._accept_threads + list(self._threads):
            t.join(timeout)
        self._join_drainer(timeout)
        if self._unix_path and os.path.exists(self._unix_path):
            try:
                os.unlink(self._unix_path)
            except OSError:
                pass

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def wait_closed(self, timeout: float = 10.0) -> bool:
        """Wait until every connection seen so far has ended (their records are then complete)."""
        return all(r.ended.wait(timeout) for r in list(self.records))

    def wait_for_connections(self, n: int, timeout: float = 10.0) -> list[ConnectionRecord]:
        """Wait until ``n`` connections have been accepted and have ended."""
        done = threading.Event()
        deadline = time.monotonic() + timeout
        while len(self.records) < n and time.monotonic() < deadline:
            done.wait(0.01)
        self.wait_closed(max(0.0, deadline - time.monotonic()))
        return list(self.records)

    @property
    def violations(self) -> list:
        return [v for r in self.records for v in r.violations]

    # ------------------------------------------------------------------ connections

    def _accept_loop(self, lsock: socket.socket) -> None:
        try:
            lsock.settimeout(0.5)
        except OSError:  # closed already: stop() or shutdown() right after start()
            return
        while not self._stopping.is_set():
            try:
                sock, _ = lsock.accept()
            except TimeoutError:
                continue
            except OSError:
                if self._stopping.is_set() or self._draining:
                    return
                log.exception("accept failed")
                self._stopping.wait(0.1)  # e.g. EMFILE: back off instead of spinning
                continue
            # Over a cap the connection is accepted and closed at once, here, on the accept thread:
            # the client sees EOF instead of the greeting right away, and it costs no thread and no
            # handshake time limit.  Not accepting until a slot frees would leave clients waiting in
            # the listen backlog (the kernel completes their TCP handshake anyway) with no answer for
            # up to a whole handshake limit, and behind them the well-behaved ones.
            if not self._admit():
                self._refuse(describe_peer(sock))
                sock.close()
                continue
            try:
                if sock.family != socket.AF_UNIX:
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                # Room for a whole 4 MiB reply in the kernel: fewer partial sendmsg rounds per READ.
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
                transport = SocketTransport(sock)
                peer = describe_peer(sock)
            except Exception:  # e.g. the client reset already: drop it, keep accepting
                log.warning("cannot set up an accepted connection", exc_info=True)
                self._release_slots()
                with contextlib.suppress(OSError):
                    sock.close()
                continue
            try:
                self._serve_admitted(transport, peer)  # gives the slots back itself when it fails
            except Exception:
                log.exception("cannot serve a connection from %s", peer)

    def _admit(self) -> bool:
        """Take a connection slot and its thread, or neither."""
        if not self.connection_slots.take(1):
            return False
        if not self.thread_slots.take(1):
            self.connection_slots.give(1)
            return False
        return True

    def _release_slots(self) -> None:
        self.thread_slots.give(1)
        self.connection_slots.give(1)

    def _refuse(self, peer: str) -> None:
        self.refused += 1
        now = time.monotonic()
        if now - self._refusal_logged >= _REFUSAL_LOG_INTERVAL:  # a flood must not flood the log too
            self._refusal_logged = now
            log.warning("refusing connection from %s: %d connections, %d threads in use (max %d, %d); "
                        "%d refused so far", peer, self.connection_slots.used, self.thread_slots.used,
                        self.connection_slots.limit, self.thread_slots.limit, self.refused)

    @property
    def active(self) -> int:
        """Connections being served now."""
        return self.connection_slots.used

    def serve_transport(self, transport: Transport, peer: str, *, wait: bool = False) -> ConnectionRecord:
        """Serve one already-connected transport (sockets from accept, socketpairs in tests, --stdin).

        Over the connection or thread cap the transport is closed at once; the record returned then
        says so (it is not kept in ``records``)."""
        if not self._admit():
            self._refuse(peer)
            with contextlib.suppress(OSError):
                transport.close()
            record = ConnectionRecord(id=0, peer=peer, reason="refused: connection or thread cap reached")
            record.ended.set()
            return record
        return self._serve_admitted(transport, peer, wait=wait)

    def _serve_admitted(self, transport: Transport, peer: str, *, wait: bool = False) -> ConnectionRecord:
        cid = next(self._ids)
        record = ConnectionRecord(id=cid, peer=peer)
        try:
            session = self._session(transport, record)
        except BaseException:
            self._release_slots()
            with contextlib.suppress(OSError):
                transport.close()
            raise
        with self._lock:
            self.records.append(record)
            if self.max_records is not None and len(self.records) > self.max_records:
                ended = [r for r in self.records if r.ended.is_set()]
                for r in ended[: len(self.records) - self.max_records]:
                    self.records.remove(r)
            self._sessions[cid] = session
            if self._draining:  # accepted as shutdown() began: it winds down with the others
                session.begin_shutdown()
        log.info("connection %d from %s", cid, peer)
        if wait:
            self._run(session)
            return record
        t = threading.Thread(target=self._run, args=(session,), name=f"nbdref-conn{cid}", daemon=True)
        with self._lock:
            self._threads = [x for x in self._threads if x.is_alive()] + [t]
        try:
            t.start()
        except RuntimeError as e:  # the process has no thread left: end the connection, free its slots
            record.reason = f"refused: cannot start a thread ({e})"
            with contextlib.suppress(OSError):
                transport.close()
            with self._lock:
                self._sessions.pop(cid, None)
            self._release_slots()
            record.ended.set()
        return record

    def _session(self, transport: Transport, record: ConnectionRecord) -> Session:
        return Session(
            transport, record,
            exports=self.exports, persona=self.persona, fault=self.fault, tls_mode=self.tls.mode,
            tls_context=self._tls_context,
            handshake_timeout=self._handshake_limit(),
            io_timeout=self.io_timeout, workers=self.workers, read_shape=self.read_shape,
            stopping=self._stopping, strictness=self.strictness, transcript=self.transcript,
            tls_handshake_timeout=self.tls.handshake_timeout,
            oldstyle=self.oldstyle, mask_handshake=self.mask_handshake,
            threads=self.thread_slots, account=Account(self.buffer_budget, self.max_connection_buffer),
            max_in_flight=self.max_requests_in_flight,
        )

    def _handshake_limit(self) -> float | None:
        if self.handshake_timeout is None:
            return None  # switched off (--no-handshake-timeout): option-mode tests can take their time
        if self.handshake_timeout == 0:
            return self.persona.handshake_timeout or DEFAULT_HANDSHAKE_TIMEOUT
        return self.handshake_timeout

    def serve_socket(self, sock: socket.socket, *, wait: bool = False) -> ConnectionRecord:
        return self.serve_transport(SocketTransport(sock), describe_peer(sock), wait=wait)

    def _run(self, session: Session) -> None:
        try:
            session.run()
        finally:
            with self._lock:
                self._sessions.pop(session.record.id, None)
            self.thread_slots.give(1)
            self.connection_slots.give(1)
