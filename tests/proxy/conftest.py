"""Fixtures for the proxy's tests: in-process reference servers and proxies on short Unix socket paths.

Everything a test starts is stopped at teardown, even when the test fails.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from nbdref.proxy import Proxy
from nbdref.server import Export, Server


@pytest.fixture
def sockdir() -> Iterator[Path]:
    """A short directory for Unix sockets (sun_path is 108 bytes; pytest's tmp_path can be longer)."""
    d = Path(tempfile.mkdtemp(prefix="nbdprx-", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def serve(sockdir: Path) -> Iterator[Callable[..., Server]]:
    """``serve(exports=None, **Server kwargs)`` -> a started reference Server on a Unix socket."""
    servers: list[Server] = []

    def start(exports: Export | list[Export] | None = None, **kw: object) -> Server:
        if exports is None:
            exports = [Export.memory("exp", 16 << 20)]
        kw.setdefault("unix", str(sockdir / f"s{len(servers)}.sock"))
        server = Server(exports, **kw).start()  # type: ignore[arg-type]
        servers.append(server)
        return server

    yield start
    for s in servers:
        s.stop()


@pytest.fixture
def proxy(sockdir: Path) -> Iterator[Callable[..., Proxy]]:
    """``proxy(upstream_uri, **Proxy kwargs)`` -> a started Proxy on a Unix socket."""
    proxies: list[Proxy] = []

    def start(upstream: str, **kw: object) -> Proxy:
        listen = kw.pop("listen", None) or f"nbd+unix:///?socket={sockdir}/p{len(proxies)}.sock"
        p = Proxy(str(listen), upstream, **kw).start()  # type: ignore[arg-type]
        proxies.append(p)
        return p

    yield start
    for p in proxies:
        p.stop()


@pytest.fixture(scope="session")
def tls_material(tmp_path_factory: pytest.TempPathFactory):
    """Per-run TLS material (fixtures/tls_material.py); certtool/psktool must be installed."""
    if not shutil.which("certtool") or not shutil.which("psktool"):
        import os
        if os.environ.get("CI") == "true":
            pytest.fail("gnutls-bin (certtool, psktool) is not installed")
        pytest.skip("gnutls-bin (certtool, psktool) not installed")
    from fixtures.tls_material import make_tls_material

    return make_tls_material(tmp_path_factory.mktemp("tls"))
