"""qemu's NBD client (qemu-io, qemu-img) against the reference server, which checks every client-bound
rule on the wire.  Other client peers are not-applicable: these cases drive qemu's tools.

The server listens on a Unix socket under the run dir, which client containers mount at the same path.
Each test runs real tools, checks what they report against the export's known content; the server's
records of the test's connections are judged at its end (`reference_session`).
"""

from __future__ import annotations

import json

import pytest

from fixtures.exports import expected_bytes
from fixtures.peers.qemu_clients import parse_read_dump
from suites.client._common import REGION, TOOL_TIMEOUT, extended_headers, ok, server_bytes, tool_fixture

SECTION = "Client behaviour: qemu"
MiB = 1 << 20
tool = tool_fixture("qemu-io")


# "Every implementation MUST support NOTLS mode" (INTEROP-002); the handshake and every READ are checked
# by the server's core against the client-bound rules.
@pytest.mark.req("INTEROP-002", "RD-008", "BSZ-005")
def test_qemu_read(client_peer, tool, client_runner, reference_server, reference_export, reference_session,
             reference_region, verdict):
    argv = client_runner.tool_argv("qemu-img", reference_server, "info", "--output=json")
    info = json.loads(ok(client_runner.run(argv, TOOL_TIMEOUT)).stdout)
    assert info["virtual-size"] == reference_export.size
    offset = 512 * 1024 + 512             # below REGION_START: no test writes there
    argv = client_runner.tool_argv("qemu-io", reference_server, "-c", f"read -v {offset} 1024")
    read = ok(client_runner.run(argv, TOOL_TIMEOUT))
    assert parse_read_dump(read.stdout) == expected_bytes(reference_export, offset, 1024)
    verdict.timeline("NBD_OPT_EXTENDED_HEADERS", extended_headers(reference_session))


# Zeroes, discards and flushes as qemu sends them: FLUSH "offset and length are reserved and must be zero"
# (FLUSH-004), no FAST_ZERO/TRIM unless advertised (WZ-004, TRIM-006): the server checks each request.
@pytest.mark.req("FLUSH-004", "WZ-004", "TRIM-006", "FUA-003")
def test_qemu_zero_discard_flush(client_peer, tool, client_runner, reference_server, reference_export, reference_session,
             reference_region, verdict):
    z, d = reference_region(REGION), reference_region(REGION)
    cmds = [f"write -z {z} 64k", f"discard {d} 64k", "flush", f"write -z -f {z} 4k"]      # -f: FUA
    argv = client_runner.tool_argv("qemu-io", reference_server, *(a for c in cmds for a in ("-c", c)), read_only=False)
    result = ok(client_runner.run(argv, TOOL_TIMEOUT))
    assert "failed" not in result.stdout, result.stdout
    assert server_bytes(reference_server, z, REGION, reference_session) == bytes(REGION)


# Known: qemu >= 8.2 sends extended WRITEs without PAYLOAD_LEN (suites/baseline.yaml).
# "With extended headers, NBD_CMD_WRITE must carry NBD_CMD_FLAG_PAYLOAD_LEN" (EXT-002); without them,
# the WRITE header is followed by exactly length bytes (WR-002).
@pytest.mark.req("WR-002", "EXT-002")
def test_qemu_write(client_peer, tool, client_runner, reference_server, reference_export, reference_session,
             reference_region, verdict):
    w = reference_region(REGION)
    cmds = [f"write -P 0xa5 {w} 64k", f"write -f -P 0x3c {w + 4096} 4k"]
    argv = client_runner.tool_argv("qemu-io", reference_server, *(a for c in cmds for a in ("-c", c)), read_only=False)
    result = ok(client_runner.run(argv, TOOL_TIMEOUT))
    assert "failed" not in result.stdout, result.stdout
    assert server_bytes(reference_server, w, 4096, reference_session) == b"\xa5" * 4096
    assert server_bytes(reference_server, w + 4096, 4096, reference_session) == b"\x3c" * 4096


# qemu-img map asks NBD_CMD_BLOCK_STATUS for base:allocation: "A client must not send
# NBD_CMD_BLOCK_STATUS unless it selected at least one context" (BS-003); the map covers the export.
@pytest.mark.req("BS-001", "BS-003", "BS-006", "EXT-009")
def test_qemu_img_map(client_peer, tool, client_runner, reference_server, reference_export, reference_session,
             reference_region, verdict):
    argv = client_runner.tool_argv("qemu-img", reference_server, "map", "--output=json")
    result = ok(client_runner.run(argv, TOOL_TIMEOUT))
    extents = json.loads(result.stdout)
    assert sum(e["length"] for e in extents) == reference_export.size
    assert extents[0]["start"] == 0
