"""TLS on the server side: every server peer in FORCEDTLS mode, over X.509 (with and without client
certificates checked) and TLS-PSK, against the strict reference client and plaintext clients.

Each server gets: a TLS reference client that must negotiate TLS and read known bytes; plaintext clients
whose options must all be refused with NBD_REP_ERR_TLS_REQD (one per connection, then all on one
connection); a plaintext NBD_OPT_EXPORT_NAME that must end the session; and, where client certificates
are checked, a client without one that must not get in.  A TLS kind the matrix row does not list is
not-applicable; known breaches are in suites/baseline.yaml.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import ssl
import struct
from typing import Any

import pytest
from nbdref import events as ev
from nbdref._constants import Magic, Opt, Rep
from nbdref._errors import ProtocolError
from nbdref.client import ClientError

from fixtures.exports import expected_bytes
from fixtures.judging import HarnessError
from fixtures.timeline import tls_feature
from suites.server._common import acked, option_replies
from suites.server._haggle import UNKNOWN_OPTION, Plain, drain, name

SECTION = "TLS support"
MiB = 1 << 20
KINDS = ("x509", "x509-verify", "psk")
TIMEOUT = 10.0
OFFSET = 3 * MiB + 512                  # not at 0 and not 4 KiB-aligned: the pattern differs per sector


@pytest.fixture(params=KINDS)
def kind(request) -> str:
    return str(request.param)


@pytest.fixture
def tls_server(request, server_peer, kind):
    from fixtures.plugin import tls_peer_server
    return tls_peer_server(request, server_peer, kind)


# The URI (uri.md) carries everything: nbds scheme = TLS required (URI-003/005), tls-certificates for
# X.509 (the directory has client-cert.pem, so the client presents it), user@ + tls-psk-file for PSK.
# The core checks every option reply and transmission reply against the server's rules.
# FORCEDTLS: STARTTLS "MUST" be answered with NBD_REP_ACK (TLS-011, TLS-053), the server is then ready
# for the handshake (TLS-013), everything after it travels over TLS (TLS-014: the data read is right),
# and no option inside TLS gets NBD_REP_ERR_TLS_REQD (TLS-020).  A server that does TLS follows
# "implementations wanting maximum interoperability should support TLS" (INTEROP-014); a row without TLS
# material is not-applicable here, so only the support of the servers configured for it is judged.
@pytest.mark.req("TLS-011", "TLS-013", "TLS-014", "TLS-020", "TLS-053", "INTEROP-014")
@pytest.mark.feature("NBD_OPT_STARTTLS")
def test_tls_read(server_peer, kind, tls_server, ref_client, verdict):
    """A TLS client negotiates TLS and reads known bytes."""
    c = ref_client(tls_server)
    negotiated = c.get_tls_negotiated()
    verdict.timeline(tls_feature(kind), negotiated, export=tls_server.export)
    verdict.expect(negotiated and acked(c, Opt.STARTTLS), "TLS-011", "TLS-053", "TLS-013", "INTEROP-014",
                   expected="NBD_REP_ACK to NBD_OPT_STARTTLS, then a TLS handshake", observed=f"TLS {negotiated}")
    assert negotiated, "connected without TLS to a FORCEDTLS server"
    assert c.get_size() == tls_server.export.size
    data = c.pread(4096, OFFSET)
    verdict.expect(data == expected_bytes(tls_server.export, OFFSET, 4096), "TLS-014",
                   expected="the export's bytes over TLS", observed="other bytes")
    refused = [e.event for e in c.transcript if e.direction == "S" and isinstance(e.event, ev.RepError)
               and e.event.reply_type == Rep.ERR_TLS_REQD]
    verdict.expect(not refused, "TLS-020", expected="no NBD_REP_ERR_TLS_REQD inside TLS", observed=str(refused))


def _name(reply: Any) -> str:
    return name(reply)


PLAIN_OPTIONS: tuple[tuple[str, ev.Option], ...] = (
    ("LIST", ev.OptList()), ("INFO", ev.OptInfo(name="exp")), ("STRUCTURED_REPLY", ev.OptStructuredReply()),
    (f"unknown {UNKNOWN_OPTION:#x}", ev.OptUnknown(option=UNKNOWN_OPTION, data=b"tls?")),
    ("LIST_META_CONTEXT", ev.OptListMetaContext(name="exp", queries=("base:allocation",))),
    ("SET_META_CONTEXT", ev.OptSetMetaContext(name="exp", queries=("base:allocation",))),
    ("EXTENDED_HEADERS", ev.OptExtendedHeaders()),
    ("GO", ev.OptGo(name="exp")))


ABORT_TEXTS = (
    "proto.md, NBD_OPT_ABORT: \"The server MUST reply with NBD_REP_ACK\" (OPT-011); the TLS mode overview "
    "errors \"any NBD options other than NBD_OPT_STARTTLS or NBD_OPT_ABORT\" with NBD_REP_ERR_TLS_REQD",
    "proto.md, FORCEDTLS: \"If the server receives any other option, including NBD_OPT_INFO and unsupported "
    "options, it MUST reply with NBD_REP_ERR_TLS_REQD if TLS has not been initiated\" (TLS-017)",
)


def _judge_abort(verdict, answer: str) -> None:
    """A plaintext NBD_OPT_ABORT's answer (see the comment)."""
    if answer == "NBD_REP_ERR_TLS_REQD":
        # NBD_OPT_ABORT: "The server MUST reply with NBD_REP_ACK" (OPT-011), and the mode overview errors
        # "any NBD options other than NBD_OPT_STARTTLS or NBD_OPT_ABORT with NBD_REP_ERR_TLS_REQD".  But
        # the FORCEDTLS section says "If the server receives any other option [than STARTTLS] ... it MUST
        # reply with NBD_REP_ERR_TLS_REQD" (TLS-017), which read literally includes NBD_OPT_ABORT.  A
        # server answering ABORT with ERR_TLS_REQD follows one MUST sentence and breaks the other: the spec
        # conflicts, so this answer is reported (table, warning), not failed.
        verdict.tension("OPT-011", "TLS-017", texts=ABORT_TEXTS,
                        observed="NBD_OPT_ABORT before TLS answered with NBD_REP_ERR_TLS_REQD")
        return
    if answer == "not sent (closed)":
        # the session had ended before: NBD_OPT_ABORT was never sent, so nothing about OPT-011 was seen
        verdict.info("NBD_OPT_ABORT not sent: the server had closed the session")
        return
    # "The server MUST reply with NBD_REP_ACK" (OPT-011).  The client "SHOULD gracefully handle the
    # server closing the connection ... without it sending a reply" (OPT-014) because "previous versions
    # of this document were unclear": a close is what clients tolerate, not the reply the server owes.
    verdict.expect(answer == "RepAck", "OPT-011", expected="NBD_REP_ACK", observed=f"NBD_OPT_ABORT answered with {answer}")


# FORCEDTLS: "If the server receives any other option, including NBD_OPT_INFO and unsupported options,
# it MUST reply with NBD_REP_ERR_TLS_REQD if TLS has not been initiated" (TLS-017); "If the server
# receives a request to enter transmission mode via NBD_OPT_GO when TLS has not been initiated, it MUST
# error with NBD_REP_ERR_TLS_REQD" (TLS-019).  One connection per option, then NBD_OPT_ABORT.
@pytest.mark.parametrize("label", [
    pytest.param(label, id=label, marks=pytest.mark.req("TLS-019" if label == "GO" else "TLS-017", "TLS-001", "TLS-008"))
    for label, _ in PLAIN_OPTIONS])
@pytest.mark.feature("NBD_OPT_STARTTLS")
def test_plaintext_option_refused(server_peer, kind, tls_server, verdict, label):
    """A plaintext option to a FORCEDTLS server is refused with NBD_REP_ERR_TLS_REQD."""
    option = dict(PLAIN_OPTIONS)[label]
    plain = Plain(tls_server)
    verdict.watch(plain.conn)
    try:
        # "A server must operate in NOTLS mode unless it set NBD_FLAG_FIXED_NEWSTYLE" (TLS-008): a
        # FORCEDTLS server (one of the three modes, TLS-001) offers fixed newstyle
        verdict.expect(plain.fixed, "TLS-008", "TLS-001", expected="NBD_FLAG_FIXED_NEWSTYLE from a TLS server",
                       observed=f"handshake flags {int(plain.greeting.flags):#x}")
        answer = ", ".join(_name(r) for r in plain.option(option))
        try:
            abort = ", ".join(_name(r) for r in plain.option(ev.OptAbort())) if plain.open else "not sent (closed)"
        except OSError:                 # closed under our feet (see test_plaintext_options_in_sequence)
            abort = "not sent (closed)"
    finally:
        plain.close()
    ids = ("TLS-019",) if label == "GO" else ("TLS-017",)
    verdict.expect(answer == "NBD_REP_ERR_TLS_REQD", *ids, expected=f"NBD_REP_ERR_TLS_REQD to {label} before TLS",
                   observed=answer)
    _judge_abort(verdict, abort)


# The server "MUST be consistent in its mode of operation across the lifespan of a single TCP
# connection" (TLS-006) and "must still parse the next option correctly (skip the unknown option's
# data)" (INTEROP-006): options with and without data, one after another on one connection, are each
# refused with NBD_REP_ERR_TLS_REQD and the session stays in option haggling.
@pytest.mark.req("TLS-006", "TLS-017", "INTEROP-006")
@pytest.mark.feature("NBD_OPT_STARTTLS")
def test_plaintext_options_in_sequence(server_peer, kind, tls_server, verdict):
    """Plaintext options one after another on one connection are each refused, data and all."""
    plain = Plain(tls_server)
    verdict.watch(plain.conn)
    answers: dict[str, str] = {}
    try:
        for label, option in (*PLAIN_OPTIONS, ("LIST again", ev.OptList())):
            if plain.conn.state.name != "OPTIONS":
                answers[label] = "not sent (closed)"
                continue
            answers[label] = ", ".join(_name(r) for r in plain.option(option))
        abort = ", ".join(_name(r) for r in plain.option(ev.OptAbort())) if plain.conn.state.name == "OPTIONS" \
            else "not sent (closed)"
    finally:
        plain.close()
    wrong = {k: v for k, v in answers.items() if v != "NBD_REP_ERR_TLS_REQD"}
    # Two different breaches, named apart so the baseline can tell them: an option *accepted* in
    # plaintext (SECURITY: FORCEDTLS bypassed), and a session that ends after a refused option that
    # carried data (the data was not skipped).
    accepted = {k: v for k, v in wrong.items() if v not in ("ConnectionClosed", "not sent (closed)")}
    if accepted:
        verdict.fail("TLS-017", "TLS-019", expected="NBD_REP_ERR_TLS_REQD to every option before STARTTLS",
                     observed=f"SECURITY: answered in plaintext: {accepted}")
    elif wrong:
        verdict.fail("INTEROP-006", "TLS-006", expected="each option refused with NBD_REP_ERR_TLS_REQD and the "
                     "next one parsed (the refused option's data skipped)",
                     observed=f"the session ended: {answers}")
    else:
        verdict.held("TLS-017", "TLS-006", "INTEROP-006", expected="each refused, the next one parsed",
                       observed=str(answers))
    _judge_abort(verdict, abort)


# "If the server receives a request to enter transmission mode via NBD_OPT_EXPORT_NAME when TLS has not
# been initiated, then as this request cannot error, it MUST terminate the session" (TLS-018).  The
# bytes are read raw: the reply to NBD_OPT_EXPORT_NAME has no header a wrong answer could be told by.
@pytest.mark.req("TLS-018")
@pytest.mark.feature("NBD_OPT_STARTTLS")
def test_plaintext_export_name_ends_session(server_peer, kind, tls_server, verdict):
    """A plaintext NBD_OPT_EXPORT_NAME to a FORCEDTLS server ends the session."""
    plain = Plain(tls_server)
    try:
        plain.sock.sendall(plain.conn.send(ev.OptExportName(name="exp")))
        data, closed = drain(plain.sock)
    finally:
        plain.close()
    error_reply = struct.pack(">QIII", Magic.OPT_REPLY, Opt.EXPORT_NAME, Rep.ERR_TLS_REQD, 0)
    what = "an NBD_REP_ERR_TLS_REQD option reply" if data.startswith(error_reply) else data[:32].hex()
    verdict.expect(closed and not data, "TLS-018", expected="the session ends",
                   observed=f"got {what or 'nothing'} (closed={closed})")


# "If the handshake is unsuccessful (for instance the client's certificate does not match) the server
# MUST terminate the session" (TLS-016): a client that trusts the CA but has no certificate of its own
# must never reach transmission on a server that verifies peers.
@pytest.mark.req("TLS-016")
@pytest.mark.feature("NBD_OPT_STARTTLS")
def test_client_without_certificate_refused(request, server_peer, verdict, tmp_path):
    """A server that checks client certificates refuses a client that has none."""
    from fixtures.plugin import tls_peer_server
    tls_server = tls_peer_server(request, server_peer, "x509-verify")
    ca_only = tmp_path / "ca-only"
    ca_only.mkdir()
    shutil.copy(tls_server.tls.ca_cert, ca_only / "ca-cert.pem")
    from nbdref.client import Client
    client = Client(timeout=TIMEOUT)
    client.set_tls_certificates(ca_only)
    uri = re.sub(r"tls-certificates=[^&]*", "", tls_server.uri).rstrip("&?")
    got_in, refusal = False, None
    try:
        client.connect_uri(uri)
        client.pread(512, 0)
        got_in = True
    except (ClientError, ProtocolError, ssl.SSLError, OSError) as e:
        refusal = e
    finally:
        client.close()
    if got_in:
        verdict.fail("TLS-016", expected="the handshake fails and the session ends",
                     observed="SECURITY: a client without a certificate read data")
        return
    # A refusal counts only if it came in the TLS handshake: the server agreed to STARTTLS first.  A
    # connect error or an option refusal says nothing about certificates (and is ours to explain).
    if not acked(client, Opt.STARTTLS):
        raise HarnessError(f"the connection failed before the TLS handshake ({type(refusal).__name__}: "
                           f"{refusal}): nothing shows the certificate was checked")
    verdict.held("TLS-016", expected="refused in the TLS handshake",
                   observed=f"no client certificate: refused ({type(refusal).__name__})")


# "A FORCEDTLS server must answer a second NBD_OPT_STARTTLS (TLS already negotiated) with
# NBD_REP_ERR_INVALID" (TLS-012), and haggling goes on: the next option is answered without
# NBD_REP_ERR_TLS_REQD (TLS-020, checked by the core).
@pytest.mark.req("TLS-012", "TLS-020")
@pytest.mark.feature("NBD_OPT_STARTTLS")
def test_second_starttls_refused(server_peer, kind, tls_server, ref_client, verdict):
    """NBD_OPT_STARTTLS inside TLS is refused with NBD_REP_ERR_INVALID and haggling goes on."""
    from nbdref._strict import Strictness
    c = ref_client(tls_server, opt_mode=True, strictness=Strictness(check_local=False))
    assert c.get_tls_negotiated()
    replies = option_replies(c, ev.OptStartTLS())
    got = ", ".join(_name(r) for r in replies)
    verdict.expect(got == "NBD_REP_ERR_INVALID", "TLS-012", expected="NBD_REP_ERR_INVALID", observed=got)
    after = ", ".join(_name(r) for r in option_replies(c, ev.OptList()))
    verdict.expect(after.endswith("RepAck") or after.startswith("NBD_REP_ERR_POLICY"), "TLS-020",
                   expected="NBD_OPT_LIST answered after the refusal", observed=after)


@pytest.fixture(scope="session")
def stranger_material(tmp_path_factory):
    """TLS credentials of another CA: a client certificate the servers' CA never signed."""
    from fixtures.tls_material import make_tls_material
    return make_tls_material(tmp_path_factory.mktemp("stranger-tls"))


def _kept_out(client, uri: str) -> tuple[bool, BaseException | None]:
    """(read data?, what refused it)."""
    try:
        client.connect_uri(uri)
        client.pread(512, 0)
        return True, None
    except (ClientError, ProtocolError, ssl.SSLError, OSError) as e:
        return False, e
    finally:
        client.close()


# "If the handshake is unsuccessful (for instance the client's certificate does not match) the server
# MUST terminate the session" (TLS-016): a client certificate from another CA, on a server that checks
# client certificates.
@pytest.mark.req("TLS-016")
@pytest.mark.feature("NBD_OPT_STARTTLS")
def test_client_certificate_of_other_ca_refused(request, server_peer, verdict, tmp_path, stranger_material):
    """A server that checks client certificates refuses one signed by another CA."""
    from nbdref.client import Client

    from fixtures.plugin import tls_peer_server
    tls_server = tls_peer_server(request, server_peer, "x509-verify")
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    shutil.copy(tls_server.tls.ca_cert, mixed / "ca-cert.pem")
    shutil.copy(stranger_material.client_cert, mixed / "client-cert.pem")
    shutil.copy(stranger_material.client_key, mixed / "client-key.pem")
    client = Client(timeout=TIMEOUT)
    client.set_tls_certificates(mixed)
    uri = re.sub(r"tls-certificates=[^&]*", "", tls_server.uri).rstrip("&?")
    got_in, refusal = _kept_out(client, uri)
    if not got_in and not acked(client, Opt.STARTTLS):
        raise HarnessError(f"the connection failed before the TLS handshake ({refusal!r})")
    verdict.expect(not got_in, "TLS-016", expected="the handshake fails and the session ends",
                   observed="SECURITY: a client certificate of another CA read data" if got_in else f"refused: {type(refusal).__name__}")


# TLS-PSK with the right identity and the wrong key: the handshake must fail and the session end (TLS-016).
@pytest.mark.req("TLS-016")
@pytest.mark.feature("TLS-PSK")
def test_wrong_psk_refused(request, server_peer, verdict, tmp_path):
    """A TLS-PSK client with the wrong key never reaches transmission."""
    from nbdref.client import Client

    from fixtures.plugin import tls_peer_server
    tls_server = tls_peer_server(request, server_peer, "psk")
    material = tls_server.tls
    wrong = tmp_path / "wrong.psk"
    wrong.write_text(f"{material.psk_identity}:{bytes(b ^ 0x5A for b in material.psk_key).hex()}\n")
    client = Client(timeout=TIMEOUT)
    uri = re.sub(r"tls-psk-file=[^&]*", f"tls-psk-file={wrong}", tls_server.uri)
    got_in, refusal = _kept_out(client, uri)
    if not got_in and not acked(client, Opt.STARTTLS):
        raise HarnessError(f"the connection failed before the TLS handshake ({refusal!r})")
    verdict.expect(not got_in, "TLS-016", expected="the PSK handshake fails and the session ends",
                   observed="SECURITY: a client with the wrong PSK read data" if got_in else f"refused: {type(refusal).__name__}")


TLS_VERSIONS = {"1.2": ("TLSv1_2", "TLSv1_2"), "1.3": ("TLSv1_3", "TLSv1_3"), "1.0-1.1": ("TLSv1", "TLSv1_1")}


def _tls_handshake(tls_server, versions: tuple[str, str]) -> tuple[str | None, str]:
    """STARTTLS on a plaintext connection, then a handshake limited to ``versions``: (version, error)."""
    import warnings
    plain = Plain(tls_server)
    try:
        if _name(plain.option(ev.OptStartTLS())[-1]) != "RepAck":
            raise HarnessError("NBD_OPT_STARTTLS not acknowledged by a FORCEDTLS server")
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.load_verify_locations(str(tls_server.tls.ca_cert))
        # present the client certificate too: some servers (nbd-server) always ask for one
        ctx.load_cert_chain(str(tls_server.tls.client_cert), str(tls_server.tls.client_key))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            ctx.minimum_version = getattr(ssl.TLSVersion, versions[0])
            ctx.maximum_version = getattr(ssl.TLSVersion, versions[1])
        if versions[0] == "TLSv1":
            ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
        try:
            s = ctx.wrap_socket(plain.sock, do_handshake_on_connect=False)
            s.settimeout(TIMEOUT)
            s.do_handshake()
        except (ssl.SSLError, OSError) as e:
            return None, f"{type(e).__name__}: {getattr(e, 'reason', None) or e}"
        version = s.version()
        with contextlib.suppress(OSError, ssl.SSLError):
            s.close()
        return version, ""
    finally:
        plain.close()


# "Implementations supporting TLS must support TLS 1.2" (TLS-043), "should support later TLS versions"
# (TLS-044), and pre-1.2 versions "should not be enabled by default" (TLS-046).
@pytest.mark.feature("NBD_OPT_STARTTLS")
@pytest.mark.parametrize("version", [
    pytest.param("1.2", marks=pytest.mark.req("TLS-043")), pytest.param("1.3", marks=pytest.mark.req("TLS-044")),
    pytest.param("1.0-1.1", marks=pytest.mark.req("TLS-046"))])
def test_tls_versions(request, server_peer, verdict, version):
    """TLS 1.2 works, TLS 1.3 should, TLS 1.0/1.1 should not by default."""
    from fixtures.plugin import tls_peer_server
    tls_server = tls_peer_server(request, server_peer, "x509")
    got, error = _tls_handshake(tls_server, TLS_VERSIONS[version])
    if version == "1.2":
        verdict.expect(got == "TLSv1.2", "TLS-043", expected="a TLS 1.2 handshake", observed=got or error)
    elif version == "1.3":
        verdict.expect(got == "TLSv1.3", "TLS-044", expected="a TLS 1.3 handshake", observed=got or error)
    else:
        if error and "NO_PROTOCOLS_AVAILABLE" in error.upper():
            verdict.not_applicable(f"this harness's OpenSSL cannot offer TLS 1.0/1.1 ({error})")
        verdict.expect(got is None, "TLS-046", expected="no TLS 1.0/1.1 handshake by default",
                       observed=got or error)
        if got is None:
            verdict.info(f"TLS 1.0/1.1 refused: {error}")


# ---- SELECTIVETLS: a plain export and a TLS-only one on one server.  Only the reference server can be
# started that way here (qemu has no such mode; nbdkit's --tls=on has no TLS-only export; nbd-server's
# per-export force_tls is not wired into the launchers): other rows are not-applicable, for that reason.

@pytest.fixture
def selective_server(server_peer, verdict, peer_tls_material, tmp_path):
    """An in-process reference server of the row's persona in SELECTIVETLS mode: "plain" and a TLS-only
    "secret" export, X.509 from the run's material."""
    from types import SimpleNamespace

    from nbdref.server import Export, Server, TLSConfig

    from fixtures.expectations import option_haggling
    if server_peer.implementation != "nbdref":
        verdict.not_applicable(f"the harness starts only the reference server in SELECTIVETLS mode, not "
                               f"{server_peer.implementation}")
    if option_haggling(server_peer) is not None or "x509" not in server_peer.tls:
        verdict.not_applicable(f"{server_peer.id}: no TLS in this row ({option_haggling(server_peer) or 'no x509'})")
    exports = [Export.memory("plain", 1 << 20), Export.memory("secret", 1 << 20, tls_only=True)]
    sock = tmp_path / "selective.sock"
    srv = Server(exports, persona=server_peer.persona, unix=str(sock),
                 tls=TLSConfig(mode="on", certificates=str(peer_tls_material.x509_dir)))
    srv.start()
    try:
        yield SimpleNamespace(transport="unix", socket=sock, host=None, port=None, tls=peer_tls_material)
    finally:
        srv.stop(timeout=5)


def _starttls(plain: Plain, material) -> str:
    """STARTTLS on a Plain connection and the TLS handshake; the reply's name."""
    answer = _name(plain.option(ev.OptStartTLS())[-1])
    if answer != "RepAck":
        return answer
    assert isinstance(plain.next(), ev.StartTLS)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(str(material.ca_cert))
    ctx.load_cert_chain(str(material.client_cert), str(material.client_key))
    plain.sock = ctx.wrap_socket(plain.sock)
    plain.sock.settimeout(TIMEOUT)
    plain.conn.tls_established()
    return answer


# SELECTIVETLS before TLS: NBD_REP_ERR_TLS_REQD only "in response to NBD_OPT_INFO or NBD_OPT_GO ... about
# TLS-only exports" (TLS-025 must, TLS-028 only there); STARTTLS acked and TLS begins (TLS-022); options
# negotiated before are forgotten (TLS-054: NBD_OPT_STRUCTURED_REPLY before STARTTLS, then a READ gets a
# simple reply); after TLS no NBD_REP_ERR_TLS_REQD (TLS-027) and a second STARTTLS is NBD_REP_ERR_INVALID
# (TLS-023).
@pytest.mark.req("TLS-022", "TLS-023", "TLS-025", "TLS-027", "TLS-028", "TLS-054")
@pytest.mark.feature("NBD_OPT_STARTTLS")
def test_selective_tls(server_peer, selective_server, verdict):
    """A SELECTIVETLS server guards only its TLS-only export, and forgets pre-TLS state."""
    plain = Plain(selective_server)
    verdict.watch(plain.conn)
    try:
        before = {
            "LIST": _name(plain.option(ev.OptList())[-1]),
            "INFO plain": _name(plain.option(ev.OptInfo(name="plain"))[-1]),
            "unknown": _name(plain.raw_option(UNKNOWN_OPTION, b"?")[-1]),
            "STRUCTURED_REPLY": _name(plain.option(ev.OptStructuredReply())[-1]),
        }
        verdict.expect("NBD_REP_ERR_TLS_REQD" not in before.values(), "TLS-028",
                       expected="no NBD_REP_ERR_TLS_REQD but for the TLS-only export", observed=str(before))
        has_info = before["INFO plain"] != "NBD_REP_ERR_UNSUP"
        if has_info:
            guarded = {w: _name(plain.option(o)[-1]) for w, o in
                       (("INFO secret", ev.OptInfo(name="secret")), ("GO secret", ev.OptGo(name="secret")))}
            verdict.expect(set(guarded.values()) == {"NBD_REP_ERR_TLS_REQD"}, "TLS-025",
                           expected="NBD_REP_ERR_TLS_REQD for the TLS-only export", observed=str(guarded))
        else:       # a persona before NBD_OPT_INFO / GO (qemu < 2.10): TLS-026 covers its EXPORT_NAME path
            verdict.timeline("NBD_OPT_INFO", False, how=before["INFO plain"])
        answer = _starttls(plain, selective_server.tls)
        verdict.expect(answer == "RepAck", "TLS-022", expected="NBD_REP_ACK, then TLS", observed=answer)
        if answer != "RepAck":
            return
        again = _name(plain.option(ev.OptStartTLS())[-1])
        verdict.expect(again == "NBD_REP_ERR_INVALID", "TLS-023", expected="NBD_REP_ERR_INVALID", observed=again)
        inside = _name(plain.option(ev.OptInfo(name="secret") if has_info else ev.OptList())[-1])
        verdict.expect(inside == "RepAck", "TLS-027", expected="the TLS-only export's NBD_OPT_INFO (or NBD_OPT_LIST) "
                       "answered inside TLS", observed=inside)
        if has_info:
            go = _name(plain.option(ev.OptGo(name="plain"))[-1])
            assert go == "RepAck", f"NBD_OPT_GO inside TLS: {go}"
        else:
            plain.sock.sendall(plain.conn.send(ev.OptExportName(name="plain")))
            entered = plain.next()
            assert isinstance(entered, ev.ExportNameReply), f"NBD_OPT_EXPORT_NAME inside TLS: {entered!r}"
        plain.sock.sendall(plain.conn.send(ev.Request(cookie=5, command=0, offset=0, length=512)))
        reply = plain.next()
        verdict.expect(isinstance(reply, ev.SimpleReply), "TLS-054", expected="a simple reply: structured "
                       "replies negotiated before STARTTLS are forgotten", observed=type(reply).__name__)
        plain.sock.sendall(plain.conn.send(ev.Request(cookie=6, command=2)))
    finally:
        plain.close()


# SELECTIVETLS: NBD_OPT_EXPORT_NAME for a TLS-only export before TLS "MUST terminate the session" (TLS-026).
@pytest.mark.req("TLS-026")
@pytest.mark.feature("NBD_OPT_STARTTLS")
def test_selective_tls_export_name_ends_session(server_peer, selective_server, verdict):
    """NBD_OPT_EXPORT_NAME of a TLS-only export before TLS ends the session with nothing sent."""
    plain = Plain(selective_server)
    try:
        plain.sock.sendall(plain.conn.send(ev.OptExportName(name="secret")))
        data, closed = drain(plain.sock)
    finally:
        plain.close()
    verdict.expect(closed and not data, "TLS-026", expected="the session ends, nothing sent",
                   observed=f"closed={closed}, {len(data)} bytes")
