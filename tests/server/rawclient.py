"""A deliberately dumb byte-level NBD client for feeding the server bad input (no core involved)."""

from __future__ import annotations

import socket
import struct

IHAVEOPT = 0x49484156454F5054
OPT_REPLY_MAGIC = 0x0003E889045565A9
REQUEST_MAGIC = 0x25609513


# Client ends handed out by pair(); conftest closes them after each test, whatever the test did.
OPENED: list[socket.socket] = []


def pair(server, timeout: float = 5.0) -> socket.socket:
    """A socketpair whose other end the server serves in-process; returns the client end."""
    a, b = socket.socketpair()
    a.settimeout(timeout)
    OPENED.append(a)
    server.serve_socket(b)
    return a


def recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError(f"EOF after {len(buf)} of {n} bytes")
        buf += chunk
    return buf


def option(code: int, data: bytes = b"", length: int | None = None) -> bytes:
    return struct.pack(">QII", IHAVEOPT, code, len(data) if length is None else length) + data


def read_option_reply(sock: socket.socket) -> tuple[int, int, bytes]:
    magic, opt, rtype, length = struct.unpack(">QIII", recv_exact(sock, 20))
    assert magic == OPT_REPLY_MAGIC
    return opt, rtype, recv_exact(sock, length)


def request(cmd: int, offset: int = 0, length: int = 0, cookie: int = 1, flags: int = 0) -> bytes:
    return struct.pack(">IHHQQI", REQUEST_MAGIC, flags, cmd, cookie, offset, length)


def handshake(sock: socket.socket, export: str = "exp", structured: bool = False) -> None:
    """Greeting, client flags, [STRUCTURED_REPLY], NBD_OPT_GO until NBD_REP_ACK."""
    replies = go(sock, export, structured=structured)
    assert replies[-1][0] == 1, hex(replies[-1][0])


def go(sock: socket.socket, export: str = "exp", infos: tuple[int, ...] = (), *,
       structured: bool = False) -> list[tuple[int, bytes]]:
    """Greeting, client flags, [STRUCTURED_REPLY], NBD_OPT_GO asking for ``infos``: the replies."""
    greeting = recv_exact(sock, 18)
    assert greeting[:8] == b"NBDMAGIC"
    sock.sendall(struct.pack(">I", 3))
    if structured:
        sock.sendall(option(8))
        assert read_option_reply(sock)[1] == 1
    return opt_go(sock, export, infos)


def opt_go(sock: socket.socket, export: str = "exp", infos: tuple[int, ...] = ()) -> list[tuple[int, bytes]]:
    """One NBD_OPT_GO: every (reply type, data) up to and including the final (non-INFO) reply."""
    name = export.encode()
    sock.sendall(option(7, struct.pack(f">I{len(name)}sH{len(infos)}H", len(name), name, len(infos), *infos)))
    out = []
    while True:
        _, rtype, data = read_option_reply(sock)
        out.append((rtype, data))
        if rtype != 3:  # NBD_REP_INFO
            return out


def simple_reply(sock: socket.socket) -> tuple[int, int]:
    magic, error, cookie = struct.unpack(">IIQ", recv_exact(sock, 16))
    assert magic == 0x67446698, hex(magic)
    return error, cookie


def closed(sock: socket.socket) -> bool:
    """True when the server has closed its end (EOF or reset), after draining what it sent."""
    try:
        while True:
            if not sock.recv(65536):
                return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False
