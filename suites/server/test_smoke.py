"""Smoke: every server peer of the matrix starts, runs the version the matrix says, and serves its bytes.

The cheapest end-to-end check of a row: the launcher can run the peer, it completes a handshake with
the strict reference client, reports the export's size and serves its bytes.
"""

from __future__ import annotations

import pytest

from fixtures.exports import expected_bytes
from fixtures.judging import HarnessError, running_version
from fixtures.timeline import parse_version

SECTION = "Baseline"


# proto.md, "Baseline": "Every implementation MUST support NOTLS mode" (INTEROP-002); NBD_OPT_GO:
# "the server MUST send at least one NBD_REP_INFO of type NBD_INFO_EXPORT" before NBD_REP_ACK (GO-012),
# whose size the client reports.
@pytest.mark.req("INTEROP-002", "GO-012", "GO-031", "RD-007")
@pytest.mark.feature("NBD_OPT_GO")
def test_reference_client_reads_size_and_data(server_peer, shared_server, shared_export, ref_client, verdict):
    """The peer runs the matrix's version and serves the export's size and bytes."""
    # The matrix's version is what runs: a suite image or host package that moved is caught here.  A
    # binary that reports no version (a custom command) is taken at the row's word.
    if server_peer.launcher != "in-process":
        seen = running_version(shared_server.versions)
        if seen is None:
            verdict.info(f"reports no version ({shared_server.versions or 'nothing'}); taken as the matrix's "
                         f"{server_peer.version}")
        else:
            want = parse_version(server_peer.version)
            if parse_version(seen)[: len(want)] != want:      # the matrix is wrong, not the peer
                raise HarnessError(f"{server_peer.id}: the matrix says {server_peer.version}, the peer runs {seen}")
    client = ref_client(shared_server)
    verdict.expect(not client.get_tls_negotiated(), "INTEROP-002", expected="served without TLS (NOTLS)",
                   observed="TLS negotiated")
    assert client.get_size() == shared_export.size
    assert client.is_read_only(), "a read-only export must advertise NBD_FLAG_READ_ONLY"
    for offset in (0, shared_export.size - 4096):
        assert client.pread(4096, offset) == expected_bytes(shared_export, offset, 4096), offset
    # READ "answered with a simple or a structured reply according to whether structured replies were
    # negotiated" (RD-007)
    kinds = {type(e.event).__name__ for e in client.transcript if e.direction == "S"
             and type(e.event).__name__ in ("SimpleReply", "OffsetData", "OffsetHole", "ErrorChunk", "NoneChunk")}
    simple = not client.get_structured_replies_negotiated()
    verdict.expect(kinds == {"SimpleReply"} if simple else "SimpleReply" not in kinds, "RD-007",
                   expected="replies in the negotiated style", observed=str(sorted(kinds)))
