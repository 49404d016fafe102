"""A raw fixed-newstyle client on the sans-I/O core, for option haggling the strict client will not do.

``Plain`` speaks one option at a time over a plain socket; every reply still goes through the core
(ClientConnection), so the server's rules on option replies (GEN-001/002/003, OPT-019, ...) are checked
on each one, while our own sends may break the rules on purpose (``check_local=False``).  Watch
``plain.conn`` with ``verdict.watch`` so what the core saw becomes the test's verdict.
"""

from __future__ import annotations

import socket
import struct
from typing import Any

from nbdref import events as ev
from nbdref._constants import ClientFlag, Magic, Rep
from nbdref._errors import RemoteProtocolError
from nbdref._strict import Strictness
from nbdref.connection import NEED_DATA, ClientConnection

from fixtures.timeouts import SILENCE

TIMEOUT = SILENCE
UNKNOWN_OPTION = 0x4E42                 # no option of proto.md or the ext-header draft has this code


def connect(server: Any, timeout: float = TIMEOUT) -> socket.socket:
    """A plain socket to a RunningServer (unix or TCP), with a timeout on every operation."""
    if server.transport == "unix":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        sock.connect(str(server.socket))
        return sock
    return socket.create_connection((server.host or "127.0.0.1", int(server.port or 0)), timeout=timeout)


class Plain:
    """A plaintext newstyle client: greeting, client flags (default: what the server offered of
    FIXED_NEWSTYLE | NO_ZEROES), then options one at a time.  No TLS ever."""

    def __init__(self, server: Any, *, flags: int | None = None, strictness: Strictness | None = None,
                 timeout: float = TIMEOUT) -> None:
        self.sock = connect(server, timeout)
        self.conn = ClientConnection(strictness=strictness or Strictness(check_local=False))
        self.greeting = self.next()
        if not isinstance(self.greeting, ev.NewstyleGreeting):
            self.close()
            raise AssertionError(f"not a newstyle greeting: {self.greeting!r}")
        self.fixed = bool(self.greeting.flags & ClientFlag.FIXED_NEWSTYLE)
        offered = int(self.greeting.flags) & (ClientFlag.FIXED_NEWSTYLE | ClientFlag.NO_ZEROES)
        self.flags = offered if flags is None else flags
        self.sock.sendall(self.conn.send(ev.ClientFlags(flags=ClientFlag(self.flags))))

    def next(self) -> Any:
        """The next event the core decoded from the server (ConnectionClosed at EOF)."""
        while True:
            event = self.conn.next_event()
            if event is not NEED_DATA:
                return event
            try:
                data = self.sock.recv(65536)
            except ConnectionResetError:
                data = b""
            self.conn.receive_data(data)

    @property
    def open(self) -> bool:
        """Still in option haggling (the server has not closed)."""
        return self.conn.state.name == "OPTIONS"

    def option(self, option: ev.Option) -> list[Any]:
        """Send one option; its replies up to the final one (or ConnectionClosed).  A reply the core
        rejects as a fatal breach ends the list as the reply itself (from the transcript), so the
        test can name what the server sent; the breach stays in ``conn.violations``."""
        self.sock.sendall(self.conn.send(option))
        return self.replies()

    def raw_option(self, code: int, data: bytes = b"", *, length: int | None = None) -> list[Any]:
        """Any option code with any data (``length`` may lie about it); the core follows along as for
        an unknown option, so the replies are still parsed and checked."""
        if length is None:
            self.sock.sendall(self.conn.send(ev.OptUnknown(option=code, data=data)))
        else:
            self.sock.sendall(self.conn.send_raw(struct.pack(">QII", Magic.IHAVEOPT, code, length) + data))
        return self.replies()

    def replies(self) -> list[Any]:
        out: list[Any] = []
        while True:
            try:
                out.append(self.next())
            except RemoteProtocolError as e:
                sent = [entry.event for entry in self.conn.transcript if entry.direction == "S"]
                out.append(sent[-1] if sent and sent[-1] is not None else e)
                return out
            except (TimeoutError, OSError) as e:
                out.append(e)
                return out
            if not isinstance(out[-1], ev.OptionReply) or isinstance(out[-1], ev.RepAck | ev.RepError):
                return out

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Plain:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def name(reply: Any) -> str:
    """NBD_REP_ERR_INVALID, RepAck, ConnectionClosed, ... for a reply (or what ended the wait)."""
    if isinstance(reply, ev.RepError):
        return f"NBD_REP_{Rep(reply.reply_type).name}" if reply.reply_type in Rep._value2member_map_ \
            else hex(reply.reply_type)
    return type(reply).__name__


def names(replies: list[Any]) -> str:
    return ", ".join(name(r) for r in replies)


def final(replies: list[Any]) -> Any:
    return replies[-1] if replies else None


def is_error(reply: Any) -> bool:
    return isinstance(reply, ev.RepError)


def drain(sock: socket.socket, quiet: float = 2.0) -> tuple[bytes, bool]:
    """Everything the server sends until it closes (True) or stays quiet for ``quiet`` seconds (False)."""
    sock.settimeout(quiet)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except TimeoutError:
        return data, False
    except (ConnectionResetError, BrokenPipeError):
        pass
    return data, True


def recv_exact(sock: socket.socket, n: int) -> bytes:
    """Exactly ``n`` bytes (EOFError when the server closes first); the socket's timeout applies."""
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError(f"EOF after {len(buf)} of {n} bytes: {buf[:32].hex()}")
        buf += chunk
    return buf
