"""Smoke: every client peer of the matrix reads from the reference server.

Each client package is driven through its plain command-line tools (qemu-img / qemu-io, nbdinfo /
nbdsh); the in-process reference client through its API.  The reference server (persona nbdref) is
the fixed point: what the client reports must equal the export it serves.
"""

from __future__ import annotations

import json
import re
import warnings

import pytest

from fixtures.exports import expected_bytes
from fixtures.matrix import client_tools

READ_LENGTH = 512


def _size_argv(runner, tool: str, server) -> list[str]:
    if tool == "qemu-io":
        return runner.tool_argv("qemu-img", server, "info", "--output=json")
    return runner.tool_argv("nbdinfo", server, "--size")


def _read_argv(runner, tool: str, server, offset: int) -> list[str]:
    if tool == "qemu-io":
        return runner.tool_argv("qemu-io", server, "-c", f"read -v {offset} {READ_LENGTH}")
    return runner.tool_argv("nbdsh", server, "-c", f"print(h.pread({READ_LENGTH}, {offset}).hex())")


def _parse_size(tool: str, stdout: str) -> int:
    if tool == "qemu-io":
        return int(json.loads(stdout)["virtual-size"])
    return int(stdout.strip())


def _parse_read(tool: str, stdout: str) -> bytes:
    if tool == "qemu-io":
        # qemu-io's `read -v` dumps "00000000:  6e 62 64 ...  nbd..." lines.
        hexes = [b for line in stdout.splitlines() if re.match(r"^[0-9a-f]{8}:", line)
                 for b in line.split(":", 1)[1].split("  ")[1].split() if re.fullmatch(r"[0-9a-f]{2}", b)]
        return bytes.fromhex("".join(hexes))
    return bytes.fromhex(stdout.strip().splitlines()[-1])


# proto.md, "Baseline": "Every implementation MUST support NOTLS mode" (INTEROP-002); a client reads
# the size from NBD_INFO_EXPORT (GO-012) or the NBD_OPT_EXPORT_NAME reply.
@pytest.mark.req("INTEROP-002", "GO-012")
@pytest.mark.feature("newstyle")
def test_client_reads_size_and_data(request, client_peer, reference_server, reference_export, evidence):
    seen_before = len(reference_server.handle.records)
    try:
        _read_size_and_data(request, client_peer, reference_server, reference_export)
    finally:
        records = _connections_since(reference_server, seen_before)
        for i, record in enumerate(records):
            evidence.transcript(f"connection {i + 1}", record)
            evidence.violations(f"connection {i + 1}", record)
    # The reference server checks every client-bound rule it can observe (docs/design.md).
    broken = [f"{v}" for r in records for v in r.violations if v.level in ("MUST", "MUST NOT")]
    assert not broken, f"{client_peer.id} broke the spec reading from the reference server: {broken}"
    for v in (v for r in records for v in r.violations if v.level not in ("MUST", "MUST NOT")):
        warnings.warn(f"{client_peer.id}: non-strict: {v}", stacklevel=1)


def _connections_since(server, seen_before: int) -> list:
    """The reference server's records of the connections this test made, once they have ended."""
    records = list(server.handle.records)[seen_before:]
    for record in records:
        record.wait(10)
    return records


def _read_size_and_data(request, client_peer, reference_server, reference_export) -> None:
    offset = 8192
    want = expected_bytes(reference_export, offset, READ_LENGTH)
    if client_peer.launcher == "in-process":
        from nbdref.client import Client

        with Client(timeout=15) as client:
            client.connect_uri(reference_server.uri)
            assert client.get_size() == reference_export.size
            assert client.pread(READ_LENGTH, offset) == want
        return
    runner = request.getfixturevalue("client_runner")
    tool = "qemu-io" if "qemu-io" in client_tools(client_peer) else "nbdinfo"
    size = runner.run(_size_argv(runner, tool, reference_server), timeout=30)
    assert size.ok, f"{client_peer.id}: {size.argv} failed: {size.stderr}"
    assert _parse_size(tool, size.stdout) == reference_export.size
    read = runner.run(_read_argv(runner, tool, reference_server, offset), timeout=30)
    assert read.ok, f"{client_peer.id}: {read.argv} failed: {read.stderr}"
    assert _parse_read(tool, read.stdout) == want
