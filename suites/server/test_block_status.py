"""Metadata contexts and NBD_CMD_BLOCK_STATUS: base:allocation, with and without REQ_ONE."""

from __future__ import annotations

import pytest
from nbdref.client import CmdFlag

from suites.server._common import BASE, HOLE, REGION, collect_extents

SECTION = "Metadata querying: NBD_CMD_BLOCK_STATUS"


# "A successful NBD_CMD_BLOCK_STATUS must be answered with one NBD_REPLY_TYPE_BLOCK_STATUS chunk per
# selected context" (BS-002); "With NBD_CMD_FLAG_REQ_ONE the server must not describe more than one
# extent" (BS-054) that "must not exceed the request length" (BS-069); the core checks these.
@pytest.mark.req("BS-002", "BS-054", "BS-058", "BS-060", "BS-069", "BS-023")
@pytest.mark.feature("NBD_CMD_BLOCK_STATUS")
@pytest.mark.parametrize("headers", ["compact", "extended"])
def test_block_status_base_allocation(server_peer, writable_server, writable_export, region, ref_client,
                                      verdict, headers):
    """base:allocation over the whole export, then REQ_ONE on data just written."""
    def setup(c):
        c.set_request_extended_headers(headers == "extended")
        c.add_meta_context(BASE)

    c = ref_client(writable_server, setup=setup)
    if headers == "extended" and not c.get_extended_headers_negotiated():
        verdict.timeline("NBD_OPT_EXTENDED_HEADERS", False, export=writable_export)
        return
    selected = c.can_meta_context(BASE)
    verdict.timeline("NBD_CMD_BLOCK_STATUS", selected, export=writable_export)
    if not selected:
        return
    # A data region we just wrote is not a hole.
    offset = region(REGION)
    c.pwrite(b"\xa5" * REGION, offset)
    whole = collect_extents(c, writable_export.size, 0)[BASE]
    verdict.info(f"{len(whole)} extent(s) over the export")
    assert sum(length for length, _ in whole) <= writable_export.size
    assert all(length > 0 for length, _ in whole)
    one = collect_extents(c, REGION, offset, CmdFlag.REQ_ONE)[BASE]
    assert len(one) == 1 and 0 < one[0][0] <= REGION, f"REQ_ONE answered with {one}"
    assert not one[0][1] & HOLE, f"reports data written at {offset} as a hole"
