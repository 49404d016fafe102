"""Small helpers shared by the peer tests."""

from __future__ import annotations

import subprocess
from pathlib import Path

from fixtures.exports import ExportRequest, expected_bytes
from fixtures.launchers.base import RunningServer
from fixtures.peerspec import PeerSpec


def server_spec(impl: str, launcher: str = "local", suite: str | None = None, **kw) -> PeerSpec:
    return PeerSpec(id=f"{impl}@{suite or launcher}", implementation=impl, role="server", version="",
                    launcher=launcher, suite=suite, **kw)


def custom_spec(*command: str, launcher: str = "local", suite: str | None = None) -> PeerSpec:
    return PeerSpec(id="custom-test", implementation="custom", role="server", version="", launcher=launcher,
                    suite=suite, command=tuple(command))


def read_all(server: RunningServer, timeout: float = 30) -> bytes:
    """Every byte of the export, read by the host's nbdcopy (libnbd) into a file."""
    out = Path(server.workdir) / "copy.out"
    r = subprocess.run(["nbdcopy", server.uri, str(out)], capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr
    return out.read_bytes()


def assert_serves(server: RunningServer, req: ExportRequest) -> None:
    data = read_all(server)
    assert len(data) == req.size
    assert data == expected_bytes(req), "served bytes differ from the requested content"
