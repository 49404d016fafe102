"""Extended headers (the extension-ext-header draft): negotiated, every reply extended, offsets echoed."""

from __future__ import annotations

import secrets
from collections.abc import Callable

import pytest
from nbdref import events as ev
from nbdref._constants import Cmd, CmdFlag, Err, Rep, TxFlag
from nbdref._errors import ProtocolError
from nbdref._strict import Strictness
from nbdref._wire import encode_block_status_payload
from nbdref.client import Client, ClientError

from fixtures.exports import expected_bytes
from suites.server._common import BASE, REGION, collect_extents, flag_names, held, option_replies, rep_name

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
    # The core records a breach of these on the reply that breaks them (a compact chunk, a simple reply, a
    # wrong offset, a GO refused as unsupported); a connected client with extended headers got past GO.
    verdict.expect(held(c, "EXT-005", "EXT-006", "EXT-007", "EXT-016"), "EXT-005", "EXT-006", "EXT-007", "EXT-016",
                   expected="extended reply chunks echoing the request offsets",
                   observed=", ".join(str(v) for v in c.violations) or "as expected")


def option_client(ref_client, server, *, strictness: Strictness | None = None, timeout: float = 10.0) -> Client:
    """A client stopped in the option phase, having asked for neither structured replies nor extended
    headers: the test negotiates them itself, in the order it wants."""
    def setup(c: Client) -> None:
        c.set_request_structured_replies(False)
        c.set_request_extended_headers(False)
    return ref_client(server, setup=setup, opt_mode=True, strictness=strictness, timeout=timeout)


def last_reply(c: Client) -> object:
    """The last option reply the server sent (for its name in what the test records)."""
    return [e.event for e in c.transcript if e.direction == "S" and isinstance(e.event, ev.OptionReply)][-1]


def go(c: Client, verdict) -> bool:
    """NBD_OPT_GO after extended headers: "the server MUST also support NBD_OPT_GO" (EXT-031)."""
    try:
        c.opt_go()
    except (ClientError, ProtocolError) as e:
        verdict.fail("EXT-031", expected="NBD_OPT_GO accepted after extended headers", observed=str(e))
        return False
    verdict.held("EXT-031", expected="NBD_OPT_GO accepted after extended headers", observed="accepted")
    return True


# Both orders and none: "A client MAY request structured replies first, although a server SHOULD support
# this option even if structured replies are not negotiated" (EXT-033); after EXTENDED_HEADERS a
# STRUCTURED_REPLY gets NBD_REP_ACK or "NBD_REP_ERR_EXT_HEADER_REQD: The client has already successfully
# negotiated extended headers, which takes precedence" (recorded) and extended headers stay: "the server
# MUST use the 32-byte extended reply header" (EXT-038; every chunk extended, EXT-006, never a simple
# reply, EXT-005, READ chunks of the negotiated magic, EXT-051), and GO is supported (EXT-031) and not
# refused as unsupported (EXT-016).  A server without the extension refuses it and serves compact headers,
# and GO without extended headers succeeds (EXT-058: no NBD_REP_ERR_EXT_HEADER_REQD).
@pytest.mark.req("EXT-005", "EXT-006", "EXT-016", "EXT-031", "EXT-038", "EXT-051")
@pytest.mark.feature("NBD_OPT_EXTENDED_HEADERS")
@pytest.mark.parametrize("order", [pytest.param("ext-only", marks=pytest.mark.req("EXT-033")), "sr-then-ext",
                                   "ext-then-sr"])
def test_negotiation_orders(server_peer, shared_server, shared_export, ref_client, verdict, order):
    """EXTENDED_HEADERS alone, after and before STRUCTURED_REPLY: then GO and a READ in extended form."""
    c = option_client(ref_client, shared_server)
    steps = []
    if order == "sr-then-ext":
        steps.append(f"STRUCTURED_REPLY {'ACK' if c.opt_structured_reply() else 'refused'}")
    extended = c.opt_extended_headers()
    steps.append(f"EXTENDED_HEADERS {rep_name(last_reply(c))}")
    if extended and order == "ext-then-sr":
        # NBD_REP_ACK, NBD_REP_ERR_EXT_HEADER_REQD "or ... an error permitted elsewhere": recorded
        sr = option_replies(c, ev.OptStructuredReply())[-1]
        steps.append(f"STRUCTURED_REPLY {rep_name(sr)}")
    verdict.info(" then ".join(steps))
    verdict.timeline("NBD_OPT_EXTENDED_HEADERS", extended, export=shared_export, how=steps[-1])
    if order == "ext-only":
        # Refused alone but accepted after STRUCTURED_REPLY (a second connection) breaks EXT-033.
        after_sr = False
        if not extended:
            other = option_client(ref_client, shared_server)
            after_sr = other.opt_structured_reply() and other.opt_extended_headers()
        verdict.expect(extended or not after_sr, "EXT-033", expected="EXTENDED_HEADERS accepted without "
                       "structured replies", observed=steps[-1] + (" (accepted after STRUCTURED_REPLY)" if after_sr else ""))
    if not extended:
        try:
            c.opt_go()
            outcome = "GO accepted"
        except ClientError as e:
            outcome = str(e)
        verdict.info(f"GO without extended headers: {outcome}")
        assert outcome == "GO accepted", outcome
        assert c.pread(4096, 0) == expected_bytes(shared_export, 0, 4096)
        return
    if not go(c, verdict):
        return
    assert c.get_extended_headers_negotiated()
    for offset in (0, shared_export.size - 65536):
        assert c.pread(65536, offset) == expected_bytes(shared_export, offset, 65536)
    verdict.expect(held(c, "EXT-005", "EXT-006", "EXT-051", "EXT-016"), "EXT-005", "EXT-006", "EXT-016", "EXT-038",
                   "EXT-051", expected="every reply a 32-byte extended reply chunk",
                   observed=", ".join(str(v) for v in c.violations) or "extended replies")


# "The client MUST NOT send any additional data with the option, and the server SHOULD reject a request
# that includes data with NBD_REP_ERR_INVALID" (EXT-030); the next option (EXTENDED_HEADERS without data)
# must be understood, and GO works after it.
@pytest.mark.req("EXT-030")
@pytest.mark.feature("NBD_OPT_EXTENDED_HEADERS")
def test_extended_headers_with_data(server_peer, shared_server, shared_export, ref_client, verdict):
    """EXTENDED_HEADERS carrying data is refused with NBD_REP_ERR_INVALID; a clean one is then accepted."""
    c = option_client(ref_client, shared_server, strictness=Strictness(disabled={"EXT-029", "OPT-005"}))
    first = option_replies(c, ev.OptExtendedHeaders(data=b"\0\0\0\0"))[-1]
    if isinstance(first, ev.RepAck):
        verdict.fail("EXT-030", expected="NBD_REP_ERR_INVALID", observed="NBD_REP_ACK to the option with 4 bytes")
        go(c, verdict)
        return
    extended = c.opt_extended_headers()
    second = last_reply(c)
    verdict.timeline("NBD_OPT_EXTENDED_HEADERS", extended, export=shared_export, how=rep_name(second))
    verdict.info(f"with data: {rep_name(first)}; without: {rep_name(second)}")
    if extended:
        verdict.expect(first.reply_type == Rep.ERR_INVALID, "EXT-030", expected="NBD_REP_ERR_INVALID",
                       observed=rep_name(first))
        if go(c, verdict):
            assert c.pread(4096, 0) == expected_bytes(shared_export, 0, 4096)


# Flags before the extension is on: "NBD_FLAG_SEND_DF ... MUST be clear if neither structured replies
# nor extended headers were negotiated" (EXT-010); extensions needing reply payloads are not advertised
# before structured replies or extended headers (EXT-017: DF and BLOCK_STATUS_PAYLOAD), extensions with
# request payloads not before extended headers (EXT-035: BLOCK_STATUS_PAYLOAD, "Servers MUST NOT
# advertise this bit unless the client successfully negotiates extended headers", EXT-011); and GO
# without extended headers succeeds (EXT-058).
@pytest.mark.req("EXT-011", "EXT-035", "EXT-058")
@pytest.mark.feature("NBD_OPT_GO")
@pytest.mark.parametrize("replies", [pytest.param("none", marks=pytest.mark.req("EXT-010", "EXT-017")), "structured"])
def test_flags_without_extended_headers(server_peer, shared_server, ref_client, verdict, replies):
    """GO without extended headers: no BLOCK_STATUS_PAYLOAD, and no DF without structured replies."""
    def setup(c: Client) -> None:
        c.set_request_extended_headers(False)
        c.set_request_structured_replies(replies == "structured")
        c.add_meta_context(BASE)
    try:
        c = ref_client(shared_server, setup=setup)
    except ClientError as e:
        verdict.fail("EXT-058", expected="GO without extended headers succeeds", observed=str(e))
        return
    flags = c.get_transmission_flags()
    structured = c.get_structured_replies_negotiated()
    verdict.info(f"structured replies {structured}: flags {flag_names(flags)}")
    verdict.expect(not flags & TxFlag.BLOCK_STATUS_PAYLOAD, "EXT-011", "EXT-035", expected="BLOCK_STATUS_PAYLOAD clear",
                   observed=flag_names(flags))
    if not structured:
        verdict.expect(not flags & (TxFlag.SEND_DF | TxFlag.BLOCK_STATUS_PAYLOAD), "EXT-010", "EXT-017",
                       expected="SEND_DF and BLOCK_STATUS_PAYLOAD clear", observed=flag_names(flags))
    verdict.held("EXT-058", expected="GO without extended headers succeeds", observed="it did")


def extended_client(ref_client, server, verdict, export, *, contexts: bool = False, timeout: float = 10.0,
                    strictness: Strictness | None = None, allow: tuple[str, ...] = ()) -> Client | None:
    """A client with extended headers (and base:allocation if ``contexts``), or None after the timeline."""
    def setup(c: Client) -> None:
        if contexts:
            c.add_meta_context(BASE)
    c = ref_client(server, setup=setup, timeout=timeout, strictness=strictness, allow=allow)
    if not c.get_extended_headers_negotiated():
        verdict.timeline("NBD_OPT_EXTENDED_HEADERS", False, export=export)
        return None
    verdict.timeline("NBD_OPT_EXTENDED_HEADERS", True, export=export)
    return c


# "A server SHOULD hard-disconnect if PAYLOAD_LEN announces more than its advertised or default maximum
# payload" (EXT-003): a WRITE header announcing 2^33 bytes, and no payload after it.  A server that
# waits for the 8 GiB, or answers and carries on, breaks the SHOULD.
@pytest.mark.req("EXT-003")
@pytest.mark.feature("NBD_OPT_EXTENDED_HEADERS")
def test_payload_over_maximum(server_peer, writable_server, writable_export, region, ref_client, verdict):
    """A WRITE announcing a 2^33-byte payload ends the session."""
    # The WRITE also reaches past the end of the export: which error a server that answers picks is not
    # ERR-001's question here (allowed), the disconnect is.
    c = extended_client(ref_client, writable_server, verdict, writable_export, timeout=5.0,
                        strictness=Strictness(check_local=False), allow=("ERR-001",))
    if c is None:
        return
    offset = region(REGION)
    outcome = outcome_of(lambda: c.wait(c.aio_command(Cmd.WRITE, offset, 1 << 33, CmdFlag.PAYLOAD_LEN)))
    if outcome != "disconnected":
        # An error reply then the disconnect (qemu: "Request handling failed in intermediate state") ends
        # the session as well; a READ then shows whether the server is still there.
        answer = outcome
        outcome = outcome_of(lambda: c.pread(512, 0))
        outcome = f"{answer}, then {outcome}" if outcome != "disconnected" else "disconnected"
        verdict.info(f"answered {answer} before the disconnect" if outcome == "disconnected" else outcome)
    verdict.expect(outcome == "disconnected", "EXT-003", expected="a hard disconnect", observed=outcome)


def outcome_of(command: Callable[[], object]) -> str:
    """success / disconnected / the error / no answer, of one command sent and waited for."""
    try:
        command()
        return "success"
    except ClientError as e:
        return "disconnected" if "closed" in str(e) else str(e)
    except TimeoutError:
        return "no answer within the timeout"
    except ConnectionError:             # reset or broken pipe: the server is gone
        return "disconnected"


# "Otherwise the server SHOULD consume the announced payload (even if it then fails the command with
# NBD_EINVAL) and continue" (EXT-004): TRIM carries no payload, here one of 16 bytes; whatever the
# TRIM's answer, the READ after it must be understood.
@pytest.mark.req("EXT-004")
@pytest.mark.feature("NBD_OPT_EXTENDED_HEADERS")
def test_unexpected_payload_is_consumed(server_peer, writable_server, writable_export, region, ref_client, verdict):
    """A 16-byte payload on TRIM is read and skipped: the next command works."""
    c = extended_client(ref_client, writable_server, verdict, writable_export, strictness=Strictness(check_local=False))
    if c is None:
        return
    offset = region(REGION)
    data = secrets.token_bytes(4096)
    c.pwrite(data, offset)
    command = Cmd.TRIM if c.can_trim() else Cmd.FLUSH
    try:
        c.wait(c.aio_command(command, offset + 8192, 16, payload=b"\xee" * 16))
        outcome = "success"
    except ClientError as e:
        outcome = str(e)
    verdict.info(f"{command.name} with a 16-byte payload: {outcome}")
    try:
        ok = c.pread(4096, offset) == data
        after = "READ answered" if ok else "READ answered with the wrong data"
    except (ClientError, ProtocolError, TimeoutError) as e:
        ok, after = False, str(e)
    verdict.expect(ok, "EXT-004", expected="the payload consumed, the next READ answered", observed=after)


# The payload form of BLOCK_STATUS: "If the server does not support the payload form, or detects
# duplicate or unknown metacontext ids in the client's payload, the server MUST gracefully consume the
# client's payload before failing with NBD_EINVAL" (EXT-055); an effect length past the end "SHOULD" fail
# with NBD_EINVAL (EXT-057).  After each, a READ must work.  Without NBD_FLAG_BLOCK_STATUS_PAYLOAD, the
# well-formed payload is the unsupported case.
@pytest.mark.req("EXT-055", "EXT-057")
@pytest.mark.feature("NBD_FLAG_BLOCK_STATUS_PAYLOAD")
def test_block_status_payload_refusals(server_peer, shared_server, shared_export, ref_client, verdict):
    """Duplicate and unknown ids, an effect length past the end, or no payload support: NBD_EINVAL."""
    c = extended_client(ref_client, shared_server, verdict, shared_export, contexts=True,
                        strictness=Strictness(check_local=False))
    if c is None:
        return
    if not c.can_meta_context(BASE):
        verdict.info("no base:allocation to name in a payload", only=True)
        return
    (cid,) = [i for i, name in c.get_meta_contexts().items() if name == BASE]
    supported = bool(c.get_transmission_flags() & TxFlag.BLOCK_STATUS_PAYLOAD)
    size = shared_export.size
    if supported:
        cases = [("duplicate ids", 4096, 0, (cid, cid), "EXT-055"), ("unknown id", 4096, 0, (cid + 1000,), "EXT-055"),
                 ("effect length past the end", 8192, size - 4096, (cid,), "EXT-057")]
    else:
        cases = [("payload form not advertised", 4096, 0, (cid,), "EXT-055")]
    for what, length, offset, ids, rid in cases:
        payload = encode_block_status_payload(length, ids)
        try:
            c.wait(c.aio_command(Cmd.BLOCK_STATUS, offset, len(payload), payload=payload, extent_cb=lambda *_: None))
            outcome = "success"
        except ClientError as e:
            outcome = "EINVAL" if e.errno == Err.EINVAL else str(e)
        verdict.expect(outcome == "EINVAL", rid, expected="NBD_EINVAL", observed=f"{what}: {outcome}")
        assert c.pread(4096, 0) == expected_bytes(shared_export, 0, 4096), f"READ after {what}"


@pytest.fixture
def selective_tls_server(request, server_peer, verdict):
    """An in-process reference server of the peer's persona in SELECTIVETLS mode (options are answered
    before STARTTLS), for the nbdref peers; stopped at the end of the test."""
    if server_peer.launcher != "in-process":
        verdict.not_applicable(f"{server_peer.id}: the harness runs it with TLS in FORCEDTLS mode only, where every "
                               "option before STARTTLS is refused: nothing negotiated before it can be remembered")
    from fixtures.expectations import option_haggling
    why = option_haggling(server_peer)
    if why is not None:
        verdict.not_applicable(f"needs option haggling: {why}")
    from nbdref.server import Export, Server, TLSConfig
    material = request.getfixturevalue("peer_tls_material")
    srv = Server([Export.memory("exp", 1 << 20)], persona=server_peer.persona, host="127.0.0.1", port=0,
                 tls=TLSConfig(mode="on", certificates=str(material.x509_dir)))
    srv.start()
    yield srv, material
    srv.stop(timeout=5)


# "When this command succeeds, the server MUST NOT preserve any negotiation state (such as a request for
# NBD_OPT_STRUCTURED_REPLY or NBD_OPT_EXTENDED_HEADERS, or metadata contexts from NBD_OPT_SET_META_CONTEXT)
# issued before this command" (EXT-015): extended headers and base:allocation negotiated in plaintext,
# then STARTTLS and GO: the READ gets a simple reply (the core records a breach for any other), no
# NBD_FLAG_BLOCK_STATUS_PAYLOAD is advertised (EXT-011), and BLOCK_STATUS fails with NBD_EINVAL, no
# context being selected any more (BS-004).
@pytest.mark.req("EXT-015", "EXT-011", "BS-004")
@pytest.mark.feature("NBD_OPT_EXTENDED_HEADERS")
def test_starttls_forgets_extended_headers(server_peer, selective_tls_server, ref_client, verdict):
    """Extended headers and contexts from before STARTTLS are forgotten after it."""
    srv, material = selective_tls_server

    def setup(c: Client) -> None:
        c.set_request_structured_replies(False)
        c.set_request_extended_headers(False)
        c.set_tls("disable")                 # STARTTLS is sent by the test, after the other options
        c.set_tls_certificates(material.x509_dir)
        c.set_tls_hostname("localhost")
    c = ref_client(srv, setup=setup, opt_mode=True, strictness=Strictness(disabled={"BS-003"}), connect=False)
    host, port = srv.address
    c.set_export_name("exp")
    c.connect_tcp(host, port)            # not its URI: an nbds:// URI would start with STARTTLS
    extended = c.opt_extended_headers()
    verdict.timeline("NBD_OPT_EXTENDED_HEADERS", extended, export=None)
    if not extended:
        return
    contexts = c.opt_set_meta_context([BASE])
    assert contexts == [BASE], f"SET {BASE} selected {contexts}"
    assert c.opt_starttls(), "STARTTLS refused by a SELECTIVETLS server"
    c.opt_go()
    flags = c.get_transmission_flags()
    verdict.expect(not flags & TxFlag.BLOCK_STATUS_PAYLOAD, "EXT-011", expected="BLOCK_STATUS_PAYLOAD clear",
                   observed=flag_names(flags))
    data = c.pread(4096, 0)
    verdict.expect(data == bytes(4096) and held(c, "SR-001", "EXT-051", "EXT-005"), "EXT-015",
                   expected="a simple reply to READ (extended headers forgotten)",
                   observed=", ".join(str(v) for v in c.violations) or "a simple reply")
    try:
        c.block_status(4096, 0, lambda *_: None)
        outcome = "success"
    except ClientError as e:
        outcome = "EINVAL" if e.errno == Err.EINVAL else str(e)
    verdict.expect(outcome == "EINVAL", "BS-004", "EXT-015", expected="NBD_EINVAL (contexts forgotten)",
                   observed=outcome)
