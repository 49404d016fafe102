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
from suites.server._common import InProcessServer, acked, flag_names

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
    verdict.expect(c.get_size() == writable_export.size, "GO-012", expected=f"NBD_INFO_EXPORT size "
                   f"{writable_export.size}", observed=f"size {c.get_size()}")
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
        # its length was at least 2 (GO-035): the core's decoder checks and records that
        # Every adapter that can pass a description passes the export's: what comes back must be it.
        assert description == writable_export.description, f"description {description!r}"
    assert name in ("exp", ""), f"canonical name {name!r}"
    verdict.expect(c.pread(4096, 8192) == expected_bytes(writable_export, 8192, 4096), "RD-027",
                   expected="the export's bytes at 8192", observed="other bytes")


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


# "The server must ignore information requests it does not understand" (GO-005): a GO asking for info
# type 0x7fff still succeeds.  Each information type "should appear only once per export" (GO-028) and
# NBD_INFO_EXPORT comes before the ACK (GO-027, GO-012): the core counts them.
@pytest.mark.req("GO-005", "GO-027", "GO-028", "GO-012")
@pytest.mark.feature("NBD_OPT_GO")
def test_go_unknown_info_request(server_peer, shared_server, shared_export, ref_client, verdict):
    """An unknown NBD_INFO request is ignored: GO still succeeds."""
    c = ref_client(shared_server, opt_mode=True)
    c._info_request = lambda: (0x7FFF, 1, 2, 3)     # unknown, NAME, DESCRIPTION, BLOCK_SIZE
    try:
        c.opt_go()
    except ClientError as e:
        if e.reply is None:
            raise
        verdict.fail("GO-005", expected="NBD_OPT_GO with an unknown info request succeeds", observed=str(e))
        return
    verdict.timeline("NBD_OPT_GO", acked(c, Opt.GO), export=shared_export)
    verdict.expect(c.get_size() == shared_export.size, "GO-005", "GO-027",
                   expected=f"NBD_INFO_EXPORT size {shared_export.size}", observed=f"size {c.get_size()}")


# NBD_OPT_INFO / NBD_OPT_GO for an export that does not exist: NBD_REP_ERR_UNKNOWN, and "When answering
# NBD_REP_ERR_UNKNOWN the server should not have sent NBD_REP_INFO replies" (GO-013).  Then the next
# option, a GO for the real export, is understood -- the GO after a failed GO.
@pytest.mark.req("GO-013", "GO-012")
@pytest.mark.feature("NBD_OPT_GO")
@pytest.mark.parametrize("option", ["INFO", "GO"])
def test_missing_export(server_peer, shared_server, shared_export, ref_client, verdict, option):
    """INFO / GO for a missing export: an error without NBD_REP_INFO, and the next GO works."""
    from nbdref import events as ev

    c = ref_client(shared_server, opt_mode=True, strictness=Strictness.lenient())
    c.set_export_name("no-such-export")
    try:
        c.opt_info() if option == "INFO" else c.opt_go()
    except ClientError as e:
        if e.reply is None:             # the fallback NBD_OPT_EXPORT_NAME closes on an unknown export
            verdict.timeline("NBD_OPT_GO", False, export=shared_export, how=str(e))
            return
        kind = getattr(e.reply, "reply_type", None)
        verdict.info(f"NBD_OPT_{option} for a missing export: {e}")
        if kind == Rep.ERR_UNSUP:
            verdict.timeline(f"NBD_OPT_{option}", False, export=shared_export, how=str(e))
            return
        infos = [x.event for x in c.transcript if x.direction == "S" and isinstance(x.event, ev.RepInfo)]
        if kind == Rep.ERR_UNKNOWN:
            verdict.expect(not infos, "GO-013", expected="no NBD_REP_INFO before NBD_REP_ERR_UNKNOWN",
                           observed=f"{len(infos)} NBD_REP_INFO")
    else:
        # nbdkit's file plugin and others serve any name: no error is owed
        verdict.info(f"NBD_OPT_{option} for 'no-such-export' succeeded: the server serves any name", only=True)
        return
    c.set_export_name(shared_export.name)
    c.opt_go()
    verdict.expect(c.get_size() == shared_export.size, "GO-012", expected="the next GO is served",
                   observed=f"size {c.get_size()}")


# Without NBD_FLAG_C_NO_ZEROES as with it: "The server must not send zero padding after the NBD_REP_ACK to
# NBD_OPT_GO" (GO-025; the core treats bytes after the ACK as a transmission reply and checks them).
@pytest.mark.req("GO-025")
@pytest.mark.feature("NBD_OPT_GO")
@pytest.mark.parametrize("no_zeroes", [False, True], ids=["zeroes", "no-zeroes"])
def test_go_no_padding(server_peer, shared_server, shared_export, ref_client, verdict, no_zeroes):
    """After the GO ACK the next server bytes are a reply, with or without NO_ZEROES."""
    from nbdref._constants import ClientFlag

    flags = ClientFlag.FIXED_NEWSTYLE | (ClientFlag.NO_ZEROES if no_zeroes else 0)
    c = ref_client(shared_server, setup=lambda cl: cl.set_handshake_flags(flags))
    verdict.timeline("NBD_OPT_GO", acked(c, Opt.GO), export=shared_export)
    data = c.pread(512, 0)
    verdict.expect(data == expected_bytes(shared_export, 0, 512), "GO-025",
                   expected="the first READ after GO answered right", observed="other bytes")


# NBD_INFO_NAME and NBD_INFO_DESCRIPTION only when asked (a server MAY send them unasked; recorded), and
# their lengths "MUST" be at least 2 (GO-034/035, the core); INFO then GO with these requests agree.
@pytest.mark.req("GO-022")
@pytest.mark.feature("NBD_OPT_INFO")
@pytest.mark.parametrize("full", [False, True], ids=["block-size-only", "name-and-description"])
def test_info_then_go_full(server_peer, writable_server, writable_export, ref_client, verdict, full):
    """INFO then GO with the same info requests: the same size, flags, block sizes, name, description."""
    from nbdref import events as ev

    c = ref_client(writable_server, opt_mode=True, strictness=Strictness.lenient(), allow=("GO-022",),
                   setup=lambda cl: cl.set_full_info(full))
    try:
        c.opt_info()
    except ClientError as e:
        if e.reply is None:
            raise
        verdict.timeline("NBD_OPT_INFO", False, export=writable_export, how=str(e))
        return

    def seen() -> tuple:
        info = dict(c._info)
        return (info.get("size"), c.get_transmission_flags(), info.get("block_size"), info.get("name"),
                info.get("description"))

    info = seen()
    c.opt_go()
    go = seen()
    kinds = sorted({type(x.event).__name__ for x in c.transcript if x.direction == "S"
                    and isinstance(x.event, ev.RepInfo)})
    verdict.info(f"full={full}: replies {kinds}; INFO {info}; GO {go}")
    if info[1] ^ go[1] == TxFlag.BLOCK_STATUS_PAYLOAD:
        verdict.tension("GO-022", "EXT-012", texts=(GO022_TEXT, EXT012_TEXT), observed=f"INFO {info}; GO {go}")
        return
    verdict.expect(info == go, "GO-022", expected="the same information for INFO and GO",
                   observed=f"INFO {info}; GO {go}")


def _plain_option_client(ref_client, server):
    """A plaintext client in the option phase of a TLS server (no STARTTLS, no structured replies)."""
    from nbdref.uri import parse_uri

    def setup(cl):
        cl.set_request_extended_headers(False)
        cl.set_request_structured_replies(False)
        cl.set_opt_mode(True)

    c = ref_client(server, connect=False, strictness=Strictness.lenient(), setup=setup)
    address = parse_uri(server.uri).address()
    c.connect_unix(address) if isinstance(address, str) else c.connect_tcp(*address)
    return c


def _info_replies(c) -> list:
    from nbdref import events as ev

    return [x.event for x in c.transcript if x.direction == "S" and isinstance(x.event, ev.RepInfo)]


# FORCEDTLS: NBD_OPT_INFO before STARTTLS gets NBD_REP_ERR_TLS_REQD, and "A FORCEDTLS server answering
# NBD_REP_ERR_TLS_REQD must not send NBD_REP_INFO replies" (GO-014).
@pytest.mark.req("GO-014")
@pytest.mark.feature("NBD_OPT_INFO")
def test_info_before_tls(request, server_peer, ref_client, verdict):
    """NBD_OPT_INFO in plaintext to a FORCEDTLS server: refused without any NBD_REP_INFO."""
    from fixtures.plugin import tls_peer_server

    server = tls_peer_server(request, server_peer, "x509")
    c = _plain_option_client(ref_client, server)
    c.set_export_name("exp")
    try:
        c.opt_info()
    except ClientError as e:
        if e.reply is None:
            raise
        verdict.info(f"plaintext NBD_OPT_INFO: {e}")
        infos = _info_replies(c)
        verdict.expect(not infos, "GO-014", expected="no NBD_REP_INFO with the TLS refusal",
                       observed=f"{len(infos)} NBD_REP_INFO ({[type(i).__name__ for i in infos]})")
        return
    verdict.fail("GO-014", expected="NBD_REP_ERR_TLS_REQD to plaintext NBD_OPT_INFO", observed="NBD_REP_ACK")


# SELECTIVETLS with a TLS-only export, on the reference server (the only one whose exports the harness
# can make TLS-only): "A SELECTIVETLS server hiding unknown exports this way should not send NBD_REP_INFO
# for TLS-only exports" (GO-020), and the plain export is still served on the same connection.
@pytest.mark.req("GO-020")
@pytest.mark.feature("NBD_OPT_INFO")
def test_info_selective_tls(server_peer, peer_tls_material, tmp_path, ref_client, verdict):
    """Plaintext NBD_OPT_INFO for a TLS-only export: NBD_REP_ERR_TLS_REQD (or UNKNOWN), no NBD_REP_INFO."""
    from nbdref.server import Export, Server, TLSConfig

    if server_peer.implementation != "nbdref":
        verdict.not_applicable(f"{server_peer.implementation}: the harness cannot make one export TLS-only")
    exports = [Export.memory("open", 1 << 20), Export.memory("secret", 1 << 20, tls_only=True)]
    srv = Server(exports, persona=server_peer.persona, unix=str(tmp_path / "s.sock"),
                 tls=TLSConfig(mode="on", certificates=str(peer_tls_material.x509_dir)))
    srv.start()
    try:
        c = _plain_option_client(ref_client, InProcessServer(srv, srv.uri_for("open")))
        if c.get_protocol() != "newstyle-fixed":
            verdict.info("no option haggling", only=True)
            return
        c.set_export_name("secret")
        try:
            c.opt_info()
        except ClientError as e:
            if e.reply is None:
                raise
            if getattr(e.reply, "reply_type", None) == Rep.ERR_UNSUP:
                verdict.info(f"NBD_OPT_INFO not supported: {e}", only=True)
                return
            verdict.info(f"plaintext NBD_OPT_INFO for the TLS-only export: {e}")
            infos = _info_replies(c)
            verdict.expect(not infos, "GO-020", expected="no NBD_REP_INFO for a TLS-only export before TLS",
                           observed=f"{len(infos)} NBD_REP_INFO")
        else:
            verdict.fail("GO-020", expected="NBD_REP_ERR_TLS_REQD for a TLS-only export", observed="NBD_REP_ACK")
            return
        c.set_export_name("open")
        c.opt_go()
        verdict.expect(c.get_size() == 1 << 20, "GO-012", expected="the plain export served after the refusal",
                       observed=f"size {c.get_size()}")
    finally:
        srv.stop(timeout=5)


