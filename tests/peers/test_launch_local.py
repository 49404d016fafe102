"""Local launcher: each server kind starts, serves the requested bytes, and stops without leftovers;
crashing and hanging peers fail in bounded time with their log."""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import time
from pathlib import Path

import pytest

from fixtures.exports import ExportRequest
from fixtures.launch import client_runner, start_server
from fixtures.launchers.base import PeerDiedError, PeerStartError, PeerUnsupported, RunningServer
from fixtures.peerspec import PeerSpec
from fixtures.readiness import probe_greeting
from fixtures.runs import ProcId, current_run, proc_start_time

from .helpers import assert_serves, custom_spec, server_spec

SERVERS = ["qemu-nbd", "qemu-storage-daemon", "nbdkit", "nbd-server"]
LOCAL_CLIENT = PeerSpec(id="host-tools", implementation="nbdinfo", role="client", version="", launcher="local")


def need(binary: str) -> None:
    if not shutil.which(binary):
        pytest.skip(f"{binary} is not installed on the host")


def recorded_pids() -> set[int]:
    """Process groups this process recorded in the run dir (other xdist workers record there too)."""
    me, found = str(ProcId.me()), set()
    for path in current_run().procs_dir.glob("*.json"):
        with contextlib.suppress(FileNotFoundError, ValueError):   # another worker may remove its record
            record = json.loads(path.read_text())
            if record.get("creator") == me:
                found.add(record["pid"])
    return found


def greeting(server: RunningServer) -> bytes:
    """The first 8 bytes a new connection reads (raises OSError once the server is gone)."""
    return probe_greeting(unix=server.socket, port=server.port, timeout=5)


@pytest.mark.parametrize("transport", ["unix", "tcp"])
@pytest.mark.parametrize("impl", SERVERS)
def test_start_serve_stop(impl: str, transport: str, tmp_path: Path) -> None:
    need(impl)
    req = ExportRequest(size=1 << 20, content="pattern")
    before = recorded_pids()
    server = start_server(server_spec(impl, options=(("transport", transport),)), req, workdir=tmp_path)
    with server:
        assert server.alive()
        if transport == "unix":
            assert server.uri.startswith("nbd+unix:///exp?socket=")
        else:
            assert server.uri == f"nbd://127.0.0.1:{server.port}/exp" and server.socket is None
        # The readiness probe did not use the export up (qemu-nbd is --persistent), nor does ours.
        assert greeting(server) == greeting(server) == b"NBDMAGIC"
        assert impl.split("-")[0] in server.versions["binary"].lower() or "nbd-server" in server.versions["binary"]
        assert server.versions["package"]
        new = recorded_pids() - before
        assert new, "the peer's process group must be recorded for sweeps"
        assert_serves(server, req)
    server.stop()                                   # idempotent
    assert not server.alive()
    assert server.socket is None or not server.socket.exists()
    assert all(proc_start_time(p) is None for p in new), "stop() must leave no process behind"
    assert recorded_pids() == before
    with pytest.raises(OSError):
        greeting(server)


@pytest.mark.parametrize("impl", ["qemu-nbd", "nbdkit", "nbd-server"])
def test_read_only_refuses_writes(impl: str, tmp_path: Path) -> None:
    need(impl)
    with start_server(server_spec(impl), ExportRequest(size=1 << 20, read_only=True), workdir=tmp_path) as s:
        runner = client_runner(LOCAL_CLIENT, workdir=tmp_path)
        res = runner.run(runner.tool_argv("qemu-io", s, "-c", "write -P 1 0 4096", read_only=False), timeout=20)
        assert res.rc != 0 or "failed" in (res.stdout + res.stderr).lower(), res


def test_seeded_content_and_tcp(tmp_path: Path) -> None:
    need("nbdkit")
    req = ExportRequest(size=256 * 1024, content=b"seed-1")
    spec = server_spec("nbdkit", options=(("transport", "tcp"),))
    with start_server(spec, req, workdir=tmp_path) as s:
        assert s.transport == "tcp" and s.uri.startswith("nbd://127.0.0.1:")
        assert_serves(s, req)


@pytest.mark.parametrize("impl", ["qemu-nbd", "qemu-storage-daemon"])
def test_qcow2_bitmaps_and_allocation_depth(impl: str, tmp_path: Path) -> None:
    need(impl)
    req = ExportRequest(size=1 << 20, image_format="qcow2", dirty_bitmaps=("b0",), allocation_depth=True)
    with start_server(server_spec(impl), req, workdir=tmp_path) as s:
        runner = client_runner(LOCAL_CLIENT, workdir=tmp_path)
        res = runner.run(runner.tool_argv("nbdinfo", s, "--json"), timeout=20)
        assert res.ok, res.stderr
        contexts = json.loads(res.stdout)["exports"][0]["contexts"]
        assert "qemu:dirty-bitmap:b0" in contexts and "qemu:allocation-depth" in contexts, contexts


def test_crashing_peer_fails_fast_with_log(tmp_path: Path) -> None:
    t0 = time.monotonic()
    with pytest.raises(PeerStartError) as err:
        start_server(custom_spec("sh", "-c", "echo boom on {socket} >&2; exit 3"), ExportRequest(size=4096),
                     workdir=tmp_path, timeout=10)
    assert time.monotonic() - t0 < 3, "an exited peer must not wait for the readiness timeout"
    assert "boom on" in err.value.log_tail and "exit code 3" in str(err.value)


def test_hanging_peer_fails_in_bounded_time(tmp_path: Path) -> None:
    before = recorded_pids()
    t0 = time.monotonic()
    with pytest.raises(PeerStartError) as err:
        start_server(custom_spec("sh", "-c", "echo $$ > {workdir}/pid; echo hanging; exec sleep 1000"),
                     ExportRequest(size=4096), workdir=tmp_path, timeout=1.5)
    assert 1.4 < time.monotonic() - t0 < 6
    assert "no NBDMAGIC greeting within 1.5 s" in str(err.value) and "hanging" in err.value.log_tail
    pid = int((tmp_path / "pid").read_text())
    assert proc_start_time(pid) is None, "the hanging peer must be killed"
    assert recorded_pids() == before


def test_peer_that_dies_later_is_reported(tmp_path: Path) -> None:
    need("nbdkit")
    s = start_server(server_spec("nbdkit"), ExportRequest(size=4096), workdir=tmp_path)
    try:
        s.check()
        s.handle.kill()
        s.handle.wait(timeout=5)
        with pytest.raises(PeerDiedError, match="exited unexpectedly"):
            s.check()
    finally:
        s.stop()


@pytest.mark.parametrize("impl", ["nbdkit", "nbd-server"])
def test_stale_socket_is_replaced(impl: str, tmp_path: Path) -> None:
    # nbdkit would exit (Address already in use); nbd-server would stay up without listening.
    need(impl)
    with socket.socket(socket.AF_UNIX) as stale:
        stale.bind(str(tmp_path / "nbd.sock"))      # a socket file nobody listens on
    with start_server(server_spec(impl), ExportRequest(size=4096), workdir=tmp_path) as s:
        assert s.alive() and greeting(s) == b"NBDMAGIC"


def test_unsupported_combination_is_distinct(tmp_path: Path) -> None:
    with pytest.raises(PeerUnsupported):
        start_server(server_spec("nbd-server"), ExportRequest(size=4096, image_format="qcow2"), workdir=tmp_path)


def test_unknown_placeholder_is_explained(tmp_path: Path) -> None:
    with pytest.raises(PeerStartError, match="unknown placeholder"):
        start_server(custom_spec("sh", "{sockett}"), ExportRequest(size=4096), workdir=tmp_path)


def test_custom_peer_with_a_missing_binary_is_an_error(tmp_path: Path) -> None:
    """The user named this command: a typo must fail loudly, not skip quietly (host peers do skip)."""
    with pytest.raises(PeerStartError, match="no-such-srv is not installed") as caught:
        start_server(custom_spec("no-such-srv", "{socket}"), ExportRequest(size=4096), workdir=tmp_path)
    assert not isinstance(caught.value, PeerUnsupported)


@pytest.mark.parametrize("impl", ["qemu-nbd", "nbdkit", "nbd-server"])
def test_tcp_port_taken_meanwhile_is_retried(impl: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """free_port() races with other processes: a peer that finds its port taken is retried on another."""
    import fixtures.launch as launch

    need(impl)
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        taken = blocker.getsockname()[1]
        ports, real = [taken], launch.free_port
        monkeypatch.setattr(launch, "free_port", lambda: ports.pop() if ports else real())
        spec = server_spec(impl, options=(("transport", "tcp"),))
        with start_server(spec, ExportRequest(size=4096), workdir=tmp_path, timeout=5) as s:
            assert s.port != taken and not ports
            assert s.alive() and greeting(s) == b"NBDMAGIC"


FAKE_GREETER = r"""
import os, signal, socket, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)      # a peer that will not stop politely
s = socket.socket(socket.AF_UNIX)
s.bind(sys.argv[1]); s.listen(8)
open(sys.argv[2], "w").write(str(os.getpid()))
while True:
    c, _ = s.accept(); c.sendall(b"NBDMAGIC"); c.close()
"""


def test_peer_ignoring_sigterm_is_killed_in_bounded_time(tmp_path: Path) -> None:
    import sys

    script = tmp_path / "greeter.py"
    script.write_text(FAKE_GREETER)
    s = start_server(custom_spec(sys.executable, str(script), "{socket}", "{workdir}/pid"), ExportRequest(size=4096),
                     workdir=tmp_path)
    pid = int((tmp_path / "pid").read_text())
    t0 = time.monotonic()
    s.stop()
    assert time.monotonic() - t0 < 5
    assert proc_start_time(pid) is None


def test_host_nbdsh_uses_debian_python(tmp_path: Path) -> None:
    """nbdsh runs `python3 -m nbd`: with a pyenv/venv python3 first in PATH it would not find libnbd."""
    need("nbdsh")
    need("nbdkit")
    with start_server(server_spec("nbdkit"), ExportRequest(size=64 * 1024), workdir=tmp_path) as s:
        runner = client_runner(LOCAL_CLIENT, workdir=tmp_path)
        res = runner.run(runner.tool_argv("nbdsh", s, "-c", "print(h.get_size())"), timeout=20)
        assert res.ok and res.stdout.strip() == str(64 * 1024), res.stderr
