"""tests.helpers.servers: the thin layer over fixtures.launch that the client tests use.

What the launcher itself guarantees (readiness, stop leaves nothing, port races, stale sockets) is
tested in tests/peers/test_launch_local.py; here: options reach the peer, and the nbdkit shortcut.
"""

from __future__ import annotations

import socket
import struct
from pathlib import Path

import pytest

from fixtures.exports import ExportRequest
from fixtures.launchers.base import PeerStartError
from tests.helpers.servers import host_spec, parse_size, start_host, start_nbdkit

# proto.md, oldstyle negotiation: "S: 64 bits, 0x4e42444d41474943 (ASCII 'NBDMAGIC') ...
# S: 64 bits, 0x00420281861253 (cliserv_magic, a magic number) S: 64 bits, size of the export in bytes"
CLISERV_MAGIC = 0x00420281861253


def first_bytes(path: Path, n: int) -> bytes:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(5)
        s.connect(str(path))
        return s.recv(n, socket.MSG_WAITALL)


def test_host_spec_keeps_options_as_sorted_strings() -> None:
    spec = host_spec("nbdkit", transport="tcp", plugin="memory", args=None, ready_timeout=3)
    assert spec.options == (("plugin", "memory"), ("ready_timeout", "3"), ("transport", "tcp"))
    assert (spec.implementation, spec.role, spec.launcher) == ("nbdkit", "server", "local")


@pytest.mark.parametrize(("text", "want"), [("1M", 1 << 20), ("64k", 64 << 10), ("1073741824", 1 << 30)])
def test_parse_size(text: str, want: int) -> None:
    assert parse_size(text) == want


def test_start_nbdkit_memory_with_extra_args(workdir: Path) -> None:
    with start_nbdkit("memory", "1M", workdir=workdir, extra_args=("--oldstyle",)) as server:
        assert server.uri == f"nbd+unix:///?socket={server.socket}"
        magic, cliserv, size = struct.unpack(">8sQQ", first_bytes(server.socket, 24))
        assert (magic, cliserv, size) == (b"NBDMAGIC", CLISERV_MAGIC, 1 << 20)
    assert not server.alive() and not server.socket.exists()


def test_start_nbdkit_only_knows_memory(workdir: Path) -> None:
    with pytest.raises(ValueError, match="start_host"):
        start_nbdkit("file", "/dev/null", workdir=workdir)


def test_bad_args_fail_fast_with_the_log(workdir: Path) -> None:
    with pytest.raises(PeerStartError, match="exit code") as info:
        start_host("nbdkit", ExportRequest(size=4096), workdir=workdir, args="--no-such-option", timeout=5)
    assert "no-such-option" in info.value.log_tail


def test_nbd_server_export_config_reaches_the_server(workdir: Path) -> None:
    """nbd-server 3.24 advertises trim only when the config says so: the option is applied."""
    from nbdref.client import Client

    def can_trim(**options: str) -> bool:
        request = ExportRequest(size=1 << 20)
        with start_host("nbd-server", request, workdir=workdir, **options) as server, Client(timeout=10) as c:
            c.connect_uri(server.uri)
            return bool(c.can_trim())

    assert not can_trim()
    assert can_trim(export_config="trim = true")
