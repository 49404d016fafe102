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
from suites.client._own import judge_write_payload_len, metadata_order, requests_sent

SECTION = "Client behaviour: qemu"
MiB = 1 << 20
tool = tool_fixture("qemu-io")


# "Every implementation MUST support NOTLS mode" (INTEROP-002); the handshake and every READ are checked
# by the server's core against the client-bound rules.
@pytest.mark.req("INTEROP-002", "RD-008", "BSZ-005", "EXT-043", "CMD-014")
def test_qemu_read(client_peer, tool, client_runner, reference_server, reference_export, reference_session,
             reference_region, verdict):
    argv = client_runner.tool_argv("qemu-img", reference_server, "info", "--output=json")
    info = json.loads(ok(client_runner.run(argv, TOOL_TIMEOUT)).stdout)
    assert info["virtual-size"] == reference_export.size
    offset = 512 * 1024 + 512             # below REGION_START: no test writes there
    argv = client_runner.tool_argv("qemu-io", reference_server, "-c", f"read -v {offset} 1024")
    read = ok(client_runner.run(argv, TOOL_TIMEOUT))
    verdict.expect(parse_read_dump(read.stdout) == expected_bytes(reference_export, offset, 1024), "INTEROP-002",
                   expected="the read in NOTLS mode returns the export's bytes", observed=read.stdout[-200:])
    # The reference server advertises minimum 1 / preferred 4096 / maximum 32 MiB; with simple replies a READ
    # is a payload the client controls (BSZ-005: "MUST abide by the size constraints it receives").
    big = [q.length for r in reference_session.records() for q in requests_sent(r) if q.length > 1 << 25]
    verdict.expect(not big, "BSZ-005", expected="no request above the 32 MiB maximum payload",
                   observed=f"{big}" if big else "none")
    verdict.timeline("NBD_OPT_EXTENDED_HEADERS", extended_headers(reference_session))


# Zeroes, discards and flushes as qemu sends them: FLUSH "offset and length are reserved and must be zero"
# (FLUSH-004), no TRIM/FLUSH/WRITE_ZEROES unless advertised (TRIM-006, FLUSH-003, WZ-014), no zero-length
# WRITE_ZEROES/TRIM (WZ-010, TRIM-003): the server checks each request.
@pytest.mark.req("FLUSH-004", "TRIM-006", "FUA-003", "WZ-010", "TRIM-003", "CMD-008", "FLUSH-003", "WZ-014")
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
@pytest.mark.req("WR-002", "EXT-002", "EXT-042")
def test_qemu_write(client_peer, tool, client_runner, reference_server, reference_export, reference_session,
             reference_region, verdict):
    w = reference_region(REGION)
    cmds = [f"write -P 0xa5 {w} 64k", f"write -f -P 0x3c {w + 4096} 4k"]
    argv = client_runner.tool_argv("qemu-io", reference_server, *(a for c in cmds for a in ("-c", c)), read_only=False)
    result = ok(client_runner.run(argv, TOOL_TIMEOUT))
    assert "failed" not in result.stdout, result.stdout
    assert server_bytes(reference_server, w, 4096, reference_session) == b"\xa5" * 4096
    assert server_bytes(reference_server, w + 4096, 4096, reference_session) == b"\x3c" * 4096
    judge_write_payload_len(verdict, reference_session)


# qemu-img map asks NBD_CMD_BLOCK_STATUS for base:allocation: "A client must not send
# NBD_CMD_BLOCK_STATUS unless it selected at least one context" (BS-003); the map covers the export.
@pytest.mark.req("BS-001", "BS-003", "BS-006", "EXT-009", "BS-043", "BS-046", "BS-064")
def test_qemu_img_map(client_peer, tool, client_runner, reference_server, reference_export, reference_session,
             reference_region, verdict):
    argv = client_runner.tool_argv("qemu-img", reference_server, "map", "--output=json")
    result = ok(client_runner.run(argv, TOOL_TIMEOUT))
    extents = json.loads(result.stdout)
    assert sum(e["length"] for e in extents) == reference_export.size
    assert extents[0]["start"] == 0
    bad = metadata_order(reference_session.records())
    verdict.expect(not bad, "BS-001", "BS-006", "EXT-009", expected="SET_META_CONTEXT after structured replies or "
                   "extended headers, BLOCK_STATUS after SET_META_CONTEXT", observed="; ".join(bad) or "in order")
