"""Byte transports for one connection: plain socket, TLS over a MemoryBIO, or a pipe pair (--stdin).

Reads happen on the connection's reader thread, writes on its workers, at the same time.  An
``ssl.SSLSocket`` must not be read and written from two threads at once (one OpenSSL ``SSL*``), so TLS
runs through ``ssl.SSLObject`` + ``MemoryBIO`` under a lock, with the raw socket I/O outside it.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import ssl
import threading
from collections.abc import Callable, Sequence

from .._sockio import sendmsg_all
from ..tls import PskAuthError, require_psk

Chunk = bytes | bytearray | memoryview


class Transport:
    """What the session needs: recv_into, send (an iov), shutdown, close; all with timeouts."""

    tls = False

    def recv_into(self, buf: memoryview) -> int:
        raise NotImplementedError

    def send(self, iov: Sequence[Chunk]) -> int:
        raise NotImplementedError

    def set_timeout(self, seconds: float | None) -> None:
        raise NotImplementedError

    def shutdown(self) -> None:
        """Wake a blocked reader and stop the peer (used by Server.stop and on errors)."""

    def shutdown_read(self) -> None:
        """Wake a blocked reader (it reads EOF) and leave writing open: a graceful server shutdown
        still sends the replies in flight and TLS close_notify after it (DISC-018)."""

    def readable(self) -> bool:
        """Bytes (or EOF) are waiting to be read: a reader about to read them is not idle."""
        return True

    def discard_input(self) -> None:
        """Drop what the client sent and we will not read, before close(): a TCP close with unread
        data sends a reset, which can destroy replies the client has not read yet."""

    def close(self) -> None:
        raise NotImplementedError


class SocketTransport(Transport):
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def recv_into(self, buf: memoryview) -> int:
        return self.sock.recv_into(buf)

    def send(self, iov: Sequence[Chunk]) -> int:
        """socket.sendmsg with the header and data buffers as they are: no join, no copy."""
        return sendmsg_all(self.sock, iov)

    def set_timeout(self, seconds: float | None) -> None:
        self.sock.settimeout(seconds)

    def shutdown(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def shutdown_read(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RD)

    def readable(self) -> bool:
        """Bytes (or an EOF / error) wait to be read.  poll, not select: select.select raises ValueError
        for a descriptor above FD_SETSIZE (1024), which a busy server reaches."""
        try:
            poller = select.poll()
            poller.register(self.sock, select.POLLIN | select.POLLPRI)
            return bool(poller.poll(0))
        except (OSError, ValueError):  # a closed socket (fileno -1): nothing to wait for, let the read see it
            return True

    def discard_input(self, limit: int = 64 << 20) -> None:
        timeout = self.sock.gettimeout()
        with contextlib.suppress(OSError):
            self.sock.setblocking(False)
            while limit > 0:
                n = len(self.sock.recv(1 << 16))
                if not n:
                    break
                limit -= n
        with contextlib.suppress(OSError):
            self.sock.settimeout(timeout)  # TLS still sends its close_notify after this

    def close(self) -> None:
        self.sock.close()


class TLSTransport(Transport):
    """TLS on top of a plain socket, after NBD_OPT_STARTTLS was acknowledged.

    ``on_first`` is told the first bytes the client sent after the ACK (the first read, before OpenSSL
    sees them): TLS-014 wants a TLS record there, not plaintext NBD.  With ``initial`` (bytes the client
    sent before it could have read the ACK) nothing is told: TLS-014 speaks of what follows the ACK, and
    a read after such bytes may start mid-record.  ``on_eof`` is told,
    once, how the client's TLS session ended: True after its close_notify, False at a bare EOF
    (DISC-002 / DISC-016)."""

    tls = True
    close_notify = False  # the client shut TLS down (its close_notify arrived) before any EOF

    def __init__(self, raw: Transport, context: ssl.SSLContext, *, timeout: float,
                 initial: bytes = b"", on_first: Callable[[bytes], None] | None = None,
                 on_eof: Callable[[bool], None] | None = None) -> None:
        self.raw = raw
        self._on_first = None if initial else on_first
        self._on_eof = on_eof
        self._in = ssl.MemoryBIO()
        if initial:
            self._in.write(initial)
        self._out = ssl.MemoryBIO()
        self._obj = context.wrap_bio(self._in, self._out, server_side=True)
        self._lock = threading.Lock()       # guards the SSLObject
        self._send_lock = threading.Lock()  # keeps TLS records in order on the wire
        raw.set_timeout(timeout)
        self._handshake()

    def _flush(self) -> None:
        with self._send_lock:
            with self._lock:
                data = self._out.read()
            if data:
                self.raw.send([data])

    def _first(self, data: bytes | memoryview) -> None:
        if self._on_first is not None:
            tell, self._on_first = self._on_first, None
            tell(bytes(data[:64]))

    def _ended(self, close_notify: bool) -> None:
        self.close_notify = close_notify
        if self._on_eof is not None:
            tell, self._on_eof = self._on_eof, None
            tell(close_notify)

    def _fill(self) -> bool:
        buf = bytearray(65536)
        n = self.raw.recv_into(memoryview(buf))
        if not n:
            self._in.write_eof()
            return False
        if self._on_first is not None:
            self._first(memoryview(buf)[:n])
        self._in.write(memoryview(buf)[:n])
        return True

    def _handshake(self) -> None:
        while True:
            try:
                with self._lock:
                    self._obj.do_handshake()
                self._flush()
                break
            except ssl.SSLWantReadError:
                self._flush()
                if not self._fill():
                    raise ConnectionError("EOF during TLS handshake") from None
            except ssl.SSLError as exc:
                # Send the alert OpenSSL queued (handshake_failure, decrypt_error...): the client then
                # learns why, instead of seeing a bare EOF.
                with contextlib.suppress(OSError):
                    self._flush()
                if getattr(self._obj.context, "psk_required", False):
                    raise PskAuthError(f"TLS-PSK: the client did not prove a PSK we know ({exc.reason or exc})") from exc
                raise
        if getattr(self._obj.context, "psk_required", False):
            # "If the TLS handshake fails (e.g. client certificate rejected) the server must terminate the
            # session" (TLS-016): a session the PSK did not authenticate is a failed PSK handshake.
            require_psk(self._obj)

    @property
    def version(self) -> str | None:
        return self._obj.version()

    def recv_into(self, buf: memoryview) -> int:
        while True:
            try:
                with self._lock:
                    n = self._obj.read(len(buf), buf)
                    pending = self._out.pending
                if pending:
                    self._flush()
                if not n and len(buf):
                    self._ended(True)  # read() gives 0 at the peer's close_notify (a bare EOF: _fill)
                return n
            except ssl.SSLWantReadError:
                self._flush()
                if not self._fill():
                    self._ended(False)
                    return 0
            except ssl.SSLZeroReturnError:
                self._ended(True)
                return 0
            except ssl.SSLEOFError:
                self._ended(False)  # EOF in violation of the protocol: no close_notify
                return 0

    def send(self, iov: Sequence[Chunk]) -> int:
        total = 0
        with self._send_lock:
            for b in iov:
                if not len(b):
                    continue
                with self._lock:
                    self._obj.write(b)
                    data = self._out.read()
                self.raw.send([data])
                total += len(b)
        return total

    def set_timeout(self, seconds: float | None) -> None:
        self.raw.set_timeout(seconds)

    def shutdown(self) -> None:
        self.raw.shutdown()

    def shutdown_read(self) -> None:
        self.raw.shutdown_read()

    def readable(self) -> bool:
        with self._lock:
            buffered = self._in.pending or self._obj.pending()
        return bool(buffered) or self.raw.readable()

    def discard_input(self) -> None:
        self.raw.discard_input()

    def close(self) -> None:
        # proto.md: the server "MUST close down the TLS session (if one is running)" on NBD_CMD_DISC.
        try:
            with self._lock:
                self._obj.unwrap()
        except (ssl.SSLError, OSError, ValueError):
            pass
        try:
            self._flush()
        except OSError:
            pass
        self.raw.close()


class PipeTransport(Transport):
    """stdin/stdout that are not a socket (``serve --stdin`` from a shell pipeline)."""

    def __init__(self, rfd: int, wfd: int) -> None:
        self.rfd, self.wfd = rfd, wfd
        self.timeout: float | None = None

    def _wait(self, fd: int, write: bool) -> None:
        r, w, _ = select.select([] if write else [fd], [fd] if write else [], [], self.timeout)
        if not r and not w:
            raise TimeoutError("pipe timed out")

    def recv_into(self, buf: memoryview) -> int:
        self._wait(self.rfd, False)
        return os.readv(self.rfd, [buf])

    def send(self, iov: Sequence[Chunk]) -> int:
        total = 0
        for b in iov:
            view = memoryview(b).cast("B")
            while view:
                self._wait(self.wfd, True)
                n = os.write(self.wfd, view)
                view = view[n:]
                total += n
        return total

    def set_timeout(self, seconds: float | None) -> None:
        self.timeout = seconds

    def close(self) -> None:
        for fd in {self.rfd, self.wfd}:
            try:
                os.close(fd)
            except OSError:
                pass
