"""Docker launcher on the bookworm image (and bullseye for qemu 5.2 quirks): start, serve, stop,
crash, hang, warm client containers."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from fixtures.exports import ExportRequest
from fixtures.images import docker_available
from fixtures.launch import client_runner, export_workdir, start_server
from fixtures.launchers.base import PeerStartError
from fixtures.peerspec import PeerSpec
from fixtures.runs import CREATOR_LABEL, RUN_LABEL, ProcId, _docker_ps, current_run

from .helpers import assert_serves, custom_spec, server_spec

pytestmark = pytest.mark.docker

SUITE = "bookworm"
SERVERS = ["qemu-nbd", "qemu-storage-daemon", "nbdkit", "nbd-server"]


@pytest.fixture(autouse=True)
def _docker() -> None:
    ok, why = docker_available()
    if not ok:
        pytest.skip(why)


def run_containers() -> set[str]:
    """Containers of this run started by this process (xdist workers share the run)."""
    return {c["id"] for c in _docker_ps([f"label={RUN_LABEL}={current_run().run_id}",
                                         f"label={CREATOR_LABEL}={ProcId.me()}"])}


def tcp_listen_ports(container_id: str) -> set[int]:
    """The TCP ports the container's processes listen on.  Server containers share the host's network
    (a namespace each cost more CPU than the rest of a container), so a server on a unix socket must
    listen on nothing else."""
    pids = subprocess.run(["docker", "top", container_id, "-eo", "pid"], capture_output=True, text=True,
                          timeout=30).stdout.split()[1:]
    inodes = set()
    for pid in pids:
        fds = Path(f"/proc/{pid}/fd")
        for fd in fds.iterdir() if fds.is_dir() else ():
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            f = line.split()
            if f[3] == "0A" and f[9] in inodes:           # LISTEN, one of theirs
                ports.add(int(f[1].rsplit(":", 1)[1], 16))
    return ports


@pytest.mark.parametrize("impl", SERVERS)
def test_server_in_container(impl: str) -> None:
    req = ExportRequest(size=1 << 20, content="pattern")
    before = run_containers()
    with start_server(server_spec(impl, "docker", SUITE), req, workdir=export_workdir(impl)) as s:
        assert s.alive() and s.handle in run_containers()
        assert "7.2" in s.versions.get("binary", "") or impl == "nbdkit" or impl == "nbd-server"
        assert s.versions["package"].split()[0] in ("qemu-utils", "qemu-system-common", "nbdkit", "nbd-server")
        assert_serves(s, req)
        assert s.transport == "unix" and tcp_listen_ports(s.handle) == set()
    assert not s.alive()
    assert run_containers() == before, "stop() must remove the container"


def test_qemu_52_tls_goes_over_tcp(tmp_path_factory: pytest.TempPathFactory) -> None:
    """bullseye's qemu-nbd: "TLS is only supported with IPv4/IPv6" -> --network host + 127.0.0.1."""
    from fixtures.tls_material import make_tls_material

    material = make_tls_material(current_run().workdir / "tls-bullseye")
    req = ExportRequest(size=1 << 20, tls="x509")
    with start_server(server_spec("qemu-nbd", "docker", "bullseye"), req, workdir=export_workdir("q52"),
                      tls=material) as s:
        assert s.transport == "tcp" and s.uri.startswith("nbds://127.0.0.1:")
        assert tcp_listen_ports(s.handle) == {s.port}        # what a unix server's check would see
        host = client_runner(PeerSpec(id="h", implementation="nbdinfo", role="client", version="",
                                      launcher="local"), workdir=s.workdir)
        res = host.run(host.tool_argv("nbdinfo", s, "--size"), timeout=20)
        assert res.ok and int(res.stdout) == req.size, res.stderr


def test_warm_client_container_reaches_other_suite_server() -> None:
    with start_server(server_spec("nbdkit", "docker", SUITE), ExportRequest(size=1 << 20),
                      workdir=export_workdir("cli")) as s:
        spec = PeerSpec(id="nbdinfo@bullseye", implementation="nbdinfo", role="client", version="",
                        launcher="docker", suite="bullseye")
        with client_runner(spec, workdir=s.workdir) as runner:
            res = runner.run(runner.tool_argv("nbdinfo", s, "--size"), timeout=20)
            assert res.ok and int(res.stdout) == 1 << 20, res.stderr
            ver = runner.run(["nbdinfo", "--version"], timeout=20)
            assert "1.6" in ver.stdout, "the client runs in the bullseye image"
            t0 = time.monotonic()
            late = runner.run(["sleep", "30"], timeout=1)
            assert late.timed_out and time.monotonic() - t0 < 5
        assert runner._runner.container_id not in run_containers()


def test_crashing_container_fails_fast_with_log() -> None:
    before = run_containers()
    t0 = time.monotonic()
    with pytest.raises(PeerStartError) as err:
        start_server(custom_spec("sh", "-c", "echo boom >&2; exit 3", launcher="docker", suite=SUITE),
                     ExportRequest(size=4096), workdir=export_workdir("crash"), timeout=10)
    assert time.monotonic() - t0 < 5
    assert "boom" in err.value.log_tail and "exit code 3" in str(err.value)
    assert run_containers() == before


def test_hanging_container_fails_in_bounded_time() -> None:
    before = run_containers()
    t0 = time.monotonic()
    with pytest.raises(PeerStartError, match=r"no NBDMAGIC greeting within 1\.5 s"):
        start_server(custom_spec("sleep", "1000", launcher="docker", suite=SUITE), ExportRequest(size=4096),
                     workdir=export_workdir("hang"), timeout=1.5)
    assert time.monotonic() - t0 < 8
    assert run_containers() == before


def test_socket_dir_outside_run_is_mounted(tmp_path: Path) -> None:
    if not shutil.which("nbdcopy"):
        pytest.skip("nbdcopy not installed on the host")
    req = ExportRequest(size=64 * 1024, content=b"x")
    with start_server(server_spec("qemu-nbd", "docker", SUITE), req, workdir=tmp_path) as s:
        assert_serves(s, req)


def test_libnbd_16_x509_goes_through_the_api() -> None:
    """bullseye's libnbd 1.6 has no tls-certificates= URI parameter: nbdsh gets the certificates via
    h.set_tls_certificates, so a server that verifies client certificates still accepts it."""
    from fixtures.tls_material import make_tls_material

    material = make_tls_material(current_run().workdir / "tls-libnbd16")
    req = ExportRequest(size=1 << 20, tls="x509", tls_verify_peer=True)
    with start_server(server_spec("nbdkit", "docker", SUITE), req, workdir=export_workdir("l16"), tls=material) as s:
        spec = PeerSpec(id="nbdinfo@bullseye", implementation="nbdinfo", role="client", version="",
                        launcher="docker", suite="bullseye")
        with client_runner(spec, workdir=s.workdir) as runner:
            assert runner.versions["libnbd-bin"].startswith("1.6")
            argv = runner.tool_argv("nbdsh", s, "-c", "print(h.get_size())")
            assert "-u" not in argv
            res = runner.run(argv, timeout=30)
            assert res.ok and res.stdout.strip() == str(req.size), res.stderr
            plain_uri = runner.run(["nbdinfo", "--size", s.uri], timeout=30)
            assert not plain_uri.ok, "libnbd 1.6 sends no client certificate from the URI (the quirk)"


def test_container_that_dies_is_reported() -> None:
    s = start_server(server_spec("nbdkit", "docker", SUITE), ExportRequest(size=4096), workdir=export_workdir("die"))
    try:
        s.check()
        import docker

        docker.from_env().containers.get(s.handle).kill()
        deadline = time.monotonic() + 10
        while s.alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        from fixtures.launchers.base import PeerDiedError

        with pytest.raises(PeerDiedError):
            s.check()
    finally:
        s.stop()
    assert s.handle not in run_containers()


def test_psk_from_a_client_container_of_another_suite() -> None:
    """trixie's qemu-io and nbdinfo against bookworm's qemu-nbd with TLS-PSK: the TLS material under
    the run dir is visible in the client container at the same path."""
    from fixtures.tls_material import make_tls_material

    material = make_tls_material(current_run().workdir / "tls-psk")
    req = ExportRequest(size=1 << 20, tls="psk", content="pattern")
    with start_server(server_spec("qemu-nbd", "docker", SUITE), req, workdir=export_workdir("psk"), tls=material) as s:
        spec = PeerSpec(id="qemu-io@trixie", implementation="qemu-io", role="client", version="", launcher="docker",
                        suite="trixie")
        with client_runner(spec, workdir=s.workdir) as runner:
            qio = runner.run(runner.tool_argv("qemu-io", s, "-c", "read -P 0 0 512", "-c", "read 512 512"),
                             timeout=30)
            assert qio.ok and "read 512/512 bytes at offset 512" in qio.stdout, qio.stdout + qio.stderr
            info = runner.run(runner.tool_argv("nbdinfo", s, "--size"), timeout=30)
            assert info.ok and int(info.stdout) == req.size, info.stderr


def test_qemu_52_storage_daemon_psk_over_tcp() -> None:
    from fixtures.tls_material import make_tls_material

    material = make_tls_material(current_run().workdir / "tls-qsd52")
    req = ExportRequest(size=1 << 20, tls="psk", content="pattern")
    with start_server(server_spec("qemu-storage-daemon", "docker", "bullseye"), req, workdir=export_workdir("qsd"),
                      tls=material) as s:
        assert s.transport == "tcp" and s.uri.startswith(f"nbds://{material.psk_identity}@127.0.0.1:")
        assert_serves(s, req)


@pytest.mark.parametrize("suite", ["bullseye", "bookworm", "trixie", "sid"])
def test_warm_client_commands_go_through_the_agent(suite: str) -> None:
    """Every suite's python3 (3.9 on bullseye) runs the command agent, so a command costs no docker exec;
    the command still runs in the container (its image's tools, its hostname)."""
    spec = PeerSpec(id=f"qemu-io@{suite}", implementation="qemu-io", role="client", version="",
                    launcher="docker", suite=suite)
    with client_runner(spec, workdir=export_workdir(f"agent-{suite}")) as runner:
        inner = runner._runner
        assert inner.agent is not None, inner.agent_note
        r = runner.run(["sh", "-c", "cat /etc/hostname; qemu-img --version"], timeout=20)
        assert r.ok, r.stderr
        assert inner.agent is not None, f"the command did not go through the agent: {inner.agent_note}"
        hostname = inner._container.attrs["Config"]["Hostname"]
        assert r.stdout.splitlines()[0] == hostname and "qemu-img version" in r.stdout


def test_a_lost_agent_fails_that_command_once_and_docker_exec_takes_over() -> None:
    """The agent dies during a command: that command is a failure that says so (it may have run, so it is
    not run again), the container lives on (`sleep infinity`), and later commands go through docker exec."""
    spec = PeerSpec(id="nbdinfo@bookworm", implementation="nbdinfo", role="client", version="",
                    launcher="docker", suite="bookworm")
    with client_runner(spec, workdir=export_workdir("agent-gone")) as runner:
        inner = runner._runner
        assert inner.agent is not None, inner.agent_note
        # timeout -> sh: the agent is sh's grandparent
        kill = 'echo ran >> /tmp/count; agent=$(cut -d" " -f4 /proc/$PPID/stat); kill -9 "$agent"; sleep 1'
        lost = runner.run(["sh", "-c", kill], timeout=20)
        assert not lost.ok and "agent was lost" in lost.stderr, lost
        later = runner.run(["sh", "-c", "cat /tmp/count; nbdinfo --version"], timeout=20)
        assert later.ok and later.stdout.splitlines()[0] == "ran" and "nbdinfo" in later.stdout, later
        assert later.stdout.count("ran") == 1, "the lost command ran once, not again"
        assert inner.agent is None and "docker exec" in inner.agent_note


def test_a_followed_log_is_current_and_its_end_says_the_container_exited(tmp_path: Path) -> None:
    """LogFollower: what the container prints later reaches the log file without asking dockerd again, and
    the stream ends (alive() false) when the container exits."""
    from fixtures.images import ensure_image
    from fixtures.launchers.docker import LogFollower, docker_client

    image = ensure_image(SUITE).tag
    container = docker_client().containers.run(image, ["sh", "-c", "echo one; sleep 1; echo two >&2; sleep 2"],
                                               detach=True, network_mode="none", labels=current_run().labels())
    try:
        follower = LogFollower(container, tmp_path / "log")
        assert follower.started
        deadline = time.monotonic() + 10
        while "two" not in (tmp_path / "log").read_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert (tmp_path / "log").read_text() == "one\ntwo\n" and follower.following()
        deadline = time.monotonic() + 10
        while follower.following() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not follower.following(), "the stream did not end with the container"
    finally:
        container.remove(force=True)
