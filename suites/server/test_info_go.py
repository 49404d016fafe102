"""NBD_OPT_INFO and NBD_OPT_GO: the information replies, and INFO then GO agreeing.

The strict reference client checks every reply on the wire (GO-012, GO-034/035, BSZ-*); the tests add
what only a comparison shows.  A server too old for NBD_OPT_GO is judged by the timeline: its refusal
is `unsupported-ok`, a refusal by a version that has GO is `missing`.
"""

from __future__ import annotations

import pytest
from nbdref._constants import Opt, Rep, TxFlag
from nbdref._strict import Strictness
from nbdref.client import ClientError

from fixtures.exports import expected_bytes
from suites.server._common import acked, flag_names

SECTION = "Option haggling: NBD_OPT_INFO and NBD_OPT_GO"


# NBD_OPT_GO: "the server MUST send at least one NBD_REP_INFO of type NBD_INFO_EXPORT" (GO-012);
# NBD_INFO_NAME / NBD_INFO_DESCRIPTION lengths "MUST" be at least 2 (GO-034/035) and
# NBD_INFO_BLOCK_SIZE's values obey the BSZ rules: the core checks all of them on every reply.
@pytest.mark.req("GO-012", "GO-034", "GO-035", "BSZ-003")
@pytest.mark.feature("NBD_OPT_GO")
def test_go_with_info_replies(server_peer, writable_server, writable_export, ref_client, verdict):
    """NBD_OPT_GO with every NBD_INFO_* request: the replies are well formed and describe the export."""
    c = ref_client(writable_server, setup=lambda cl: cl.set_full_info(True))
    verdict.timeline("NBD_OPT_GO", acked(c, Opt.GO), export=writable_export,
                     how="NBD_REP_ACK to NBD_OPT_GO" if acked(c, Opt.GO) else "fell back to NBD_OPT_EXPORT_NAME")
    assert c.get_size() == writable_export.size
    sizes = tuple(c.get_block_size(i) for i in range(3))
    name = c.get_canonical_export_name()
    try:
        description: str | None = c.get_export_description()
    except ClientError:                 # no NBD_INFO_DESCRIPTION: allowed (a server MAY omit it)
        description = None
    verdict.info(f"protocol {c.get_protocol()}; block sizes {sizes if any(sizes) else 'none'}; "
                 f"name {name!r}; description {description!r}; flags {flag_names(c.get_transmission_flags())}")
    if any(sizes):
        minimum, preferred, _maximum = sizes
        # "The preferred block size MUST be a power of 2 and at least as large as the minimum" (BSZ-003)
        verdict.expect(minimum <= preferred and preferred & (preferred - 1) == 0, "BSZ-003",
                       expected="preferred >= minimum, a power of 2", observed=f"block sizes {sizes}")
    if description is not None:
        # Every adapter that can pass a description passes the export's: what comes back must be it.
        assert description == writable_export.description, f"description {description!r}"
    assert name in ("exp", ""), f"canonical name {name!r}"
    assert c.pread(4096, 8192) == expected_bytes(writable_export, 8192, 4096)


# proto.md: between a successful NBD_OPT_INFO and "an NBD_OPT_GO with the same parameters ... the server
# MUST reply with the same set of information, such as transmission flags" (GO-022).  The extended-headers
# draft: servers "SHOULD NOT advertise [NBD_FLAG_BLOCK_STATUS_PAYLOAD] in response to NBD_OPT_GO if the
# client does not negotiate metacontexts" (EXT-012) and say nothing of NBD_OPT_INFO: a server that sets
# the bit for INFO and leaves it out of GO follows the draft's SHOULD NOT and breaks GO-022's letter.
GO022_TEXT = ("proto.md, NBD_OPT_INFO: with the same parameters and no intervening option, for NBD_OPT_GO "
              "\"the server MUST reply with the same set of information, such as transmission flags in the "
              "NBD_INFO_EXPORT reply\" (GO-022)")
EXT012_TEXT = ("extended-headers draft e6f3b94, NBD_FLAG_BLOCK_STATUS_PAYLOAD: servers \"SHOULD NOT advertise "
               "this bit in response to NBD_OPT_GO if the client does not negotiate metacontexts\" (EXT-012)")


@pytest.mark.req("GO-022", "GO-012")
@pytest.mark.feature("NBD_OPT_INFO")
def test_info_then_go(server_peer, shared_server, shared_export, ref_client, verdict):
    """NBD_OPT_INFO then NBD_OPT_GO with the same parameters give the same information."""
    c = ref_client(shared_server, opt_mode=True, strictness=Strictness.lenient(), allow=("GO-022",))
    try:
        c.opt_info()
    except ClientError as e:
        # Only NBD_REP_ERR_UNSUP says "not supported" (judged by the timeline); a connection lost or
        # another error reply to NBD_OPT_INFO on an export the server serves is no refusal of the option.
        if e.reply is None:
            raise
        if getattr(e.reply, "reply_type", None) == Rep.ERR_UNSUP:
            verdict.timeline("NBD_OPT_INFO", False, export=shared_export, how=str(e))
            return
        verdict.fail("GO-012", expected="NBD_INFO_EXPORT and NBD_REP_ACK for the export the server serves",
                     observed=f"NBD_OPT_INFO refused: {e}")
        return
    verdict.timeline("NBD_OPT_INFO", True, export=shared_export)
    info = (c.get_size(), c.get_transmission_flags())
    c.opt_go()
    go = (c.get_size(), c.get_transmission_flags())
    if info == go:
        return
    diff = info[1] ^ go[1]
    seen = f"INFO: size {info[0]}, flags {flag_names(info[1])}; GO: size {go[0]}, flags {flag_names(go[1])}"
    if info[0] == go[0] and diff == TxFlag.BLOCK_STATUS_PAYLOAD and not go[1] & TxFlag.BLOCK_STATUS_PAYLOAD:
        verdict.tension("GO-022", "EXT-012", texts=(GO022_TEXT, EXT012_TEXT), observed=seen)
        return
    verdict.fail("GO-022", expected="the same size and transmission flags for INFO and GO", observed=seen)


# EXT-012 is a rule about the GO reply only: an NBD_OPT_INFO reply carrying NBD_FLAG_BLOCK_STATUS_PAYLOAD
# (qemu >= 8.2 does) is no EXT-012 breach, and the core must not call it one.
@pytest.mark.req("EXT-011", "EXT-012")
@pytest.mark.feature("NBD_FLAG_BLOCK_STATUS_PAYLOAD")
def test_info_reply_may_offer_block_status_payload(server_peer, shared_server, ref_client, verdict):
    """An NBD_OPT_INFO reply may carry NBD_FLAG_BLOCK_STATUS_PAYLOAD without meta contexts."""
    from fixtures.expectations import expected
    before = expected("NBD_OPT_INFO", server_peer)
    if before.answer == "no":
        verdict.not_applicable(f"this version predates NBD_OPT_INFO ({before.reason})")
    c = ref_client(shared_server, opt_mode=True, strictness=Strictness.lenient())
    try:
        c.opt_info()
    except ClientError as e:       # a refusal is judged (missing or not) by test_info_then_go
        if e.reply is None:
            raise
        verdict.info(f"NBD_OPT_INFO refused: {e}", only=True)
        return
    offered = bool(c.get_transmission_flags() & TxFlag.BLOCK_STATUS_PAYLOAD)
    verdict.info(f"NBD_OPT_INFO reply {'sets' if offered else 'does not set'} NBD_FLAG_BLOCK_STATUS_PAYLOAD",
                 only=True)
