"""Listening sockets (Unix, TCP, systemd socket activation) and the NBD URI that names them."""

from __future__ import annotations

import contextlib
import os
import socket
import stat
import urllib.parse

SD_LISTEN_FDS_START = 3


def listen_unix(path: str, backlog: int = 64) -> socket.socket:
    """Bind a Unix stream socket, replacing a stale socket file (never a regular file)."""
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return sock


def listen_tcp(host: str = "127.0.0.1", port: int = 0, backlog: int = 64) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return sock


def from_socket_activation(environ: dict[str, str] | None = None) -> list[socket.socket]:
    """Sockets passed by systemd-style socket activation (sd_listen_fds(3)): LISTEN_PID must be us."""
    env = os.environ if environ is None else environ
    if env.get("LISTEN_PID") not in (str(os.getpid()),):
        raise ValueError(f"LISTEN_PID={env.get('LISTEN_PID')!r} is not this process ({os.getpid()})")
    count = int(env.get("LISTEN_FDS", "0"))
    if count < 1:
        raise ValueError("LISTEN_FDS is not set or zero")
    socks = []
    for fd in range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + count):
        os.set_inheritable(fd, False)
        socks.append(socket.socket(fileno=fd))
    return socks


def uri_for(sock: socket.socket, export: str, *, tls: bool = False) -> str:
    """nbd[s]+unix:///export?socket=PATH or nbd[s]://HOST:PORT/export (uri.md)."""
    name = urllib.parse.quote(export, safe="")
    if sock.family == socket.AF_UNIX:
        path = sock.getsockname()
        return f"nbd{'s' if tls else ''}+unix:///{name}?socket={urllib.parse.quote(path, safe='/')}"
    host, port = sock.getsockname()[:2]
    if ":" in host:
        host = f"[{host}]"
    return f"nbd{'s' if tls else ''}://{host}:{port}/{name}"


def describe_peer(sock: socket.socket) -> str:
    try:
        peer = sock.getpeername()
    except OSError:
        return "?"
    if isinstance(peer, tuple):
        return f"{peer[0]}:{peer[1]}"
    return f"unix:{peer or sock.getsockname() or '?'}"
