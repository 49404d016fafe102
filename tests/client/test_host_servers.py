"""tests.helpers.servers: readiness is the greeting, stop() leaves no process or socket behind."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from tests.helpers.servers import (
    ServerStartError,
    _alive,
    _children,
    start_nbd_server,
    start_nbdkit,
    start_qemu_nbd,
    wait_for_greeting,
)


def greeting(address: str | tuple[str, int]) -> bytes:
    family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
    with socket.socket(family) as s:
        s.settimeout(5)
        s.connect(address)
        return s.recv(8, socket.MSG_WAITALL)


@pytest.mark.parametrize("tcp", [False, True], ids=["unix", "tcp"])
def test_each_server_greets_and_stops(disk: Path, workdir: Path, tcp: bool) -> None:
    for start in (
        lambda: start_qemu_nbd(disk, workdir=workdir, tcp=tcp),
        lambda: start_nbdkit("memory", "1M", workdir=workdir, tcp=tcp),
        lambda: start_nbd_server(disk, workdir=workdir, tcp=tcp),
    ):
        server = start()
        pids = [server.process.pid] + ([server.daemon_pid] if server.daemon_pid else [])
        assert greeting(server.address) == b"NBDMAGIC"
        # qemu-nbd is --persistent: the readiness probe did not use it up, nor did our probe.
        assert greeting(server.address) == b"NBDMAGIC"
        daemon_children = _children(server.daemon_pid) if server.daemon_pid else []
        server.stop()
        server.stop()  # idempotent
        assert not any(_alive(pid) for pid in pids + daemon_children), server.name
        if not tcp:
            assert not os.path.exists(server.address)
        with pytest.raises(OSError):
            greeting(server.address)


def test_stale_socket_is_replaced(workdir: Path, disk: Path) -> None:
    stale = workdir / "nbd-server.sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(stale))  # a socket file nobody listens on
    with start_nbd_server(disk, workdir=workdir) as server:
        assert greeting(server.address) == b"NBDMAGIC"


def test_failure_carries_the_log(workdir: Path) -> None:
    with pytest.raises(ServerStartError, match="nbdkit") as info:
        start_nbdkit("no-such-plugin", workdir=workdir, timeout=3)
    assert "no-such-plugin" in str(info.value)


def test_wait_for_greeting_times_out(workdir: Path) -> None:
    with pytest.raises(ServerStartError, match="no NBDMAGIC"):
        wait_for_greeting(str(workdir / "nothing.sock"), timeout=0.2)


def test_tcp_port_race_is_retried(disk: Path, workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import tests.helpers.servers as servers

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))  # bound, not listening: the server's bind fails, a probe is refused
    real = servers.free_tcp_port
    handed: list[int] = []

    def first_taken() -> int:
        handed.append(taken.getsockname()[1] if not handed else real())
        return handed[-1]

    monkeypatch.setattr(servers, "free_tcp_port", first_taken)
    with taken:
        for start in (
            lambda: start_qemu_nbd(disk, workdir=workdir, tcp=True),
            lambda: start_nbdkit("memory", "1M", workdir=workdir, tcp=True),
            lambda: start_nbd_server(disk, workdir=workdir, tcp=True),
        ):
            handed.clear()
            with start() as server:
                assert len(handed) == 2 and server.address == ("127.0.0.1", handed[1])
                assert greeting(server.address) == b"NBDMAGIC"
