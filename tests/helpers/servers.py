"""Start and stop host NBD servers (qemu-nbd, nbdkit, nbd-server) for the harness's own tests.

Standalone on purpose (no pytest, no Docker): a test does

    with start_nbdkit("memory", "64M", workdir=tmp_path) as server:
        client.connect_uri(server.uri)

and the server is stopped on exit, even when the test fails; an atexit hook stops anything left over.
Readiness is the 8-byte NBDMAGIC greeting (research/docker-spike.md § 4): pid files are written after
listening for qemu-nbd and nbdkit but nbd-server's is unreliable, and reading only the greeting does not
use up a qemu-nbd started with --persistent (always given here).  Socket paths are unlinked first (a
stale nbd-server socket makes it stay up without listening).

Lifetimes: qemu-nbd and nbdkit are direct children (nbdkit with -f; Debian's nbdkit 1.32 exits when its
parent exits, so keep the starting process alive).  nbd-server forks into the background (with -d it
serves only one connection), so it is stopped by the pid in its pid file, together with its
per-connection children.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

__all__ = [
    "HostServer",
    "ServerStartError",
    "free_tcp_port",
    "start_nbd_server",
    "start_nbdkit",
    "start_qemu_nbd",
    "wait_for_greeting",
]

NBDMAGIC = b"NBDMAGIC"
START_TIMEOUT = 10.0
_RUNNING: set[HostServer] = set()


class ServerStartError(RuntimeError):
    """The server exited or never greeted; the message carries its log."""


@dataclass(eq=False)
class HostServer:
    """A running server.  `uri` is an NBD URI for it, with TLS parameters when TLS is on."""

    name: str
    argv: list[str]
    process: subprocess.Popen[bytes]
    address: str | tuple[str, int]
    export_name: str
    uri: str
    log_path: Path
    tls: str | None = None  # None, "x509" or "psk"
    pid_file: Path | None = None
    daemon_pid: int | None = None  # nbd-server's background process
    extra: dict[str, Any] = field(default_factory=dict)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the server and every process it started; safe to call twice."""
        _RUNNING.discard(self)
        if self.daemon_pid is not None:
            _stop_daemon(self.daemon_pid, timeout)
            self.daemon_pid = None
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout)
        if isinstance(self.address, str):
            with contextlib.suppress(OSError):
                os.unlink(self.address)

    def __enter__(self) -> HostServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _stop_all() -> None:
    for server in list(_RUNNING):
        server.stop()


atexit.register(_stop_all)


def free_tcp_port() -> int:
    """A port on 127.0.0.1 that was free a moment ago (the server binds it right after)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_greeting(
    address: str | tuple[str, int], *, timeout: float = START_TIMEOUT, alive: Callable[[], bool] | None = None
) -> None:
    """Poll until a connection to `address` reads NBDMAGIC; raise ServerStartError on timeout, or as
    soon as `alive()` says the server is gone (e.g. it could not bind: the port was taken)."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        if alive is not None and not alive():
            raise ServerStartError("server exited before greeting (address in use?)")
        family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
        if not isinstance(address, str) and ":" in address[0]:
            family = socket.AF_INET6
        try:
            with socket.socket(family, socket.SOCK_STREAM) as s:
                s.settimeout(max(0.1, min(2.0, deadline - time.monotonic())))
                s.connect(address)
                data = b""
                while len(data) < 8:
                    chunk = s.recv(8 - len(data))
                    if not chunk:
                        break
                    data += chunk
                if data == NBDMAGIC:
                    return
                last = f"read {data!r}"
        except OSError as exc:
            last = exc
        time.sleep(0.02)
    raise ServerStartError(f"no NBDMAGIC from {address} within {timeout}s (last: {last})")


def _spawn(name: str, argv: list[str], workdir: Path, **popen: Any) -> tuple[subprocess.Popen[bytes], Path]:
    log_path = workdir / f"{name}.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, **popen)
    return process, log_path


def _listen(workdir: Path, name: str, tcp: bool) -> str | tuple[str, int]:
    if tcp:
        return ("127.0.0.1", free_tcp_port())
    path = workdir / f"{name}.sock"
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    if len(str(path).encode()) > 100:
        raise ValueError(f"socket path too long for AF_UNIX: {path}")
    return str(path)


def _uri(address: str | tuple[str, int], export: str, tls: str | None, material: Any, user: bool = True) -> str:
    from urllib.parse import quote

    scheme = "nbds" if tls else "nbd"
    params: list[str] = []
    userinfo = ""
    if tls == "x509":
        params.append(f"tls-certificates={material.x509_dir}")
    elif tls == "psk":
        params.append(f"tls-psk-file={material.psk_file}")
        userinfo = f"{material.psk_identity}@" if user else ""
    if isinstance(address, str):
        params.insert(0, f"socket={address}")
        base = f"{scheme}+unix://{userinfo}/{quote(export)}"
    else:
        base = f"{scheme}://{userinfo}{address[0]}:{address[1]}/{quote(export)}"
    return base + ("?" + "&".join(params) if params else "")


def _finish(server: HostServer, timeout: float) -> HostServer:
    _RUNNING.add(server)
    try:
        daemon = server.daemon_pid
        alive = (lambda: _alive(daemon)) if daemon is not None else (lambda: server.process.poll() is None)
        wait_for_greeting(server.address, timeout=timeout, alive=alive)
    except ServerStartError as exc:
        server.stop()
        raise ServerStartError(f"{server.name}: {exc}\nargv: {server.argv}\nlog:\n{server.log()}") from None
    return server


_F = TypeVar("_F", bound=Callable[..., HostServer])


def _retry_port_races(start: _F) -> _F:
    """TCP ports come from free_tcp_port(): another process may take one before the server binds it.
    Start again (up to 3 times) when the server says so."""

    @functools.wraps(start)
    def wrapper(*args: Any, **kwargs: Any) -> HostServer:
        for attempt in range(3):
            try:
                return start(*args, **kwargs)
            except ServerStartError as exc:
                if not kwargs.get("tcp") or "address in use" not in str(exc) or attempt == 2:
                    raise
        raise AssertionError("unreachable")

    return wrapper  # type: ignore[return-value]


@_retry_port_races
def start_qemu_nbd(
    image: str | os.PathLike[str],
    *,
    workdir: str | os.PathLike[str],
    export: str = "exp",
    fmt: str = "raw",
    tcp: bool = False,
    tls: str | None = None,
    material: Any = None,
    read_only: bool = False,
    extra_args: Sequence[str] = (),
    timeout: float = START_TIMEOUT,
) -> HostServer:
    """qemu-nbd serving `image` (always --persistent).  `tls` "x509" (verify-peer=on) or "psk" needs a
    fixtures.tls_material.TlsMaterial as `material`.  extra_args e.g. ("-A",) or ("-B", "bitmap0")."""
    work = Path(workdir)
    address = _listen(work, "qemu-nbd", tcp)
    argv = ["qemu-nbd", "--persistent", "-f", fmt, "-x", export, "--pid-file", str(work / "qemu-nbd.pid")]
    argv += ["-b", address[0], "-p", str(address[1])] if isinstance(address, tuple) else ["-k", address]
    if tls == "x509":
        argv += ["--object", f"tls-creds-x509,id=tls0,endpoint=server,dir={material.x509_dir},verify-peer=on"]
        argv += ["--tls-creds", "tls0"]
    elif tls == "psk":
        argv += ["--object", f"tls-creds-psk,id=tls0,endpoint=server,dir={material.psk_dir}", "--tls-creds", "tls0"]
    if read_only:
        argv.append("--read-only")
    argv += [*extra_args, str(image)]
    process, log = _spawn("qemu-nbd", argv, work)
    server = HostServer("qemu-nbd", argv, process, address, export, _uri(address, export, tls, material), log, tls)
    return _finish(server, timeout)


@_retry_port_races
def start_nbdkit(
    plugin: str,
    *plugin_args: str,
    workdir: str | os.PathLike[str],
    export: str = "",
    tcp: bool = False,
    tls: str | None = None,
    material: Any = None,
    extra_args: Sequence[str] = (),
    timeout: float = START_TIMEOUT,
) -> HostServer:
    """nbdkit -f PLUGIN ARGS (e.g. "memory", "64M").  nbdkit serves any export name for most plugins;
    `export` only goes into the URI.  TLS is --tls=require (+ --tls-verify-peer for X.509)."""
    work = Path(workdir)
    address = _listen(work, "nbdkit", tcp)
    pid_file = work / "nbdkit.pid"
    argv = ["nbdkit", "-f", "-P", str(pid_file)]
    argv += ["-i", address[0], "-p", str(address[1])] if isinstance(address, tuple) else ["-U", address]
    if tls == "x509":
        argv += ["--tls=require", f"--tls-certificates={material.x509_dir}", "--tls-verify-peer"]
    elif tls == "psk":
        argv += ["--tls=require", f"--tls-psk={material.psk_file}"]
    argv += [*extra_args, plugin, *plugin_args]
    process, log = _spawn("nbdkit", argv, work)
    server = HostServer("nbdkit", argv, process, address, export, _uri(address, export, tls, material), log, tls)
    server.pid_file = pid_file
    return _finish(server, timeout)


@_retry_port_races
def start_nbd_server(
    image: str | os.PathLike[str],
    *,
    workdir: str | os.PathLike[str],
    export: str = "exp",
    tcp: bool = False,
    tls: str | None = None,
    material: Any = None,
    generic_extra: str = "",
    export_extra: str = "",
    timeout: float = START_TIMEOUT,
) -> HostServer:
    """nbd-server with a generated config file (allowlist on, one export).  TLS: X.509 only
    (force_tls); nbd-server 3.24 has no PSK."""
    if tls not in (None, "x509"):
        raise ValueError("nbd-server supports only X.509 TLS")
    work = Path(workdir)
    address = _listen(work, "nbd-server", tcp)
    pid_file = work / "nbd-server.pid"
    with contextlib.suppress(FileNotFoundError):
        pid_file.unlink()
    generic = ["[generic]", "allowlist = true"]
    if isinstance(address, tuple):
        generic += [f"listenaddr = {address[0]}", f"port = {address[1]}"]
    else:
        generic += [f"unixsock = {address}"]
    if tls:
        generic.append(material.nbd_server_config().strip())
    if generic_extra:
        generic.append(generic_extra.strip())
    config = "\n".join([*generic, "", f"[{export}]", f"exportname = {Path(image).resolve()}", export_extra.strip(), ""])
    config_path = work / "nbd-server.conf"
    config_path.write_text(config)
    argv = ["nbd-server", "-C", str(config_path), "-p", str(pid_file)]
    process, log = _spawn("nbd-server", argv, work)
    try:
        process.wait(timeout)  # the foreground process exits once the daemon has forked
    except subprocess.TimeoutExpired:
        pass
    server = HostServer("nbd-server", argv, process, address, export, _uri(address, export, tls, material), log, tls)
    server.pid_file = pid_file
    server.extra["config"] = config
    _RUNNING.add(server)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and server.daemon_pid is None:
        with contextlib.suppress(OSError, ValueError):
            server.daemon_pid = int(pid_file.read_text().strip())
        if server.daemon_pid is None:
            time.sleep(0.02)
    if server.daemon_pid is None:
        server.stop()
        raise ServerStartError(f"nbd-server wrote no pid file\nconfig:\n{config}\nlog:\n{server.log()}")
    return _finish(server, timeout)


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        # "pid (comm) state ppid ...": comm may hold spaces, so split after the last ')'
        fields = stat.rsplit(")", 1)[-1].split()
        if len(fields) > 1 and int(fields[1]) == pid:
            found.append(int(entry))
    return found


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return False


def _stop_daemon(pid: int, timeout: float) -> None:
    """SIGTERM a background server and its children, then SIGKILL what is left after `timeout`."""
    victims = [pid, *_children(pid)]
    for victim in victims:
        with contextlib.suppress(ProcessLookupError):
            os.kill(victim, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(_alive(v) for v in victims):
        time.sleep(0.02)
    for victim in victims:
        if _alive(victim):
            with contextlib.suppress(ProcessLookupError):
                os.kill(victim, signal.SIGKILL)
