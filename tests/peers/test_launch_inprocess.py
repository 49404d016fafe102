"""In-process launcher: nbdref's Server behind the same start_server() contract."""

from __future__ import annotations

from pathlib import Path

import pytest

from fixtures.exports import ExportRequest
from fixtures.launch import start_server
from fixtures.launchers.base import PeerStartError
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
