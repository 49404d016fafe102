"""Differential: command flags and request types a server may not know, sent alike to every server peer.

Unknown request types, undefined and undocumented command flags, FUA where it writes nothing, DF without
structured replies, REQ_ONE, and BLOCK_STATUS without a metadata context: the answer is recorded, the
SHOULD that names one (NBD_EINVAL, mostly) judged as non-strict, a MUST (FUA-002) as fail.
"""

from __future__ import annotations

import pytest
from nbdref._constants import Cmd, CmdFlag, TxFlag

from suites.differential._probe import (
    advertised,
    after,
    ask,
    connect,
    expect_einval,
    head,
    record,
)

SECTION = "Differential: Command flags"
BASE = "base:allocation"
SECTOR = 512
UNKNOWN_FLAG = 1 << 10               # no command flag of proto.md or the ext-header draft
UNKNOWN_COMMAND = 0x3D               # no request type of proto.md or any extension branch


# --------------------------------------------------------------------------------------------------
# Unknown commands and flags: "The server SHOULD return NBD_EINVAL if it receives an unknown command"
# (ERR-008), "an unknown command flag" (ERR-009), "a request with a flag not explicitly documented as
# applicable to the given request" (ERR-010).  The client broke a MUST (CMD-014) for the flags, so a
# hard disconnect is allowed there (DISC-017); an unknown command is not a MUST breach of the client,
# but nothing tells the server how long its payload is: a disconnect is recorded, not judged.


@pytest.mark.req("ERR-008")
def test_unknown_command(server_peer, shared_server, shared_export, ref_client, verdict):
    """What does a server answer to a request type no document defines?"""
    c = connect(ref_client, shared_server)
    answer = ask(c, shared_export, UNKNOWN_COMMAND, 0, SECTOR)
    record(verdict, answer, "ERR-008")
    expect_einval(verdict, answer, "ERR-008")
    after(ref_client, shared_server, shared_export, answer)


@pytest.mark.req("ERR-009")
def test_unknown_command_flag(server_peer, shared_server, shared_export, ref_client, verdict):
    """What does a server answer to an NBD_CMD_READ with an undefined command flag (bit 10)?"""
    c = connect(ref_client, shared_server)
    answer = ask(c, shared_export, Cmd.READ, 0, SECTOR, UNKNOWN_FLAG)
    record(verdict, answer, "ERR-009")
    expect_einval(verdict, answer, "ERR-009")
    after(ref_client, shared_server, shared_export, answer)


UNDOCUMENTED = {
    # command, flag: a defined flag that the command does not take
    "READ+NO_HOLE": (Cmd.READ, CmdFlag.NO_HOLE),
    "READ+REQ_ONE": (Cmd.READ, CmdFlag.REQ_ONE),
    "READ+FAST_ZERO": (Cmd.READ, CmdFlag.FAST_ZERO),
}


@pytest.mark.req("ERR-010")
@pytest.mark.parametrize("which", list(UNDOCUMENTED))
def test_undocumented_flag(server_peer, shared_server, shared_export, ref_client, verdict, which):
    """What does a server answer to an NBD_CMD_READ carrying a flag defined only for other commands?"""
    cmd, flag = UNDOCUMENTED[which]
    c = connect(ref_client, shared_server)
    answer = ask(c, shared_export, cmd, 0, SECTOR, flag)
    record(verdict, answer, "ERR-010")
    expect_einval(verdict, answer, "ERR-010")
    after(ref_client, shared_server, shared_export, answer)


# NBD_CMD_FLAG_FUA: "valid for all commands, provided NBD_FLAG_SEND_FUA has been negotiated, in which
# case the server MUST accept all commands with this bit set (even by ignoring the bit)" (FUA-002); the
# client "SHOULD NOT" set it on a READ (FUA-003), "existing clients are known to set this bit on other
# commands".  Not advertised, the client broke CMD-008 and any answer is recorded.
@pytest.mark.req("FUA-002")
def test_read_with_fua(server_peer, writable_server, writable_export, ref_client, verdict):
    """Does a server accept NBD_CMD_FLAG_FUA on an NBD_CMD_READ?"""
    c = connect(ref_client, writable_server)
    prefix = advertised(c, TxFlag.SEND_FUA)
    answer = prefix + ask(c, writable_export, Cmd.READ, 0, SECTOR, CmdFlag.FUA)
    record(verdict, answer, "FUA-002")
    if not prefix:
        verdict.expect(head(answer).startswith("ok"), "FUA-002", expected="accepted (FUA advertised)",
                       observed=answer)
    after(ref_client, writable_server, writable_export, answer)


@pytest.mark.req("FUA-002")
def test_flush_with_fua(server_peer, writable_server, writable_export, ref_client, verdict):
    """Does a server accept NBD_CMD_FLAG_FUA on an NBD_CMD_FLUSH?"""
    c = connect(ref_client, writable_server)
    prefix = advertised(c, TxFlag.SEND_FUA) or advertised(c, TxFlag.SEND_FLUSH)
    answer = prefix + ask(c, writable_export, Cmd.FLUSH, 0, 0, CmdFlag.FUA)
    record(verdict, answer, "FUA-002")
    if not prefix:
        verdict.expect(head(answer) == "ok", "FUA-002", expected="accepted (FUA advertised)", observed=answer)
    after(ref_client, writable_server, writable_export, answer)


# "NBD_FLAG_SEND_DF ... MUST be clear if structured replies were not negotiated" (RD-002) and the client
# "MUST NOT" set DF unless it was advertised (RD-003): with simple replies the flag is unknown to the
# session, and the server may answer as it likes (ERR-010 asks for NBD_EINVAL, a SHOULD).
@pytest.mark.req("RD-002")
def test_df_without_structured_replies(server_peer, shared_server, shared_export, ref_client, verdict):
    """What does a server answer to an NBD_CMD_READ with NBD_CMD_FLAG_DF when replies are simple?"""
    c = connect(ref_client, shared_server, structured=False)
    verdict.expect(not c.can_df(), "RD-002", expected="NBD_FLAG_SEND_DF clear", observed="set")
    answer = ask(c, shared_export, Cmd.READ, 0, SECTOR, CmdFlag.DF)
    record(verdict, answer, "RD-002", "ERR-010")
    after(ref_client, shared_server, shared_export, answer)



# BLOCK_STATUS without a selected context: the client "MUST NOT" (BS-003); the server "SHOULD" answer
# NBD_EINVAL (BS-004).  Once with structured replies (no context asked), once without (BS-006).
@pytest.mark.req("BS-004")
@pytest.mark.parametrize("structured", [True, False], ids=["structured", "simple"])
def test_block_status_without_context(server_peer, shared_server, shared_export, ref_client, verdict, structured):
    """What does a server answer to an NBD_CMD_BLOCK_STATUS when no metadata context was selected?"""
    c = connect(ref_client, shared_server, structured=structured)
    answer = ask(c, shared_export, Cmd.BLOCK_STATUS, 0, 4096)
    record(verdict, answer, "BS-004")
    expect_einval(verdict, answer, "BS-004")
    after(ref_client, shared_server, shared_export, answer)


# NBD_CMD_FLAG_REQ_ONE: "the server MUST NOT send metadata on more than one extent" (BS-054) and the
# descriptor "MUST NOT" be longer than the request (BS-059, the core checks both); it MAY describe less
# (BS-072).  The answer records how many extents and whether they cover the request.
@pytest.mark.req("BS-054", "BS-059", "BS-072")
def test_block_status_req_one(server_peer, shared_server, shared_export, ref_client, verdict):
    """With NBD_CMD_FLAG_REQ_ONE over 1 MiB, how much does the one extent describe?"""
    c = connect(ref_client, shared_server, contexts=(BASE,))
    if not c.can_meta_context(BASE):
        record(verdict, "no context: base:allocation not selected", "BS-072")
        return
    lengths: list[int] = []
    c.block_status(1 << 20, 0, lambda _n, _o, entries, _e: lengths.extend(entries[0::2]), CmdFlag.REQ_ONE)
    verdict.expect(len(lengths) == 1, "BS-054", expected="one extent", observed=f"{len(lengths)} extents")
    verdict.expect(all(n <= 1 << 20 for n in lengths), "BS-059", expected="at most the request length",
                   observed=str(lengths))
    covered = sum(lengths)
    answer = "one extent, the whole request" if covered == 1 << 20 else \
        f"{len(lengths)} extent(s), {covered} of {1 << 20} bytes"
    record(verdict, answer, "BS-054", "BS-059", "BS-072")


