"""Structured replies: simple vs structured, NBD_CMD_FLAG_DF, and many requests in flight."""

from __future__ import annotations

import pytest
from nbdref._strict import Strictness
from nbdref.client import ClientError, CmdFlag

from fixtures.exports import expected_bytes
from suites.server._common import REGION

SECTION = "Structured replies"


# "If structured replies were not negotiated, every request must be answered with a simple reply"
# (SR-002) and "NBD_CMD_READ must never get a simple reply" once they are (SR-006): the core checks.
@pytest.mark.req("SR-002", "SR-006", "RD-007")
@pytest.mark.feature("NBD_OPT_STRUCTURED_REPLY")
@pytest.mark.parametrize("structured", [False, True], ids=["simple", "structured"])
def test_reply_kinds(server_peer, shared_server, shared_export, ref_client, verdict, structured):
    """Reads are answered with simple replies, or with structured ones once negotiated."""
    def setup(c):
        c.set_request_extended_headers(False)
        c.set_request_structured_replies(structured)

    c = ref_client(shared_server, setup=setup)
    negotiated = c.get_structured_replies_negotiated()
    if structured:
        verdict.timeline("NBD_OPT_STRUCTURED_REPLY", negotiated, export=shared_export)
    else:
        assert not negotiated, "structured replies on though the client did not ask"
    offset = shared_export.size - 3 * REGION
    assert c.pread(3 * REGION, offset) == expected_bytes(shared_export, offset, 3 * REGION)
    if not negotiated:
        # "NBD_FLAG_SEND_DF ... MUST be clear if structured replies were not negotiated" (RD-002)
        verdict.expect(not c.can_df(), "RD-002", expected="NBD_FLAG_SEND_DF clear without structured replies",
                       observed="NBD_FLAG_SEND_DF set")


# NBD_CMD_FLAG_DF: "the server MUST send at most one content chunk" and "MUST support unfragmented reads
# in which the client's request length does not exceed 65,536 bytes" (RD-050); with structured replies
# it "MUST NOT use a simple reply for NBD_CMD_READ (even for the case of an early NBD_EINVAL due to bad
# flags)" (SR-006).  A lenient client records what the peer does; the core names the ids.
@pytest.mark.req("RD-001", "RD-050", "SR-006")
@pytest.mark.feature("NBD_CMD_FLAG_DF")
def test_read_df(server_peer, shared_server, shared_export, ref_client, verdict):
    """An advertised NBD_CMD_FLAG_DF read of 64 KiB succeeds in one chunk."""
    c = ref_client(shared_server, strictness=Strictness.lenient())
    verdict.timeline("NBD_CMD_FLAG_DF", c.can_df(), export=shared_export)
    if not c.can_df():
        return
    offset = 7 * REGION
    try:
        data = c.pread(REGION, offset, CmdFlag.DF)
    except ClientError as e:
        verdict.fail("RD-050", expected=f"a {REGION}-byte DF read succeeds", observed=f"failed: {e}")
        return
    assert data == expected_bytes(shared_export, offset, REGION)


# Several requests in flight, answered in any order and matched by cookie: "A structured reply may span
# several chunks sharing one cookie" (SR-009); the core pairs every reply with its request.
@pytest.mark.req("RD-007")
@pytest.mark.feature("NBD_OPT_STRUCTURED_REPLY")
def test_requests_in_flight(server_peer, shared_server, shared_export, ref_client):
    """Eight reads in flight at once all come back right."""
    c = ref_client(shared_server)
    buffers = [bytearray(REGION) for _ in range(8)]
    offsets = [shared_export.size - (i + 1) * REGION for i in range(8)]
    cookies = [c.aio_pread(buf, off) for buf, off in zip(buffers, offsets, strict=True)]
    for cookie in cookies:
        c.wait(cookie)
    for buf, off in zip(buffers, offsets, strict=True):
        assert bytes(buf) == expected_bytes(shared_export, off, REGION)


