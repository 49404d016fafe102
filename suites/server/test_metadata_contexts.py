"""Metadata contexts: NBD_OPT_LIST_META_CONTEXT and NBD_OPT_SET_META_CONTEXT, legal and illegal queries.

Every case works in the option phase (opt mode) and sends the options one by one, so the test sees each
reply sequence whole, errors included; after every error reply the next option must still be
understood.  A server without metadata contexts (NBD_REP_ERR_UNSUP, or no structured replies to build
on) gets its timeline verdict instead.
"""

from __future__ import annotations

import struct

import pytest
from nbdref import events as ev
from nbdref._constants import STRING_MAX, Err, Opt, Rep
from nbdref._strict import Strictness
from nbdref.client import Client, ClientError

from suites.server._common import BASE, held, option_replies, rep_name

SECTION = "Metadata querying"
LIST_FEATURE, SET_FEATURE = "NBD_OPT_LIST_META_CONTEXT", "NBD_OPT_SET_META_CONTEXT"
UNKNOWN_NS = "x-nosuch:foo"            # an experimental namespace no server defines
UNKNOWN_BASE = "base:nosuch"           # an unknown leaf of the base namespace
# "The namespace must be base, nbd-server, an x-* experimental namespace, or a registered third-party
# namespace (currently qemu)" (BS-009).
NAMESPACES = ("base", "nbd-server", "qemu")
PREMATURE_TEXTS = (
    "proto.md, NBD_OPT_SET_META_CONTEXT: \"If a client attempts to do so, a server SHOULD send "
    "NBD_REP_ERR_INVALID\" (BS-044)",
    "extension-ext-header draft, NBD_OPT_SET_META_CONTEXT: \"a server SHOULD send NBD_REP_ERR_INVALID or "
    "NBD_REP_ERR_EXT_HEADER_REQD\" (EXT-026)",
)


def option_client(ref_client, server, *, structured: bool = True, extended: bool = False,
                  strictness: Strictness | None = None) -> Client:
    """A client stopped in the option phase after asking for structured replies / extended headers."""
    def setup(c: Client) -> None:
        c.set_request_structured_replies(structured)
        c.set_request_extended_headers(extended)
    return ref_client(server, setup=setup, opt_mode=True, strictness=strictness)


def meta(c: Client, setting: bool, queries: tuple[str, ...] | list[str]) -> tuple[list[ev.RepMetaContext], object]:
    """One LIST/SET_META_CONTEXT for the client's export: (its NBD_REP_META_CONTEXT replies, the final one)."""
    cls = ev.OptSetMetaContext if setting else ev.OptListMetaContext
    replies = option_replies(c, cls(name=c.get_export_name(), queries=tuple(queries)))
    return [r for r in replies if isinstance(r, ev.RepMetaContext)], replies[-1]


def acked(final: object) -> bool:
    return isinstance(final, ev.RepAck)


def error_is(final: object, rep: Rep) -> bool:
    return isinstance(final, ev.RepError) and final.reply_type == rep


def supported(c: Client, verdict, export, feature: str) -> bool:
    """Meta contexts work on this connection: structured replies were agreed and a LIST of base:allocation
    is not refused as unsupported.  Otherwise the timeline judges the absence (both ways)."""
    if not c.get_structured_replies_negotiated():
        verdict.timeline(feature, False, export=export, how="no structured replies to build on")
        return False
    _, final = meta(c, False, [BASE])
    if error_is(final, Rep.ERR_UNSUP):
        verdict.timeline(feature, False, export=export, how=rep_name(final))
        return False
    verdict.timeline(feature, True, export=export)
    return True


def selects_base(c: Client) -> bool:
    """Whether SET_META_CONTEXT base:allocation selects it (what "the server supports block status" means)."""
    contexts, final = meta(c, True, [BASE])
    return acked(final) and [r.name for r in contexts] == [BASE]


# "If zero queries are sent, then the server MUST return all the metadata contexts that are available to
# the client to select on the given export" (BS-034), without NBD_REP_ERR_TOO_BIG (BS-035); each name "a
# namespace, a colon, then a leaf-name" (BS-007) obeying the string rules (BS-008) in a defined namespace
# (BS-009).  The core checks the reply sequence (BS-032), the namespace prefix (BS-040), the reserved id
# (BS-041) and UTF-8 (BS-053) on every NBD_REP_META_CONTEXT.
@pytest.mark.req("BS-007", "BS-008", "BS-009", "BS-032", "BS-034", "BS-035", "BS-040", "BS-041", "BS-053")
@pytest.mark.feature(LIST_FEATURE)
def test_list_all_contexts(server_peer, shared_server, shared_export, ref_client, verdict):
    """LIST with zero queries returns every context, each name well formed, in a defined namespace."""
    c = option_client(ref_client, shared_server)
    if not supported(c, verdict, shared_export, LIST_FEATURE):
        return
    contexts, final = meta(c, False, [])
    names = [r.name for r in contexts]
    verdict.info(f"LIST_META_CONTEXT with zero queries: {names} then {rep_name(final)}")
    verdict.expect(not error_is(final, Rep.ERR_TOO_BIG), "BS-035", expected="no NBD_REP_ERR_TOO_BIG for zero queries",
                   observed=rep_name(final))
    verdict.expect(acked(final) or error_is(final, Rep.ERR_TOO_BIG), "BS-034",
                   expected="every available context, then NBD_REP_ACK", observed=rep_name(final))
    for name in names:
        namespace, colon, _leaf = name.partition(":")
        verdict.expect(bool(colon and namespace), "BS-007", expected="namespace:leaf-name", observed=repr(name))
        raw = name.encode("utf-8", "surrogateescape")
        verdict.expect(len(raw) <= STRING_MAX and b"\0" not in raw, "BS-008",
                       expected="at most 4096 bytes, no NUL", observed=f"{len(raw)} bytes: {name[:80]!r}")
        verdict.expect(namespace in NAMESPACES or namespace.startswith("x-"), "BS-009",
                       expected=f"namespace in {NAMESPACES} or x-*", observed=repr(namespace))
    if selects_base(c):
        # "possibly as wildcards": a "base:" record covers base:allocation.
        verdict.expect(BASE in names or "base:" in names, "BS-034",
                       expected=f"{BASE} (selectable on this export) among all contexts", observed=str(names))


# LIST queries one by one: "base:" is a wildcard listing every base context (BS-015) and, being limited to
# base:, never ends in NBD_REP_ERR_EXT_HEADER_REQD (EXT-024); queries in unknown namespaces are ignored
# (BS-030) and unknown base: leaves too (BS-016), so nothing matching means a single NBD_REP_ACK (BS-031);
# otherwise the contexts matching at least one query come back (BS-036).
@pytest.mark.req("BS-015", "BS-016", "BS-030", "BS-031", "BS-036", "EXT-024", "BS-032")
@pytest.mark.feature(LIST_FEATURE)
def test_list_queries(server_peer, shared_server, shared_export, ref_client, verdict):
    """LIST 'base:', an unknown namespace, an unknown base: leaf, and a mixed query list."""
    c = option_client(ref_client, shared_server)
    if not supported(c, verdict, shared_export, LIST_FEATURE):
        return
    has_base = selects_base(c)
    contexts, final = meta(c, False, ["base:"])
    names = [r.name for r in contexts]
    verdict.expect(not error_is(final, Rep.ERR_EXT_HEADER_REQD), "EXT-024",
                   expected="no NBD_REP_ERR_EXT_HEADER_REQD for a base:-only query", observed=rep_name(final))
    if has_base:
        verdict.expect(acked(final) and BASE in names, "BS-015", expected=f"'base:' lists {BASE}",
                       observed=f"{names} then {rep_name(final)}")
    for query, rid in ((UNKNOWN_NS, "BS-030"), (UNKNOWN_BASE, "BS-016")):
        contexts, final = meta(c, False, [query])
        seen = f"{[r.name for r in contexts]} then {rep_name(final)}"
        verdict.expect(acked(final), rid, expected=f"{query!r} ignored, not an error", observed=seen)
        verdict.expect(acked(final) and not contexts, "BS-031", expected="a single NBD_REP_ACK", observed=seen)
    contexts, final = meta(c, False, [UNKNOWN_NS, BASE, UNKNOWN_BASE])
    names = [r.name for r in contexts]
    verdict.info(f"LIST {[UNKNOWN_NS, BASE, UNKNOWN_BASE]}: {names} then {rep_name(final)}")
    if has_base:
        verdict.expect(acked(final) and names == [BASE], "BS-036", expected=f"exactly [{BASE!r}]",
                       observed=f"{names} then {rep_name(final)}")


# SET queries that select nothing: "base:" (an empty leaf "SHOULD NOT select any contexts during
# NBD_OPT_SET_META_CONTEXT", BS-012; "MUST be ignored", BS-014), an unknown namespace (BS-030), an
# unknown base: leaf (BS-016) and zero queries (BS-047: "the server MUST select no metadata contexts"),
# each a single NBD_REP_ACK (BS-031).  Then a mixed list selects base:allocation once, with an id (BS-049),
# never NBD_REP_ERR_EXT_HEADER_REQD for base: only (EXT-028), and BLOCK_STATUS answers it (BS-002).
@pytest.mark.req("BS-012", "BS-014", "BS-016", "BS-030", "BS-031", "BS-047", "BS-049", "EXT-028", "BS-002",
                 "BS-005")
@pytest.mark.feature(SET_FEATURE)
def test_set_queries(server_peer, shared_server, shared_export, ref_client, verdict):
    """SET queries that select nothing, then one that selects base:allocation, then BLOCK_STATUS."""
    c = option_client(ref_client, shared_server)
    if not supported(c, verdict, shared_export, SET_FEATURE):
        return
    for queries, rids in ((["base:"], ("BS-012", "BS-014")), ([UNKNOWN_NS], ("BS-030",)),
                          ([UNKNOWN_BASE], ("BS-016",)), ([], ("BS-047",))):
        contexts, final = meta(c, True, queries)
        seen = f"{[r.name for r in contexts]} then {rep_name(final)}"
        verdict.expect(acked(final) and not contexts, *rids, "BS-031", expected=f"SET {queries} selects nothing "
                       "(a single NBD_REP_ACK)", observed=seen)
    contexts, final = meta(c, True, [UNKNOWN_NS, BASE, "base:", UNKNOWN_BASE])
    names = [r.name for r in contexts]
    verdict.expect(not error_is(final, Rep.ERR_EXT_HEADER_REQD), "EXT-028",
                   expected="no NBD_REP_ERR_EXT_HEADER_REQD for base: queries", observed=rep_name(final))
    verdict.info(f"SET {[UNKNOWN_NS, BASE, 'base:', UNKNOWN_BASE]}: {names} then {rep_name(final)}")
    if not (acked(final) and BASE in names):
        verdict.timeline("NBD_CMD_BLOCK_STATUS", False, export=shared_export, how=f"{names} {rep_name(final)}")
        return
    verdict.expect(names == [BASE], "BS-049", expected=f"one NBD_REP_META_CONTEXT for {BASE}", observed=str(names))
    c.opt_go()
    seen: list[str] = []
    c.block_status(65536, 0, lambda name, *_: seen.append(name))
    verdict.expect(seen == [BASE], "BS-002", expected=f"one chunk for {BASE}", observed=str(seen))


# "Issuing this command replaces all previously-set metadata contexts": after SET base:allocation, a SET
# with zero queries leaves none (BS-047), so BLOCK_STATUS "SHOULD" fail with NBD_EINVAL (BS-004); a status
# chunk for the forgotten id would break BS-002 (the core checks ids against the final SET).  With
# extended headers the GO reply then must not advertise NBD_FLAG_BLOCK_STATUS_PAYLOAD (EXT-012, core).
@pytest.mark.req("BS-004", "BS-047", "BS-002")
@pytest.mark.feature(SET_FEATURE)
@pytest.mark.parametrize("headers", ["compact", "extended"])
def test_set_replaces_earlier_contexts(server_peer, shared_server, shared_export, ref_client, verdict, headers):
    """A later SET with zero queries forgets base:allocation: BLOCK_STATUS then fails with EINVAL."""
    c = option_client(ref_client, shared_server, extended=headers == "extended",
                      strictness=Strictness(disabled={"BS-003"}))
    if headers == "extended" and not c.get_extended_headers_negotiated():
        verdict.timeline("NBD_OPT_EXTENDED_HEADERS", False, export=shared_export)
        return
    if not supported(c, verdict, shared_export, SET_FEATURE):
        return
    if not selects_base(c):
        verdict.timeline("NBD_CMD_BLOCK_STATUS", False, export=shared_export, how=f"SET {BASE} selected nothing")
        return
    contexts, final = meta(c, True, [])
    verdict.expect(acked(final) and not contexts, "BS-047", expected="zero queries select nothing",
                   observed=f"{[r.name for r in contexts]} then {rep_name(final)}")
    c.opt_go()
    _judge_no_context_block_status(c, verdict)
    # A status chunk for the forgotten context would be one for an id the final SET did not return.
    verdict.expect(held(c, "BS-002"), "BS-002", expected="no status chunk for a context no longer selected",
                   observed=", ".join(str(v) for v in c.violations) or "none")


def _judge_no_context_block_status(c: Client, verdict) -> None:
    """BLOCK_STATUS with no context selected: NBD_EINVAL expected (BS-004), the connection stays usable."""
    try:
        c.block_status(65536, 0, lambda *_: None)
        outcome = "success"
    except ClientError as e:
        outcome = "EINVAL" if e.errno == Err.EINVAL else str(e)
    verdict.expect(outcome == "EINVAL", "BS-004", expected="NBD_EINVAL (no context selected)", observed=outcome)
    if outcome in ("EINVAL", "success") or "failed" in outcome:
        assert len(c.pread(4096, 0)) == 4096     # the next command is still understood


# BLOCK_STATUS without any SET_META_CONTEXT: "The server SHOULD answer NBD_CMD_BLOCK_STATUS with NBD_EINVAL
# when no context was selected" (BS-004); also a server without block status, whose EINVAL is the one for
# an unknown command (answered as a simple reply without structured replies).
@pytest.mark.req("BS-004")
@pytest.mark.feature("NBD_CMD_BLOCK_STATUS")
def test_block_status_without_contexts(server_peer, shared_server, ref_client, verdict):
    """No context negotiated: BLOCK_STATUS fails with NBD_EINVAL and the connection stays usable."""
    c = ref_client(shared_server, strictness=Strictness(disabled={"BS-003", "CMD-008"}))
    _judge_no_context_block_status(c, verdict)


# "This option MUST NOT be requested unless structured replies or extended headers have been negotiated
# first.  If a client attempts to do so, a server SHOULD send NBD_REP_ERR_INVALID" (BS-044) - or, in the
# extension draft, "NBD_REP_ERR_INVALID or NBD_REP_ERR_EXT_HEADER_REQD" (EXT-026): a spec tension when the
# server picks the second.  A premature LIST "MAY" be refused the same way (recorded).  Afterwards the
# next options are understood: STRUCTURED_REPLY, then a SET that works.
@pytest.mark.req("BS-044", "EXT-026")
@pytest.mark.feature(SET_FEATURE)
def test_set_before_structured_replies(server_peer, shared_server, shared_export, ref_client, verdict):
    """SET_META_CONTEXT before structured replies is refused; the session goes on."""
    c = option_client(ref_client, shared_server, structured=False,
                      strictness=Strictness(disabled={"BS-043", "BS-025"}))
    contexts_l, final_l = meta(c, False, [BASE])
    verdict.info(f"premature LIST {BASE}: {[r.name for r in contexts_l]} then {rep_name(final_l)} (MAY refuse)")
    contexts, premature = meta(c, True, [BASE])
    if not c.opt_structured_reply():
        verdict.timeline(SET_FEATURE, False, export=shared_export, how="no structured replies")
        return
    later, final = meta(c, True, [BASE])
    if error_is(final, Rep.ERR_UNSUP) or (error_is(premature, Rep.ERR_UNSUP) and not acked(final)):
        verdict.timeline(SET_FEATURE, False, export=shared_export, how=rep_name(final))
        return
    verdict.timeline(SET_FEATURE, True, export=shared_export)
    seen = f"{[r.name for r in contexts]} then {rep_name(premature)}"
    verdict.info(f"premature SET {BASE}: {seen}")
    if error_is(premature, Rep.ERR_EXT_HEADER_REQD):
        verdict.tension("BS-044", "EXT-026", texts=PREMATURE_TEXTS, observed=seen)
    else:
        verdict.expect(error_is(premature, Rep.ERR_INVALID), "BS-044", "EXT-026",
                       expected="NBD_REP_ERR_INVALID (or NBD_REP_ERR_EXT_HEADER_REQD)", observed=seen)
    verdict.expect(acked(final), "BS-032", expected="after STRUCTURED_REPLY, SET works",
                   observed=f"{[r.name for r in later]} then {rep_name(final)}")


def _malformed(export: str, setting: bool) -> ev.OptUnknown:
    """LIST/SET_META_CONTEXT whose one query announces 100 bytes where only 5 follow."""
    name = export.encode()
    data = struct.pack(">I", len(name)) + name + struct.pack(">II", 1, 100) + b"base:"
    return ev.OptUnknown(option=Opt.SET_META_CONTEXT if setting else Opt.LIST_META_CONTEXT, data=data)


# "A syntactically invalid request (e.g. a query length running past the option length) MUST fail with
# NBD_REP_ERR_INVALID" (BS-028); the option length itself is right, so the server has read the whole
# option and the next one (a valid LIST) must be understood.
@pytest.mark.req("BS-028")
@pytest.mark.feature(LIST_FEATURE)
@pytest.mark.parametrize("option", ["list", "set"])
def test_malformed_query(server_peer, shared_server, shared_export, ref_client, verdict, option):
    """A query length past the end of the option: NBD_REP_ERR_INVALID, then the next option works."""
    c = option_client(ref_client, shared_server, strictness=Strictness(check_local=False))
    if not supported(c, verdict, shared_export, LIST_FEATURE):
        return
    try:
        replies = option_replies(c, _malformed(c.get_export_name(), option == "set"))
    except ClientError as e:
        verdict.fail("BS-028", expected="NBD_REP_ERR_INVALID", observed=f"no reply: {e}")
        return
    verdict.expect(error_is(replies[-1], Rep.ERR_INVALID), "BS-028", expected="NBD_REP_ERR_INVALID",
                   observed=", ".join(rep_name(r) for r in replies))
    contexts, final = meta(c, False, [BASE])
    assert isinstance(final, ev.RepAck | ev.RepError), "the next option was not answered"
    verdict.info(f"next LIST {BASE}: {[r.name for r in contexts]} then {rep_name(final)}")


# The extension draft's 64-bit contexts, judged black-box: a context the server selects with extended
# headers but not without them is one that "utilizes 64-bit status".  Without extended headers a SET must
# "either omit that context from its successful reply, or else fail the request with
# NBD_REP_ERR_EXT_HEADER_REQD" (EXT-027), a LIST naming it "SHOULD then conclude ... with
# NBD_REP_ERR_EXT_HEADER_REQD" (EXT-023), and with extended headers that failure is never used (EXT-024).
# No context of the base: or qemu: namespaces is 64-bit, so on today's servers both selections agree.
@pytest.mark.req("EXT-023", "EXT-024", "EXT-027")
@pytest.mark.feature("NBD_OPT_EXTENDED_HEADERS")
def test_contexts_with_and_without_extended_headers(server_peer, shared_server, shared_export, ref_client,
                                                    verdict):
    """What needs extended headers: contexts selected only with them are announced the draft's way."""
    ext = option_client(ref_client, shared_server, extended=True)
    if not ext.get_extended_headers_negotiated():
        verdict.timeline("NBD_OPT_EXTENDED_HEADERS", False, export=shared_export)
        return
    verdict.timeline("NBD_OPT_EXTENDED_HEADERS", True, export=shared_export)
    listed_e, final_e = meta(ext, False, [])
    if error_is(final_e, Rep.ERR_UNSUP):
        verdict.info("extended headers without metadata contexts", only=True)
        return
    verdict.expect(not error_is(final_e, Rep.ERR_EXT_HEADER_REQD), "EXT-024",
                   expected="no NBD_REP_ERR_EXT_HEADER_REQD once extended headers are negotiated",
                   observed=rep_name(final_e))
    queries = [r.name for r in listed_e if not r.name.endswith(":")][:16]
    chosen_e, _ = meta(ext, True, queries)
    compact = option_client(ref_client, shared_server)
    listed_c, final_c = meta(compact, False, [])
    chosen_c, set_c = meta(compact, True, queries)
    wide = {r.name for r in chosen_e} - {r.name for r in chosen_c}
    verdict.info(f"with extended headers {sorted(r.name for r in chosen_e)}, without "
                 f"{sorted(r.name for r in chosen_c)} then {rep_name(set_c)}")
    verdict.expect(acked(set_c) or (error_is(set_c, Rep.ERR_EXT_HEADER_REQD) and bool(wide)), "EXT-027",
                   expected="the same SET without extended headers succeeds (omitting 64-bit contexts) or fails "
                   "with NBD_REP_ERR_EXT_HEADER_REQD", observed=rep_name(set_c))
    named = wide & {r.name for r in listed_c}
    verdict.expect(not named or error_is(final_c, Rep.ERR_EXT_HEADER_REQD), "EXT-023",
                   expected="a list naming contexts that need extended headers ends in NBD_REP_ERR_EXT_HEADER_REQD",
                   observed=f"named {sorted(named)}, then {rep_name(final_c)}")


# Contexts only as negotiated: SET on one connection selects nothing on another (ids are per connection,
# "transient"), so a BLOCK_STATUS there is answered NBD_EINVAL (BS-004).
@pytest.mark.req("BS-004")
@pytest.mark.feature(SET_FEATURE)
def test_contexts_are_per_connection(server_peer, shared_server, shared_export, ref_client, verdict):
    """Contexts selected on one connection do not exist on a second one."""
    first = ref_client(shared_server, setup=lambda cl: cl.add_meta_context(BASE))
    if not first.can_meta_context(BASE):
        verdict.timeline("NBD_CMD_BLOCK_STATUS", False, export=shared_export)
        return
    second = ref_client(shared_server, strictness=Strictness(disabled={"BS-003"}))
    _judge_no_context_block_status(second, verdict)
    first.block_status(4096, 0, lambda *_: None)        # the first one's context still works
