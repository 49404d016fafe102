"""In-process launcher: nbdref's Server behind the same start_server() contract."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from fixtures.exports import ExportRequest
from fixtures.launch import start_server
from fixtures.launchers.base import PeerStartError
from fixtures.launchers.inprocess import reference_spec
from fixtures.peerspec import PeerSpec

from .helpers import assert_serves


def spec(**kw) -> PeerSpec:
    return PeerSpec(id="nbdref-server", implementation="nbdref", role="server", version="0",
                    launcher="in-process", **kw)


@pytest.fixture(autouse=True)
def _nbdref_server() -> None:
    try:
        import nbdref.server  # noqa: F401
    except Exception as e:
        pytest.skip(f"nbdref.server does not import yet: {e!r}")


@pytest.mark.parametrize("transport", ["unix", "tcp"])
def test_inprocess_serves_requested_bytes(transport: str, tmp_path: Path) -> None:
    req = ExportRequest(size=256 * 1024, content="pattern")
    with start_server(spec(options=(("transport", transport),)), req, workdir=tmp_path) as s:
        assert s.transport == transport
        assert s.uri.startswith("nbd+unix://" if transport == "unix" else "nbd://127.0.0.1:")
        assert_serves(s, req)
    assert not s.alive()


def test_inprocess_rejects_qcow2(tmp_path: Path) -> None:
    with pytest.raises(PeerStartError, match="raw"):  # PeerUnsupported is a PeerStartError
        start_server(spec(), ExportRequest(size=4096, image_format="qcow2"), workdir=tmp_path)


def test_nbdref_as_local_process(tmp_path: Path) -> None:
    """The same server through the local launcher (python -m nbdref serve in its own process group)."""
    req = ExportRequest(size=256 * 1024, content=b"nbdref", read_only=True)
    with start_server(spec().__class__(id="nbdref-local", implementation="nbdref", role="server", version="0",
                                       launcher="local"), req, workdir=tmp_path) as s:
        assert s.handle.pid and s.alive()
        assert_serves(s, req)
    assert not s.alive()


def test_inprocess_log_tail_has_records_violations_and_transcript(tmp_path: Path) -> None:
    """The in-process server logs through `logging` only: the launcher writes srv.records into
    log_path, so log_tail() (and so the evidence on reports) shows the server side."""
    import socket

    with start_server(reference_spec(), ExportRequest(size=65536), workdir=tmp_path) as s:
        with socket.socket(socket.AF_UNIX) as c:
            c.connect(str(s.socket))
            assert c.recv(18).startswith(b"NBDMAGIC")
            c.sendall(b"\xff\xff\xff\xff")          # undefined client flags: a client violation
            c.settimeout(5)
            assert c.recv(1) == b""                  # the server hangs up
        s.handle.wait_for_connections(2, timeout=5)   # readiness probe + ours
        tail = s.log_tail()
        assert "== connection" in tail and "undefined client flags" in tail
        assert "C: client_flags=0xffffffff" in tail                # transcript
        assert "violation: HS-016" in tail                         # violations, one per line
        assert "ended: " in tail                                   # reason
    assert "violation: HS-016" in s.log_tail(), "the log stays after stop()"


def _fd_count() -> int:
    return len(list(Path("/proc/self/fd").iterdir()))


def test_inprocess_start_stop_does_not_leak_fds(tmp_path: Path) -> None:
    req = ExportRequest(size=65536)
    with start_server(reference_spec(), req, workdir=tmp_path / "warm"):
        pass                                         # imports, caches
    before = _fd_count()
    for i in range(20):
        start_server(reference_spec(), req, workdir=tmp_path / f"s{i}").stop()
    assert _fd_count() - before <= 2, "a file descriptor leaks per in-process start"


def test_inprocess_failed_start_closes_the_backend(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import nbdref.server as api

    def broken(*a, **kw):
        raise RuntimeError("boom")

    req = ExportRequest(size=65536)
    with start_server(reference_spec(), req, workdir=tmp_path / "warm"):
        pass
    monkeypatch.setattr(api, "Server", broken)
    before = _fd_count()
    for i in range(10):
        with pytest.raises(PeerStartError, match="boom"):
            start_server(reference_spec(), req, workdir=tmp_path / f"s{i}")
    assert _fd_count() - before <= 2


@pytest.mark.parametrize("fault", ["wrong-greeting-magic", "disconnect-handshake:4"])
@pytest.mark.parametrize("launcher", ["in-process", "local"])
def test_handshake_faults_start(fault: str, launcher: str, tmp_path: Path) -> None:
    """A matrix row `options: {fault: NAME}` with a handshake fault starts: readiness is a connect."""
    from fixtures.readiness import probe_greeting

    sp = replace(reference_spec(fault=fault, ready_timeout=10), id=f"nbdref-{launcher}", launcher=launcher)
    with start_server(sp, ExportRequest(size=65536), workdir=tmp_path) as s:
        assert s.alive()
        try:
            got = probe_greeting(unix=s.socket, timeout=2)
        except (OSError, ConnectionError):
            got = b""                                # disconnect-handshake:4 closes after 4 bytes
        assert got != b"NBDMAGIC", "the fault is in effect"


@pytest.mark.parametrize("transport", ["unix", "tcp"])
def test_start_reference_is_start_server_of_the_reference_spec(transport: str, tmp_path: Path) -> None:
    """start_reference: a reference server outside the matrix (persona nbdref.personas.DEFAULT) through
    the same start_server path; its handle is the nbdref Server, whose records show the connections."""
    from nbdref.personas import DEFAULT

    from fixtures.launchers.inprocess import start_reference

    assert reference_spec().persona == DEFAULT and reference_spec().id == f"nbdref-server[{DEFAULT}]"
    assert reference_spec("qemu-2.10", transport="tcp").options == (("transport", "tcp"),)
    req = ExportRequest(size=256 * 1024, content="pattern", read_only=True)
    with start_reference(req, workdir=tmp_path, transport=transport) as s:
        assert s.transport == transport and s.spec == reference_spec(transport=transport)
        assert s.handle.persona.name == DEFAULT
        before = len(s.handle.records)
        assert_serves(s, req)
        assert len(s.handle.records) > before
