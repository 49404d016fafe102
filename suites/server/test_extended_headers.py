"""Extended headers (the extension-ext-header draft): negotiated, every reply extended, offsets echoed."""

from __future__ import annotations

import secrets

import pytest

from fixtures.exports import expected_bytes
from suites.server._common import BASE, REGION, collect_extents

SECTION = "Extended headers"


# Once negotiated, "every reply must be an extended reply chunk" (EXT-006) whose "offset field must equal
# the request offset" (EXT-007); read, write, zero and block status exercise both directions.
@pytest.mark.req("EXT-005", "EXT-006", "EXT-007", "EXT-011", "EXT-016")
@pytest.mark.feature("NBD_OPT_EXTENDED_HEADERS")
def test_extended_headers(server_peer, writable_server, writable_export, region, ref_client, verdict):
    """With extended headers: read, write, zero and block status, every reply an extended one."""
    c = ref_client(writable_server, setup=lambda cl: cl.add_meta_context(BASE))
    negotiated = c.get_extended_headers_negotiated()
    verdict.timeline("NBD_OPT_EXTENDED_HEADERS", negotiated, export=writable_export)
    if not negotiated:
        return
    offset = region(REGION)
    assert c.pread(REGION, offset) == expected_bytes(writable_export, offset, REGION)
    data = secrets.token_bytes(REGION)
    c.pwrite(data, offset)
    assert c.pread(REGION, offset) == data
    if c.can_zero():
        c.zero(4096, offset)
        assert c.pread(4096, offset) == bytes(4096)
    if c.can_meta_context(BASE):
        extents = collect_extents(c, writable_export.size, 0)
        assert extents[BASE], "no base:allocation extents over extended headers"
