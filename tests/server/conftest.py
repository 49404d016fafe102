"""Fixtures for the reference server's tests: in-process servers on short Unix socket paths.

Every server a test starts is stopped at teardown, even when the test fails.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from nbdref.server import Export, Server

from . import rawclient


@pytest.fixture
def sockdir() -> Iterator[Path]:
    """A short directory for Unix sockets (sun_path is 108 bytes; pytest's tmp_path can be longer)."""
    d = Path(tempfile.mkdtemp(prefix="nbdsrv-", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(autouse=True)
def _close_raw_sockets() -> Iterator[None]:
    """Close the client ends rawclient.pair() handed out (a test may stop reading half-way)."""
    yield
    while rawclient.OPENED:
        rawclient.OPENED.pop().close()


@pytest.fixture
def serve(sockdir: Path) -> Iterator[Callable[..., Server]]:
    """``serve(exports=None, **Server kwargs)`` -> a started Server on a Unix socket."""
    servers: list[Server] = []

    def start(exports: Export | list[Export] | None = None, **kw: object) -> Server:
        if exports is None:
            exports = [Export.memory("exp", 16 << 20, description="test export", bitmaps=("b0",))]
        kw.setdefault("unix", str(sockdir / f"s{len(servers)}.sock"))
        server = Server(exports, **kw).start()  # type: ignore[arg-type]
        servers.append(server)
        return server

    yield start
    for s in servers:
        s.stop()


# nbdsh runs "python3 -mnbd": under pyenv, PATH's python3 has no python3-libnbd; use Debian's.
# Scripts end with h.shutdown(): nbd_close alone drops the socket without NBD_CMD_DISC (DISC-024).
NBDSH = ["/usr/bin/python3", "-m", "nbd"]


def run(argv: list[str], *, timeout: float = 60, check: bool = True, **kw: object) -> subprocess.CompletedProcess:
    """Run a client tool; on failure show its output in the assertion message."""
    r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kw)  # type: ignore[call-overload]
    if check:
        assert r.returncode == 0, f"{argv} -> {r.returncode}\nstdout: {r.stdout}\nstderr: {r.stderr}"
    return r


def clean(server: Server, n: int | None = None) -> None:
    """Assert the server recorded no client violation (after every connection ended)."""
    assert server.wait_closed(10), "connections did not end"
    if n is not None:
        assert len(server.records) >= n
    bad = [(r.id, str(v)) for r in server.records for v in r.violations]
    assert not bad, f"violations: {bad}\n" + "\n".join(str(r.transcript) for r in server.records)


@pytest.fixture(scope="session")
def tls_dir(tmp_path_factory: pytest.TempPathFactory):
    """Per-run TLS material (fixtures/tls_material.py); certtool/psktool must be installed."""
    if not shutil.which("certtool") or not shutil.which("psktool"):
        pytest.skip("gnutls-bin (certtool, psktool) not installed")
    from fixtures.tls_material import make_tls_material

    return make_tls_material(tmp_path_factory.mktemp("tls"))
