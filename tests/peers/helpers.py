"""Small helpers shared by the peer tests."""

from __future__ import annotations

import subprocess
from pathlib import Path

from fixtures.exports import ExportRequest, expected_bytes
from fixtures.launchers.base import RunningServer
from tests.helpers.servers import custom_spec, server_spec

__all__ = ["assert_serves", "custom_spec", "read_all", "server_spec"]


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
