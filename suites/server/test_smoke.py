"""Smoke: every server peer of the matrix starts, and the reference client reads from it.

The cheapest end-to-end check of a row: the launcher can run the peer, it runs the version the matrix
says, it completes a handshake with nbdref's client, reports the export's size and serves its bytes.
"""

from __future__ import annotations

import re
import warnings

import pytest

from fixtures.exports import expected_bytes
from fixtures.timeline import parse_version


def reported_version(versions: dict[str, str]) -> str | None:
    """The version a running peer reports: its Debian package version, else its --version line."""
    if "package" in versions:
        return versions["package"].split(" ", 1)[-1]
    m = re.search(r"\d+(?:\.\d+)+", versions.get("binary", ""))
    return m.group(0) if m else None


# proto.md, "Baseline": "Every implementation MUST support NOTLS mode" (INTEROP-002); NBD_OPT_GO:
# "the server MUST send at least one NBD_REP_INFO of type NBD_INFO_EXPORT" before NBD_REP_ACK (GO-012),
# whose size the client reports.
@pytest.mark.req("INTEROP-002", "GO-012", "GO-031", "RD-007")
@pytest.mark.feature("NBD_OPT_GO")
def test_reference_client_reads_size_and_data(server_peer, shared_server, shared_export, evidence):
    # The matrix's version is what runs: a suite image or host package that moved is caught here.
    if server_peer.launcher != "in-process":        # nbdref has no separate version to check
        seen = reported_version(shared_server.versions)
        assert seen is not None, f"{server_peer.id}: no version reported ({shared_server.versions})"
        want = parse_version(server_peer.version)
        assert parse_version(seen)[: len(want)] == want, (
            f"{server_peer.id}: the matrix says {server_peer.version}, the peer runs {seen}")

    from nbdref.client import Client

    with Client(timeout=15) as client:
        evidence.transcript("reference client", client)
        evidence.violations("reference client", client)
        client.connect_uri(shared_server.uri)
        assert client.get_size() == shared_export.size
        assert client.is_read_only()
        for offset in (0, shared_export.size - 4096):
            assert client.pread(4096, offset) == expected_bytes(shared_export, offset, 4096), offset
        violations = list(client.violations)
    # A broken MUST fails; a broken SHOULD is non-strict: reported, not failed (STYLE.md, "Words").
    broken = [str(v) for v in violations if v.level in ("MUST", "MUST NOT")]
    assert not broken, f"{server_peer.id} broke the spec in a plain read: {broken}"
    for v in violations:
        if v.level not in ("MUST", "MUST NOT"):
            warnings.warn(f"{server_peer.id}: non-strict: {v}", stacklevel=1)
