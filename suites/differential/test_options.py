"""Differential: option requests and sequences the spec leaves room in, sent alike to every server peer.

Each case runs on a fresh opt-mode connection of the lenient reference client (structured replies
negotiated unless the case says otherwise, no extended headers), records the final reply of the option
it asks about, and judges what the spec pins down.  A session that ends is allowed only where the client
broke a MUST (DISC-003, the core's `local_breach`); otherwise the core reports DISC-006.  Where a case
can go on, it ends with NBD_OPT_GO and a read: "A server ... MUST keep answering options with errors
instead of disconnecting" (DISC-010), so a refused option must leave the session usable.
"""

from __future__ import annotations

import pytest
from nbdref import events as ev
from nbdref._constants import Info, Opt

from suites.differential._probe import (
    HARD,
    connect,
    context_names,
    final,
    go,
    option,
    still_serves,
)
from suites.server._common import acked

SECTION = "Differential: Option types"
BASE = "base:allocation"
MISSING = "no-such-export"
UNKNOWN_OPTION = 0x4E43              # no option of proto.md or the ext-header draft has this code
UNKNOWN_INFO = 0x7FF0                # no NBD_INFO_* type has this code


def record(verdict, answer: str, *ids: str) -> None:
    verdict.info(answer, requirements=ids, only=True)


def then_go(verdict, c, answer: str, export) -> str:
    """After a refused option: NBD_OPT_GO must still work (DISC-010); the answer gets what failed.  After
    an option that broke a MUST of ours the server owes nothing more (DISC-003): recorded, not judged."""
    if answer.endswith(HARD) or not c.connection or c.connection.state.name != "OPTIONS":
        return answer
    broke_must = c.connection.local_breach
    why = go(c)
    if not broke_must:
        verdict.expect(not why, "DISC-010", expected="NBD_OPT_GO after the refusal works", observed=why)
    return f"{answer}, then {why}" if why else answer


def after(ref_client, server, export, answer: str) -> None:
    if HARD in answer:
        still_serves(ref_client, server, export)


def _should(verdict, answer: str, wanted: str, req: str) -> None:
    """A SHOULD that names the answer; a hard disconnect is allowed (the client broke a MUST), and so is
    NBD_REP_ERR_UNSUP: a server that does not implement the option "MUST" say so (INTEROP-005)."""
    if answer not in (HARD, "NBD_REP_ERR_UNSUP"):
        verdict.expect(answer == wanted, req, expected=wanted, observed=answer)


# --------------------------------------------------------------------------------------------------
# Repeated and malformed options


# "The client SHOULD NOT send such messages more than once; if it does, the server MAY fail the
# repeated message with NBD_REP_ERR_INVALID" (OPT-005, OPT-006): ACK and ERR_INVALID are both fine.
@pytest.mark.req("OPT-006", "DISC-010")
def test_second_structured_reply(server_peer, shared_server, shared_export, ref_client, verdict):
    """What does a server answer to a second NBD_OPT_STRUCTURED_REPLY after acknowledging the first?"""
    c = connect(ref_client, shared_server, opt_mode=True)
    if not acked(c, Opt.STRUCTURED_REPLY):
        record(verdict, "first one refused (no structured replies)", "OPT-006")
        return
    answer = then_go(verdict, c, final(option(c, ev.OptStructuredReply())), shared_export)
    record(verdict, answer, "OPT-006")
    after(ref_client, shared_server, shared_export, answer)


# NBD_OPT_STRUCTURED_REPLY: "The client MUST NOT send any additional data with the option, and the
# server SHOULD reject a request that includes data with NBD_REP_ERR_INVALID" (SR-015, SR-016).
@pytest.mark.req("SR-016")
def test_structured_reply_with_data(server_peer, shared_server, shared_export, ref_client, verdict):
    """What does a server answer to an NBD_OPT_STRUCTURED_REPLY that carries data?"""
    c = connect(ref_client, shared_server, structured=False, opt_mode=True)
    answer = final(option(c, ev.OptStructuredReply(data=b"data")))
    _should(verdict, answer, "NBD_REP_ERR_INVALID", "SR-016")
    record(verdict, then_go(verdict, c, answer, shared_export), "SR-016")
    after(ref_client, shared_server, shared_export, answer)


# NBD_OPT_LIST: "The client MUST NOT send any additional data with the option, and the server SHOULD
# reject a request that includes data with NBD_REP_ERR_INVALID" (OPT-017, OPT-018).
@pytest.mark.req("OPT-018")
def test_list_with_data(server_peer, shared_server, shared_export, ref_client, verdict):
    """What does a server answer to an NBD_OPT_LIST that carries data?"""
    c = connect(ref_client, shared_server, opt_mode=True)
    answer = final(option(c, ev.OptList(data=b"exp")))
    _should(verdict, answer, "NBD_REP_ERR_INVALID", "OPT-018")
    record(verdict, then_go(verdict, c, answer, shared_export), "OPT-018")
    after(ref_client, shared_server, shared_export, answer)


# NBD_OPT_ABORT: the client "SHOULD NOT send any additional data with the option", the server "SHOULD
# gracefully handle" it "by ignoring" the data rather than rejecting the request (OPT-012, OPT-013), and
# "MUST reply with NBD_REP_ACK" (OPT-011) -- or close (the client "SHOULD gracefully handle" that, OPT-014).
@pytest.mark.req("OPT-011", "OPT-013")
def test_abort_with_data(server_peer, shared_server, shared_export, ref_client, verdict):
    """What does a server answer to an NBD_OPT_ABORT that carries data?"""
    c = connect(ref_client, shared_server, opt_mode=True)
    answer = final(option(c, ev.OptAbort(data=b"bye")))
    if answer != HARD:
        verdict.expect(answer == "NBD_REP_ACK", "OPT-013", expected="NBD_REP_ACK (data ignored)", observed=answer)
    record(verdict, answer, "OPT-011", "OPT-013")
    still_serves(ref_client, shared_server, shared_export)


# Baseline: "A server MUST answer options it does not implement with NBD_REP_ERR_UNSUP" and "MUST NOT"
# fail to parse the next option (INTEROP-005, INTEROP-006).  Small data, and 64 KiB of it (a server
# "MAY" hard-disconnect a client whose behaviour amounts to denial of service, DISC-011: recorded).
@pytest.mark.req("INTEROP-005", "INTEROP-006", "DISC-010")
@pytest.mark.parametrize("size", [4, 65536], ids=["4B", "64KiB"])
def test_unknown_option(server_peer, shared_server, shared_export, ref_client, verdict, size):
    """What does a server answer to an option code no document defines, carrying data?"""
    c = connect(ref_client, shared_server, opt_mode=True)
    answer = final(option(c, ev.OptUnknown(option=UNKNOWN_OPTION, data=bytes(size))))
    if answer != HARD or size < 4096:
        verdict.expect(answer == "NBD_REP_ERR_UNSUP", "INTEROP-005", expected="NBD_REP_ERR_UNSUP", observed=answer)
    answer = then_go(verdict, c, answer, shared_export)
    record(verdict, answer, "INTEROP-005", "INTEROP-006", "DISC-011")
    after(ref_client, shared_server, shared_export, answer)


# A malformed NBD_OPT_GO: "the export name length ... MUST be at most the option length minus 6"
# (GO-002, the client's); what the server answers is not said (NBD_REP_ERR_INVALID is the natural one).
@pytest.mark.req("DISC-010")
def test_go_name_overruns_option(server_peer, shared_server, shared_export, ref_client, verdict):
    """What does a server answer to an NBD_OPT_GO whose name length runs past the option's end?"""
    c = connect(ref_client, shared_server, opt_mode=True)
    data = (100).to_bytes(4, "big") + b"exp" + (0).to_bytes(2, "big")
    # sent as an unknown option, so the core does not see our GO-002 breach: it is one, on purpose
    c.connection.local_breach = True
    answer = then_go(verdict, c, final(option(c, ev.OptUnknown(option=Opt.GO, data=data))), shared_export)
    record(verdict, answer, "GO-002", "DISC-010")
    after(ref_client, shared_server, shared_export, answer)


# "NBD_OPT_STARTTLS": a NOTLS server "MUST respond with NBD_REP_ERR_POLICY (if it does not support TLS
# for policy reasons), NBD_REP_ERR_UNSUP (if it does not support the NBD_OPT_STARTTLS option at all) or
# another error explicitly permitted" and "MUST NOT respond to any option request with
# NBD_REP_ERR_TLS_REQD" (TLS-009, TLS-010).  The shared server runs without TLS.
@pytest.mark.req("TLS-009", "TLS-010")
def test_starttls_without_tls(server_peer, shared_server, shared_export, ref_client, verdict):
    """What does a server without TLS configured answer to NBD_OPT_STARTTLS?"""
    c = connect(ref_client, shared_server, opt_mode=True)
    answer = final(option(c, ev.OptStartTLS()))
    verdict.expect(answer != "NBD_REP_ERR_TLS_REQD", "TLS-010", expected="not NBD_REP_ERR_TLS_REQD",
                   observed=answer)
    verdict.expect(answer in ("NBD_REP_ERR_POLICY", "NBD_REP_ERR_UNSUP", "NBD_REP_ERR_INVALID"), "TLS-009",
                   expected="NBD_REP_ERR_POLICY or NBD_REP_ERR_UNSUP", observed=answer)
    if answer == "NBD_REP_ACK":
        return                          # the server waits for a TLS handshake: nothing more to ask
    record(verdict, then_go(verdict, c, answer, shared_export), "TLS-009", "TLS-010")
    after(ref_client, shared_server, shared_export, answer)


# --------------------------------------------------------------------------------------------------
# Export names


# Which export exists is the server's business; nbdkit's file plugin, for one, serves any name.  The
# answers to a missing name are recorded: NBD_REP_ERR_UNKNOWN ("the requested export is not available")
# is the usual one; "the server SHOULD NOT" have sent NBD_REP_INFO before it (GO-013, the core checks).
@pytest.mark.req("GO-013", "DISC-010")
@pytest.mark.parametrize("which", ["INFO", "GO"])
def test_missing_export(server_peer, shared_server, shared_export, ref_client, verdict, which):
    """What does a server answer to NBD_OPT_INFO / NBD_OPT_GO for an export it does not have?"""
    c = connect(ref_client, shared_server, opt_mode=True)
    cls = ev.OptInfo if which == "INFO" else ev.OptGo
    answer = final(option(c, cls(name=MISSING, info=(Info.BLOCK_SIZE,))))
    if which == "GO" and answer == "NBD_REP_ACK":
        record(verdict, "NBD_REP_ACK (serves any name)", "GO-013")
        return
    record(verdict, then_go(verdict, c, answer, shared_export), "GO-013", "DISC-010")
    after(ref_client, shared_server, shared_export, answer)


# "If the server is unwilling to allow the export, it MUST terminate the session" (OPT-001).
@pytest.mark.req("OPT-001")
def test_export_name_missing(server_peer, shared_server, shared_export, ref_client, verdict):
    """What does a server do with NBD_OPT_EXPORT_NAME for an export it does not have?"""
    c = connect(ref_client, shared_server, opt_mode=True)
    replies = option(c, ev.OptExportName(name=MISSING))
    answer = HARD if replies[-1] == HARD else ("export served (serves any name)"
                                                if isinstance(replies[-1], ev.ExportNameReply) else final(replies))
    verdict.expect(answer in (HARD, "export served (serves any name)"), "OPT-001",
                   expected="the session ends (or the name is served)", observed=answer)
    record(verdict, answer, "OPT-001")
    still_serves(ref_client, shared_server, shared_export)


# Strings "MUST" never exceed 4096 bytes and "SHOULD" be at most 256 (GEN-003, GEN-002): a name of
# 4096 bytes is legal and not served; one of 4097 breaks the client's MUST (a disconnect is allowed).
@pytest.mark.req("GEN-003", "DISC-010")
@pytest.mark.parametrize("length", [4096, 4097])
def test_long_export_name(server_peer, shared_server, shared_export, ref_client, verdict, length):
    """What does a server answer to NBD_OPT_INFO with an export name of 4096 / 4097 bytes?"""
    c = connect(ref_client, shared_server, opt_mode=True)
    answer = final(option(c, ev.OptInfo(name="n" * length, info=(Info.BLOCK_SIZE,))))
    record(verdict, then_go(verdict, c, answer, shared_export), "GEN-003", "DISC-010")
    after(ref_client, shared_server, shared_export, answer)


# NBD_OPT_INFO: the client "MUST NOT" list the same information request twice (GO-004, ours); the server
# "MUST ignore information requests it does not understand" (GO-005).
@pytest.mark.req("GO-005")
def test_info_unknown_request(server_peer, shared_server, shared_export, ref_client, verdict):
    """Does a server ignore an NBD_INFO_* type it does not know in NBD_OPT_INFO?"""
    c = connect(ref_client, shared_server, opt_mode=True)
    answer = final(option(c, ev.OptInfo(name="exp", info=(UNKNOWN_INFO,))))
    if answer == "NBD_REP_ERR_UNSUP":       # no NBD_OPT_INFO at all (before qemu 2.10, nbd-server 3.16)
        answer = "NBD_REP_ERR_UNSUP (no NBD_OPT_INFO)"
    else:
        verdict.expect(answer == "NBD_REP_ACK", "GO-005", expected="NBD_REP_ACK (the request ignored)",
                       observed=answer)
    record(verdict, then_go(verdict, c, answer, shared_export), "GO-005")
    after(ref_client, shared_server, shared_export, answer)


@pytest.mark.req("DISC-010")
def test_info_duplicate_request(server_peer, shared_server, shared_export, ref_client, verdict):
    """What does a server answer to NBD_OPT_INFO listing NBD_INFO_BLOCK_SIZE twice?"""
    c = connect(ref_client, shared_server, opt_mode=True)
    replies = option(c, ev.OptInfo(name="exp", info=(Info.BLOCK_SIZE, Info.BLOCK_SIZE)))
    answer = final(replies)
    sizes = sum(isinstance(r, ev.RepInfoBlockSize) for r in replies)
    if answer == "NBD_REP_ACK":
        answer += f" ({sizes} NBD_INFO_BLOCK_SIZE)"
    record(verdict, then_go(verdict, c, answer, shared_export), "GO-004", "DISC-010")
    after(ref_client, shared_server, shared_export, answer)


# --------------------------------------------------------------------------------------------------
# Sequences


# "the client MUST NOT send any further option requests [after NBD_OPT_GO] unless the final reply was an
# error" (GO-026): after a failed GO, options go on.  Three legal options the server refuses (an unknown
# one, INFO and GO for a missing export), then GO.  (A server that serves any name enters transmission
# at the second GO: recorded as such.)
@pytest.mark.req("DISC-010", "INTEROP-006")
def test_options_after_errors(server_peer, shared_server, shared_export, ref_client, verdict):
    """After three refused options in a row, does NBD_OPT_GO still work?"""
    c = connect(ref_client, shared_server, opt_mode=True)
    answers = []
    for event in (ev.OptUnknown(option=UNKNOWN_OPTION, data=b"abc"), ev.OptInfo(name=MISSING),
                  ev.OptGo(name=MISSING)):
        answers.append(final(option(c, event)))
        if answers[-1] == HARD or c.connection.state.name != "OPTIONS":
            break
    answer = then_go(verdict, c, ", ".join(answers), shared_export)
    record(verdict, answer, "DISC-010", "INTEROP-006")
    after(ref_client, shared_server, shared_export, answer)


@pytest.mark.req("DISC-010")
def test_go_after_failed_go(server_peer, shared_server, shared_export, ref_client, verdict):
    """After NBD_OPT_GO for a missing export fails, does NBD_OPT_GO for the right one work?"""
    c = connect(ref_client, shared_server, opt_mode=True)
    first = final(option(c, ev.OptGo(name=MISSING)))
    if first == "NBD_REP_ACK":
        record(verdict, "first NBD_OPT_GO acknowledged (serves any name)", "GO-026")
        return
    answer = then_go(verdict, c, first, shared_export)
    record(verdict, answer, "GO-026", "DISC-010")
    after(ref_client, shared_server, shared_export, answer)


# --------------------------------------------------------------------------------------------------
# Metadata contexts


def _meta(c, cls, queries: tuple[str, ...], name: str = "exp") -> tuple[str, list[str]]:
    replies = option(c, cls(name=name, queries=queries))
    return final(replies), context_names(replies)


def _listed(answer: str, names: list[str]) -> str:
    return f"{answer}: {', '.join(sorted(names)) or 'no context'}" if answer == "NBD_REP_ACK" else answer


# NBD_OPT_SET_META_CONTEXT before structured replies: the client "MUST NOT" (BS-043); the server
# "SHOULD" answer NBD_REP_ERR_INVALID (BS-044).  NBD_OPT_LIST_META_CONTEXT before them: the client
# "SHOULD NOT" (BS-025), the server "MAY" answer NBD_REP_ERR_INVALID (BS-026).
@pytest.mark.req("BS-044")
def test_set_meta_context_before_structured(server_peer, shared_server, shared_export, ref_client, verdict):
    """What does a server answer to NBD_OPT_SET_META_CONTEXT before structured replies were negotiated?"""
    c = connect(ref_client, shared_server, structured=False, opt_mode=True)
    answer, names = _meta(c, ev.OptSetMetaContext, (BASE,))
    _should(verdict, answer, "NBD_REP_ERR_INVALID", "BS-044")
    answer = then_go(verdict, c, _listed(answer, names), shared_export)
    record(verdict, answer, "BS-044")
    after(ref_client, shared_server, shared_export, answer)


@pytest.mark.req("BS-026", "DISC-010")
def test_list_meta_context_before_structured(server_peer, shared_server, shared_export, ref_client, verdict):
    """What does a server answer to NBD_OPT_LIST_META_CONTEXT before structured replies were negotiated?"""
    c = connect(ref_client, shared_server, structured=False, opt_mode=True)
    answer, names = _meta(c, ev.OptListMetaContext, (BASE,))
    answer = then_go(verdict, c, _listed(answer, names), shared_export)
    record(verdict, answer, "BS-026", "DISC-010")
    after(ref_client, shared_server, shared_export, answer)


# "If no queries are provided, the server MUST return all available metadata contexts" for LIST (BS-034),
# and SET with zero queries "MUST" select none (BS-047).
@pytest.mark.req("BS-034")
def test_list_meta_context_all(server_peer, shared_server, shared_export, ref_client, verdict):
    """Which metadata contexts does a server list for NBD_OPT_LIST_META_CONTEXT with no query?"""
    c = connect(ref_client, shared_server, opt_mode=True)
    answer, names = _meta(c, ev.OptListMetaContext, ())
    record(verdict, then_go(verdict, c, _listed(answer, names), shared_export), "BS-034", "BS-039")
    after(ref_client, shared_server, shared_export, answer)


@pytest.mark.req("BS-047")
def test_set_meta_context_none(server_peer, shared_server, shared_export, ref_client, verdict):
    """Does a server select no context for NBD_OPT_SET_META_CONTEXT with no query?"""
    c = connect(ref_client, shared_server, opt_mode=True)
    answer, names = _meta(c, ev.OptSetMetaContext, ())
    if answer == "NBD_REP_ACK":
        verdict.expect(not names, "BS-047", expected="no context selected", observed=", ".join(names))
    record(verdict, then_go(verdict, c, _listed(answer, names), shared_export), "BS-047")
    after(ref_client, shared_server, shared_export, answer)


# "base:" must be ignored by SET (BS-014) and lists every base context in LIST (BS-015); a query in an
# unknown namespace "MUST" be ignored (BS-030), so must an unknown base leaf (BS-016); a query without a
# colon breaks the client's MUST (BS-046) and the server "MAY" fail it with NBD_REP_ERR_INVALID (BS-029).
SET_QUERIES = {
    "base-wildcard": ("base:", "BS-014"),
    "unknown-namespace": ("x-nbd-harness-nosuch:leaf", "BS-030"),
    "unknown-base-leaf": ("base:nosuch", "BS-016"),
}


@pytest.mark.parametrize("which", [pytest.param(k, marks=pytest.mark.req(v[1])) for k, v in SET_QUERIES.items()])
def test_set_meta_context_ignored(server_peer, shared_server, shared_export, ref_client, verdict, which):
    """Does a server ignore a NBD_OPT_SET_META_CONTEXT query that must select nothing?"""
    query, req = SET_QUERIES[which]
    c = connect(ref_client, shared_server, opt_mode=True)
    answer, names = _meta(c, ev.OptSetMetaContext, (query,))
    if answer == "NBD_REP_ERR_UNSUP":       # no metadata contexts at all (INTEROP-005): nothing to ignore
        answer = "NBD_REP_ERR_UNSUP (no metadata contexts)"
    else:
        verdict.expect(answer == "NBD_REP_ACK" and not names, req, expected="NBD_REP_ACK, no context selected",
                       observed=_listed(answer, names))
    record(verdict, then_go(verdict, c, _listed(answer, names), shared_export), req)
    after(ref_client, shared_server, shared_export, answer)


@pytest.mark.req("BS-015")
def test_list_meta_context_base_wildcard(server_peer, shared_server, shared_export, ref_client, verdict):
    """Which contexts does a server list for the query "base:"?"""
    c = connect(ref_client, shared_server, opt_mode=True)
    answer, names = _meta(c, ev.OptListMetaContext, ("base:",))
    if answer == "NBD_REP_ACK":
        verdict.expect(all(n.startswith("base:") for n in names), "BS-015", expected="base: contexts only",
                       observed=", ".join(names))
    record(verdict, then_go(verdict, c, _listed(answer, names), shared_export), "BS-015")
    after(ref_client, shared_server, shared_export, answer)


@pytest.mark.req("BS-029", "DISC-010")
def test_meta_context_query_without_colon(server_peer, shared_server, shared_export, ref_client, verdict):
    """What does a server answer to NBD_OPT_SET_META_CONTEXT with a query that has no colon?"""
    c = connect(ref_client, shared_server, opt_mode=True)
    answer, names = _meta(c, ev.OptSetMetaContext, ("allocation",))
    answer = then_go(verdict, c, _listed(answer, names), shared_export)
    record(verdict, answer, "BS-029", "DISC-010")
    after(ref_client, shared_server, shared_export, answer)


@pytest.mark.req("DISC-010")
def test_set_meta_context_missing_export(server_peer, shared_server, shared_export, ref_client, verdict):
    """What does a server answer to NBD_OPT_SET_META_CONTEXT for an export it does not have?"""
    c = connect(ref_client, shared_server, opt_mode=True)
    answer, names = _meta(c, ev.OptSetMetaContext, (BASE,), name=MISSING)
    answer = then_go(verdict, c, _listed(answer, names), shared_export)
    record(verdict, answer, "BS-045", "DISC-010")
    after(ref_client, shared_server, shared_export, answer)
