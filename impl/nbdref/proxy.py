"""A validating NBD proxy: forwards bytes unchanged and checks both directions on the sans-I/O core.

For each accepted client the proxy connects to the upstream server and runs two core connections:
a ``ServerConnection`` decodes the client's bytes (rules binding clients) and a ``ClientConnection``
decodes the server's (rules binding servers).  Each is told what the other side sent
(``Connection.observe``), so both follow one negotiation; both share one Transcript, the C:/S: log of
the pair.  A violation carries ``direction`` ("C" / "S": who sent the offending message) and
``binds``.  It is recorded, never "fixed": the proxy keeps forwarding (``hard_disconnect=True`` closes
both sides at the first violation instead).

Data path: the bytes are received straight into the core's receive buffer (``get_buffer`` /
``recv_into``) and sent on from there; READ and large WRITE payloads are counted past
(``discard_payloads``), so the proxy adds no copy.  One thread per connection runs a select loop over
both sockets (non-blocking): a side is read only once what it sent before has gone out to the other
side, which is TCP's own back-pressure.  Every wait is bounded: ``io_timeout`` for output that does
not drain and for connecting, ``idle_timeout`` for silence on both sides; losing one side closes the
other (after ``linger`` seconds for its last bytes).

TLS: with a ``ProxyTLS`` the proxy terminates both sides.  The client's NBD_OPT_STARTTLS goes to the
server and the server's ACK back to the client, as any bytes; then the proxy runs the TLS handshake
as the server towards the client and as the client towards the server, and relays (and checks) the
decrypted streams.  Without one, the bytes after the STARTTLS ACK are forwarded unchecked.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
import selectors
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from . import _events as ev
from . import tls as _tls
from ._errors import ProtocolError, Violation
from ._state import NEED_DATA, State
from ._strict import Strictness
from ._transcript import Transcript
from .connection import ClientConnection, ServerConnection
from .pcapng import PcapngWriter
from .server._listen import listen_tcp, listen_unix
from .server._listen import uri_for as _uri_for
from .uri import Uri, parse_uri

log = logging.getLogger("nbdref.proxy")

CHUNK = 256 * 1024  # bytes received per recv_into
READS_PER_WAKEUP = 8  # recvs from one side per select wake-up while everything goes straight out
SOCKET_BUFFER = 4 << 20  # SO_SNDBUF / SO_RCVBUF asked for on both sockets
TRANSCRIPT_ENTRIES = 20000  # per connection: head and tail kept, the middle counted (long copies)
# Record everything, raise for nothing: an observer must see the whole exchange.  WR-002 is checked by
# the framing of the decoder; a WRITE told to the observer has its payload counted past (None).
STRICTNESS = dataclasses.replace(Strictness.lenient(), disabled=frozenset({"WR-002"}))


@dataclass(frozen=True)
class ProxyTLS:
    """The run's TLS material: X.509 (``certificates_dir`` with ca-cert, server and client certs) or
    PSK (``psk_file`` and the identity to use towards the server)."""

    certificates_dir: str | None = None
    psk_file: str | None = None
    psk_identity: str | None = None
    hostname: str | None = None  # checked against the server's certificate when set
    verify_client: bool = False  # ask the client for a certificate (as a server checking them does)

    def for_client(self) -> ssl.SSLContext:
        """The context the proxy uses as a server towards the client."""
        if self.psk_file:
            return _tls.server_context(psk_file=self.psk_file)
        return _tls.server_context(self.certificates_dir, verify_peer=self.verify_client)

    def for_server(self) -> ssl.SSLContext:
        """The context the proxy uses as a client towards the server."""
        if self.psk_file:
            return _tls.client_context(psk_file=self.psk_file, psk_identity=self.psk_identity)
        return _tls.client_context(self.certificates_dir, hostname=self.hostname)


@dataclass
class ProxyRecord:
    """What the proxy saw of one connection; complete once ``ended`` is set.

    ``violations``: client and server breaches in the order found (``v.direction``: "C" the client,
    "S" the server).  ``errors``: faults no catalogued rule names (side, message), after which the
    checks stopped.  ``negotiated``: what the pair agreed on.  Exposes ``violations`` and
    ``transcript`` like the reference server's ConnectionRecord, so a Judge can watch it.
    """

    id: int
    peer: str
    started: float = field(default_factory=time.time)
    transcript: Transcript = field(default_factory=lambda: Transcript(max_entries=TRANSCRIPT_ENTRIES))
    violations: list[Violation] = field(default_factory=list)
    errors: list[tuple[str, str]] = field(default_factory=list)
    negotiated: dict[str, Any] = field(default_factory=dict)
    checked: set[str] = field(default_factory=set)
    # The same per side: "C" the rules checked on the client's bytes, "S" on the server's.
    checked_by: dict[str, set[str]] = field(default_factory=lambda: {"C": set(), "S": set()})
    checking: bool = True
    unchecked: str = ""  # why the checks stopped, if they did
    tls: bool = False
    reason: str = ""
    bytes_from_client: int = 0
    bytes_from_server: int = 0
    ended: threading.Event = field(default_factory=threading.Event)

    def wait(self, timeout: float = 10.0) -> bool:
        return self.ended.wait(timeout)

    @property
    def violation_ids(self) -> list[str]:
        return [v.req_id for v in self.violations]

    def by(self, side: str) -> list[Violation]:
        """Violations committed by ``side``: "C" (the client) or "S" (the server)."""
        return [v for v in self.violations if v.direction == side]

    @property
    def client_violations(self) -> list[Violation]:
        return self.by("C")

    @property
    def server_violations(self) -> list[Violation]:
        return self.by("S")


class SideView:
    """``record`` narrowed to the violations one side committed (for ``Judge.watch(..., peer=...)``)."""

    def __init__(self, records: Any, side: str) -> None:
        self._records, self.side = records, side

    @property
    def violations(self) -> list[Violation]:
        recs = self._records() if callable(self._records) else self._records
        return [v for r in recs for v in r.by(self.side)]

    @property
    def checked(self) -> set[str]:
        """Ids of the rules checked on this side's bytes (held or broken)."""
        recs = self._records() if callable(self._records) else self._records
        return {rid for r in recs for rid in r.checked_by.get(self.side, ())}


class _End:
    """One socket of the pair and the core decoding what it sends."""

    def __init__(self, name: str, sock: socket.socket, conn: Any) -> None:
        self.name = name  # "client" | "server"
        self.sock = sock
        self.conn = conn
        self.out: memoryview | None = None  # bytes for this end not yet sent
        self.out_since = 0.0
        self.eof = False  # this end sent EOF
        self.shut = False  # we sent EOF to this end
        self.own = memoryview(bytearray(CHUNK))  # receive buffer while the core does not read


class _Session:
    """One proxied connection: a select loop over the client and server sockets."""

    def __init__(self, proxy: Proxy, client: socket.socket, record: ProxyRecord) -> None:
        self.proxy = proxy
        self.record = record
        t = record.transcript
        self.s_conn = ServerConnection(STRICTNESS, t, discard_payloads=True)  # decodes the client
        self.c_conn = ClientConnection(STRICTNESS, t, discard_payloads=True)  # decodes the server
        self.client = _End("client", client, self.s_conn)
        self.server: _End | None = None
        self._seen = [0, 0]  # violations of s_conn / c_conn already copied into the record
        self._tls_due = False
        self._stream = None
        self._last = time.monotonic()

    # ------------------------------------------------------------------ checks
    def _drain(self, final: bool = False) -> None:
        """Take every event the cores can decode now and tell the other core about it.

        A core waits while the other has not yet decoded what it answers (an option reply before the
        option, bytes of a next option before the final reply): ``final`` (both sides ended) lifts that.
        """
        rec = self.record
        if not rec.checking:
            return
        s, c = self.s_conn, self.c_conn
        moved = True
        conn = s
        try:
            while moved:
                moved = False
                for conn, other in ((s, c), (c, s)):
                    while rec.checking:
                        if not final and conn.state is State.OPTIONS and (
                            (conn.pending_option is not None) if conn is s else (conn.pending_option is None)
                        ):
                            break
                        e = conn.next_event()
                        if e is NEED_DATA:
                            break
                        kind = type(e)
                        if kind is ev.ConnectionClosed:
                            break
                        if kind is ev.StartTLS:
                            self._starttls()
                            break
                        if kind is ev.ReplyComplete:  # the core's summary, not a message
                            continue
                        if other.state not in (State.ERROR, State.CLOSED):
                            other.observe(e)
                        self._note(e)
                        moved = True
        except ProtocolError as exc:
            side = "client" if conn is s else "server"
            if getattr(exc, "violation", None) is None:
                rec.errors.append((side[0].upper(), str(exc)))
            self._stop_checks(f"{type(exc).__name__} on the {side}'s bytes: {exc}")
        self._collect()

    def _collect(self) -> None:
        rec = self.record
        new = False
        for i, conn in enumerate((self.s_conn, self.c_conn)):
            vs = conn.violations
            if len(vs) > self._seen[i]:
                rec.violations.extend(vs[self._seen[i] :])
                self._seen[i] = len(vs)
                new = True
            checked = getattr(conn, "checked", set())
            rec.checked |= checked
            # s_conn plays the server: it checks the client's bytes; c_conn the server's.
            rec.checked_by["C" if conn is self.s_conn else "S"] |= checked
        if new and self.proxy.hard_disconnect:
            raise _Hangup(f"hard disconnect after {rec.violations[-1].req_id}")

    def _note(self, e: ev.Event) -> None:
        """Keep what the pair negotiated (for the report: who fell back to what)."""
        neg = self.record.negotiated
        if isinstance(e, ev.Option):
            neg.setdefault("options", []).append(type(e).__name__)
        elif isinstance(e, ev.ExportNameReply | ev.OldstyleGreeting) or (
            isinstance(e, ev.RepAck) and self.c_conn.state is State.TRANSMISSION
        ):
            c = self.c_conn
            neg.update(
                structured_replies=c.structured_replies,
                extended_headers=c.extended_headers,
                meta_contexts=sorted(c.meta_contexts.values()),
                export=c.export_name,
                size=c.export_size,
                transmission_flags=c.transmission_flags,
                block_size=c.block_size,
                tls=c.tls_negotiated,
            )
            # How the handshake ended (a client whose GO was refused may fall back to EXPORT_NAME).
            neg["handshake"] = ("oldstyle" if isinstance(e, ev.OldstyleGreeting) else
                                "EXPORT_NAME" if isinstance(e, ev.ExportNameReply) else "GO")
        elif isinstance(e, ev.Request):
            n = neg.setdefault("commands", {})
            name = getattr(e.command, "name", str(e.command))
            n[name] = n.get(name, 0) + 1

    def _stop_checks(self, why: str) -> None:
        rec = self.record
        if rec.checking:
            rec.checking = False
            rec.unchecked = why
            rec.transcript.note("!", "unchecked", f"checks stopped: {why}; bytes still forwarded")

    def _starttls(self) -> None:
        if self.proxy.tls is None:
            self._stop_checks("TLS negotiated and the proxy has no TLS material")
        else:
            self._tls_due = True

    # ------------------------------------------------------------------ I/O
    def run(self) -> None:
        rec = self.record
        try:
            self._connect()
            self._loop()
            rec.reason = rec.reason or "both sides closed"
        except _Hangup as exc:
            rec.reason = str(exc)
        except (OSError, ssl.SSLError) as exc:
            rec.reason = rec.reason or f"{type(exc).__name__}: {exc}"
        except Exception as exc:  # a proxy bug must end the connection, not kill the thread silently
            log.exception("proxy connection %d failed", rec.id)
            rec.reason = f"proxy error: {type(exc).__name__}: {exc}"
        finally:
            with contextlib.suppress(Exception):
                self._drain(final=True)
            for end in (self.client, self.server):
                if end is not None:
                    with contextlib.suppress(OSError):
                        end.sock.close()
            if self._stream is not None and self.proxy.pcap is not None:
                self.proxy.pcap.close_stream(self._stream)
                self.proxy.pcap.flush()
            rec.transcript.note("!", "end", f"proxy: {rec.reason}")
            rec.ended.set()

    def _connect(self) -> None:
        u = self.proxy.upstream
        family = socket.AF_UNIX if u.transport == "unix" else socket.AF_INET6 if ":" in (u.host or "") else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.settimeout(self.proxy.io_timeout)
        try:
            sock.connect(u.address())
        except OSError:
            sock.close()
            self.record.reason = f"cannot connect to the server {self.proxy.upstream_uri}"
            raise
        self.server = _End("server", sock, self.c_conn)
        for end in (self.client, self.server):
            end.sock.setblocking(False)
            # Room for a few recvs in flight each way: fewer wake-ups per MiB (capped by the kernel).
            for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
                with contextlib.suppress(OSError):
                    end.sock.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER)
        if self.proxy.pcap is not None:
            self._stream = self.proxy.pcap.open_stream()

    def _loop(self) -> None:
        assert self.server is not None
        ends = (self.client, self.server)
        sel = selectors.DefaultSelector()
        registered: dict[int, int] = {}
        try:
            while not self.proxy._stopping.is_set():
                if self._tls_due and self.client.out is None and self.server.out is None:
                    self._tls_due = False
                    for end in ends:
                        if end.sock.fileno() in registered:
                            sel.unregister(end.sock)
                            registered.pop(end.sock.fileno())
                    self._handshake()
                    continue
                if self.client.eof and self.server.eof and self.client.out is None and self.server.out is None:
                    return
                for end in ends:
                    other = self.server if end is self.client else self.client
                    mask = 0
                    if not end.eof and other.out is None and not other.shut:
                        mask |= selectors.EVENT_READ
                    if end.out is not None:
                        mask |= selectors.EVENT_WRITE
                    fd = end.sock.fileno()
                    if registered.get(fd) != mask:
                        if fd in registered:
                            sel.unregister(end.sock)
                            registered.pop(fd)
                        if mask:
                            sel.register(end.sock, mask, end)
                            registered[fd] = mask
                # Bytes an SSL object already decrypted are not visible to select.
                ready = [(end, selectors.EVENT_READ) for end in ends
                         if isinstance(end.sock, ssl.SSLSocket) and end.sock.pending()
                         and registered.get(end.sock.fileno(), 0) & selectors.EVENT_READ]
                if not ready:
                    ready = [(key.data, mask) for key, mask in sel.select(0.5)]
                now = time.monotonic()
                for end, mask in ready:
                    if mask & selectors.EVENT_WRITE:
                        self._flush(end)
                    if mask & selectors.EVENT_READ:
                        for _ in range(READS_PER_WAKEUP):  # a busy side: read on without another select
                            if not self._read(end):
                                break
                    if self._tls_due:
                        break
                self._check_timeouts(now, ends)
            self.record.reason = "proxy stopped"
        finally:
            sel.close()

    def _check_timeouts(self, now: float, ends: tuple[_End, _End]) -> None:
        for end in ends:
            if end.out is not None and now - end.out_since > self.proxy.io_timeout:
                raise _Hangup(f"the {end.name} did not take our bytes within {self.proxy.io_timeout} s")
        if now - self._last > self.proxy.idle_timeout:
            raise _Hangup(f"no bytes from either side for {self.proxy.idle_timeout} s")
        lost = next((e for e in ends if e.eof), None)
        if lost is not None and now - self._lost_at > self.proxy.linger:
            other = self.server if lost is self.client else self.client
            if not other.eof:
                raise _Hangup(f"the {lost.name} closed; the {other.name} did not within {self.proxy.linger} s")

    _lost_at = float("inf")

    def _read(self, end: _End) -> bool:
        """One recv from ``end``, forwarded; True when all of it went out (read again at once)."""
        rec = self.record
        other = self.server if end is self.client else self.client
        assert other is not None
        checking = rec.checking
        view = end.conn.get_buffer(CHUNK) if checking else end.own
        try:
            n = end.sock.recv_into(view, min(len(view), CHUNK))
        except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError, InterruptedError):
            return False
        except ssl.SSLEOFError:
            n = 0  # EOF without close_notify: an EOF all the same
        except OSError as exc:
            raise _Hangup(f"the {end.name} connection failed: {exc}") from None
        self._last = time.monotonic()
        if n == 0:
            end.eof = True
            self._lost_at = min(self._lost_at, self._last)
            if checking:
                end.conn.buffer_updated(0)
                self._drain()
            if self._stream is not None:
                self.proxy.pcap.close_stream(self._stream, from_server=end is self.server)  # type: ignore[union-attr]
            self._shutdown_later(other)
            return False
        chunk = view[:n]
        if end is self.client:
            rec.bytes_from_client += n
        else:
            rec.bytes_from_server += n
        if self._stream is not None:
            self.proxy.pcap.data(self._stream, end is self.server, chunk)  # type: ignore[union-attr]
        if checking:
            end.conn.buffer_updated(n)
            self._drain()
        other.out, other.out_since = chunk, self._last
        self._flush(other)
        return other.out is None and not self._tls_due

    def _shutdown_later(self, end: _End) -> None:
        """EOF from the other side: pass it on once ``end``'s pending bytes are out."""
        if end.out is None and not end.shut:
            end.shut = True
            if isinstance(end.sock, ssl.SSLSocket):
                # A TLS half-close would end the TLS session both ways: close the pair now.
                other = self.server if end is self.client else self.client
                raise _Hangup(f"the {other.name if other else 'server'} closed")
            with contextlib.suppress(OSError):
                end.sock.shutdown(socket.SHUT_WR)

    def _flush(self, end: _End) -> None:
        data = end.out
        if data is None:
            return
        try:
            sent = end.sock.send(data)
        except (BlockingIOError, ssl.SSLWantWriteError, ssl.SSLWantReadError, InterruptedError):
            return
        except OSError as exc:
            if end.eof or isinstance(exc, BrokenPipeError | ConnectionResetError):  # it hung up: not a transport failure
                raise _Hangup(f"the {end.name} closed before taking {len(data)} bytes ({exc.strerror})") from None
            raise _Hangup(f"the {end.name} connection failed: {exc}") from None
        if sent >= len(data):
            end.out = None
            other = self.server if end is self.client else self.client
            if other is not None and other.eof:
                self._shutdown_later(end)
        else:
            end.out = data[sent:]

    def _handshake(self) -> None:
        """TLS on both sides (blocking, bounded by io_timeout), then the cores restart negotiation."""
        assert self.server is not None and self.proxy.tls is not None
        tls, timeout = self.proxy.tls, self.proxy.io_timeout
        rec = self.record
        for end in (self.client, self.server):
            end.sock.setblocking(True)
            end.sock.settimeout(timeout)
        try:
            self.client.sock = tls.for_client().wrap_socket(self.client.sock, server_side=True)
        except (ssl.SSLError, OSError) as exc:
            raise _Hangup(f"TLS handshake with the client failed: {exc}") from None
        try:
            ctx = tls.for_server()
            self.server.sock = ctx.wrap_socket(self.server.sock, server_hostname=getattr(ctx, "server_hostname", None))
            if tls.psk_file:
                _tls.require_psk(self.server.sock)  # type: ignore[arg-type]
        except (ssl.SSLError, OSError) as exc:
            raise _Hangup(f"TLS handshake with the server failed: {exc}") from None
        for end in (self.client, self.server):
            end.sock.setblocking(False)
        rec.tls = True
        rec.transcript.note("!", "tls", f"proxy: TLS with both sides ({self.client.sock.version()})")
        if rec.checking:
            for conn in (self.s_conn, self.c_conn):
                if conn.state is State.TLS_HANDSHAKE:
                    conn.tls_established()


class _Hangup(Exception):
    """End the proxied connection (both sides) with this reason."""


def _listen_uri(uri: str) -> Uri:
    """A listening URI; TCP port 0 (any free port) is allowed here, unlike in a URI to connect to."""
    m = re.match(r"^(nbds?://[^/?#]*):0(?=[/?#]|$)", uri)
    if m is None:
        return parse_uri(uri)
    return dataclasses.replace(parse_uri(m.group(1) + uri[m.end() :]), port=0)


class Proxy:
    """Listen on ``listen`` (nbd+unix:///?socket=PATH or nbd://127.0.0.1:PORT, port 0 = any) and proxy
    each client to ``upstream``.  ``records``: one ProxyRecord per connection."""

    def __init__(
        self,
        listen: str,
        upstream: str,
        *,
        tls: ProxyTLS | None = None,
        pcap: str | os.PathLike[str] | None = None,
        hard_disconnect: bool = False,
        io_timeout: float = 30.0,
        idle_timeout: float = 300.0,
        linger: float = 2.0,
    ) -> None:
        self.listen_uri = _listen_uri(listen)
        self.upstream_uri = upstream
        self.upstream = parse_uri(upstream)
        self.tls = tls
        self.pcap_path = os.fspath(pcap) if pcap is not None else None
        self.pcap: PcapngWriter | None = None
        self.hard_disconnect = hard_disconnect
        self.io_timeout, self.idle_timeout, self.linger = io_timeout, idle_timeout, linger
        self.records: list[ProxyRecord] = []
        self._sock: socket.socket | None = None
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._acceptor: threading.Thread | None = None

    @property
    def uri(self) -> str:
        return self.uri_for(self.upstream.export_name)

    @property
    def port(self) -> int | None:
        """The TCP port the proxy listens on (None on a unix socket)."""
        assert self._sock is not None, "start() first"
        return None if self._sock.family == socket.AF_UNIX else int(self._sock.getsockname()[1])

    def uri_for(self, export: str) -> str:
        """The URI a client uses to reach ``export`` through the proxy."""
        assert self._sock is not None, "start() first"
        return _uri_for(self._sock, export, tls=self.upstream.tls_required)

    def start(self) -> Proxy:
        u = self.listen_uri
        if u.transport == "unix":
            assert u.socket is not None
            self._sock = listen_unix(u.socket)
        else:
            self._sock = listen_tcp(u.host or "127.0.0.1", u.port or 0)
        self._sock.settimeout(0.5)
        if self.pcap_path is not None:
            self.pcap = PcapngWriter(self.pcap_path)
        self._acceptor = threading.Thread(target=self._accept, name="nbd-proxy-accept", daemon=True)
        self._acceptor.start()
        return self

    def _accept(self) -> None:
        assert self._sock is not None
        while not self._stopping.is_set():
            try:
                client, addr = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            record = ProxyRecord(id=len(self.records) + 1, peer=str(addr) or "unix")
            self.records.append(record)
            session = _Session(self, client, record)
            t = threading.Thread(target=session.run, name=f"nbd-proxy-{record.id}", daemon=True)
            self._threads.append(t)
            t.start()

    def wait_closed(self, timeout: float = 10.0) -> bool:
        """Every connection so far has ended (within ``timeout`` each)."""
        return all(r.ended.wait(timeout) for r in list(self.records))

    @property
    def violations(self) -> list[Violation]:
        return [v for r in self.records for v in r.violations]

    def side(self, side: str) -> SideView:
        """A holder of the violations ``side`` ("C" / "S") committed on every connection."""
        return SideView(lambda: list(self.records), side)

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping.set()
        if self._sock is not None:
            path = self.listen_uri.socket if self.listen_uri.transport == "unix" else None
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)   # wakes the blocked accept() at once on Linux
            with contextlib.suppress(OSError):
                self._sock.close()
            if path and not path.startswith("\0"):
                with contextlib.suppress(OSError):
                    os.unlink(path)
        for t in [self._acceptor, *self._threads]:
            if t is not None:
                t.join(timeout)
        if self.pcap is not None:
            self.pcap.close()

    def __enter__(self) -> Proxy:
        return self.start() if self._sock is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log_text(self) -> str:
        """Every connection: header, transcript, violations (for evidence / logs)."""
        out: list[str] = []
        for r in self.records:
            out.append(f"== proxy connection {r.id} ({r.peer}): {r.reason or 'open'}")
            out.append(f"   negotiated: {r.negotiated}")
            if r.unchecked:
                out.append(f"   unchecked: {r.unchecked}")
            out.extend(str(r.transcript).splitlines())
            out.extend(f"VIOLATION by the {'client' if v.direction == 'C' else 'server'}: {v}" for v in r.violations)
            out.extend(f"ERROR ({side}): {msg}" for side, msg in r.errors)
        return "\n".join(out)


@contextlib.contextmanager
def running(listen: str, upstream: str, **kw: Any) -> Iterator[Proxy]:
    """``with running(listen, upstream) as p:`` a started proxy, stopped at the end."""
    p = Proxy(listen, upstream, **kw).start()
    try:
        yield p
    finally:
        p.stop()
