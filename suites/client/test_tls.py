"""TLS on the client side: every client peer that can do TLS against the FORCEDTLS reference server, over
X.509 (with and without client certificates checked) and TLS-PSK, on a Unix socket and on TCP.

Each client must negotiate TLS and read the export while the server's core records no breach, and must
refuse a server whose certificate its CA did not sign.  A TLS kind the matrix row does not list is
not-applicable; known breaches (libnbd's CVE-2024-7383) are in suites/baseline.yaml.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import pytest
from nbdref._constants import Opt

from fixtures.exports import ExportRequest, expected_bytes
from fixtures.judging import HarnessError
from fixtures.launch import ClientRunner, export_workdir, make_uri
from fixtures.launchers.base import RunningServer
from fixtures.launchers.inprocess import start_reference
from fixtures.matrix import client_tools
from fixtures.peers.libnbd_clients import URI_TLS_CERTIFICATES_SINCE, nbdsh_argv
from fixtures.peers.qemu_clients import parse_read_dump
from fixtures.peers.qemu_nbd import TLS_OVER_UNIX_SINCE
from fixtures.peerspec import PeerSpec
from fixtures.timeline import parse_version, tls_feature
from fixtures.verdicts import Verdict
from suites.client._common import TOOL_TIMEOUT, tool_fixture

SECTION = "TLS support"
MiB = 1 << 20
KINDS = ("x509", "x509-verify", "psk")
OFFSET = 3 * MiB + 512                  # not at 0 and not 4 KiB-aligned: the pattern differs per sector
SIGPIPE_EXIT = 128 + 13                 # a shell's exit status for a process killed by SIGPIPE
qemu_tool = tool_fixture("qemu-io")
nbdinfo_tool = tool_fixture("nbdinfo")


def export_for(kind: str) -> ExportRequest:
    """The export of one TLS kind: read-only known content, so a read proves the data path."""
    tls = "psk" if kind == "psk" else "x509"
    return ExportRequest(name="exp", size=4 * MiB, content="pattern", read_only=True, tls=tls,
                         tls_verify_peer=kind == "x509-verify")


@pytest.fixture
def tls_tool(client_peer: PeerSpec, kind: str, verdict: Any) -> str:
    """The client's TLS tool; not-applicable for a client without one or a kind its row does not list."""
    tools = [t for t in ("qemu-io", "nbdinfo") if t in client_tools(client_peer)]
    if not tools:
        verdict.not_applicable(f"{client_peer.id} has no TLS command-line tool here (qemu-io, nbdinfo)")
    tls = "psk" if kind == "psk" else "x509"
    if tls not in client_peer.tls:
        verdict.not_applicable(f"the matrix row lists tls {list(client_peer.tls)}, not {tls}")
    return tools[0]


@pytest.fixture
def tool(client_peer: PeerSpec, verdict: Any) -> str:
    tools = [t for t in ("qemu-io", "nbdinfo") if t in client_tools(client_peer)]
    if not tools:
        verdict.not_applicable(f"{client_peer.id} has no TLS command-line tool here (qemu-io, nbdinfo)")
    return tools[0]


@dataclass
class Reference:
    """The in-process FORCEDTLS reference server of one TLS kind, on a unix socket and on TCP."""

    kind: str
    unix_view: RunningServer
    tcp_view: RunningServer

    def servers(self) -> tuple[Any, Any]:
        """The two nbdref Servers (their ``records`` are what the clients did)."""
        return self.unix_view.handle, self.tcp_view.handle


@contextlib.contextmanager
def serve_reference(kind: str, m: Any) -> Iterator[Reference]:
    """Start the reference server of ``kind`` on both transports; stop both on the way out."""
    export = export_for(kind)
    with contextlib.ExitStack() as stack:
        views = {transport: stack.enter_context(start_reference(
                     export, workdir=export_workdir(f"ref-tls-{kind}-{transport}"), tls=m, transport=transport))
                 for transport in ("unix", "tcp")}
        yield Reference(kind, views["unix"], views["tcp"])


@pytest.fixture(scope="session")
def _references(peer_tls_material: Any) -> Iterator[dict[str, Reference]]:
    """The FORCEDTLS reference servers of this process, one per TLS kind, started on first use."""
    with contextlib.ExitStack() as stack:
        made: dict[str, Reference] = {}

        class Lazy(dict):  # type: ignore[type-arg]
            def __missing__(self, kind: str) -> Reference:
                made[kind] = stack.enter_context(serve_reference(kind, peer_tls_material))
                self[kind] = made[kind]
                return made[kind]
        yield Lazy()


@pytest.fixture(params=KINDS)
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def reference(_references: dict[str, Reference], kind: str) -> Reference:
    return _references[kind]


@pytest.fixture
def untrusted_reference(_references: dict[str, Reference]) -> Reference:
    """The X.509 reference server; the client is given another CA (TLS-039)."""
    return _references["x509"]


def target(ref: Reference, spec: PeerSpec) -> RunningServer:
    """qemu before 7.0 does TLS only over IP (qemu-io 5.2: "TLS only supported over IP sockets")."""
    if spec.implementation == "qemu-io" and parse_version(spec.version) < TLS_OVER_UNIX_SINCE:
        return ref.tcp_view
    return ref.unix_view


class Session:
    """The reference server's connections made during one test, judged once they ended."""

    def __init__(self, ref: Reference, peer: PeerSpec) -> None:
        self.ref, self.peer = ref, peer
        self.first = {id(s): len(s.records) for s in ref.servers()}

    def records(self) -> list[Any]:
        records = [r for s in self.ref.servers() for r in list(s.records)[self.first[id(s)]:]]
        for record in records:
            if not record.wait(15):
                raise HarnessError(f"{self.peer.id}: connection {record.id} of the reference server did not end "
                                   f"within 15 s ({record.reason or 'still open'})")
        return records

    def reasons(self) -> list[str]:
        return [f"{r.reason} {[str(v) for v in r.violations]}" for r in self.records()]

    @property
    def violations(self) -> list[Any]:
        return [v for r in self.records() for v in r.violations]

    @property
    def checked(self) -> set[str]:
        """Ids of the rules the server's core checked on the client's messages (observed, held or not)."""
        return {rid for r in self.records() for rid in getattr(r, "checked", ())}

    def transcripts(self) -> str:
        return "\n\n".join(f"# connection {r.id} ({r.reason})\n{r.transcript}" for r in self.records())

    def judge(self, verdict: Any, *ids: str) -> None:
        """Every connection negotiated TLS: after the ACK to STARTTLS the TLS handshake came at once and
        succeeded against the FORCEDTLS server (judged under ``ids``; violations by the test's verdict)."""
        records = self.records()
        assert records, f"{self.peer.id}: no connection reached the reference server"
        verdict.expect(all(r.tls for r in records), *ids, expected="every connection upgraded to TLS after "
                       "NBD_OPT_STARTTLS's ACK", observed="; ".join(self.reasons()))


@pytest.fixture
def session(reference: Reference, client_peer: PeerSpec, verdict: Any, evidence: Any) -> Session:
    s = Session(reference, client_peer)
    verdict.watch(s)
    evidence.add("reference server transcripts", s.transcripts)
    return s


def ok(result: Any, session: Session) -> Any:
    if not result.ok:
        pytest.fail(f"{result.argv} failed ({result.rc}): {result.stdout[-1000:]} {result.stderr[-1000:]}; "
                    f"server: {session.reasons()}")
    return result


# A TLS client: "On NBD_REP_ACK to STARTTLS the client must immediately upgrade the connection to TLS"
# (TLS-035), "must not send NBD_OPT_STARTTLS once TLS is active" (TLS-033), and sends no data with it
# (TLS-052); after the ACK "all further data MUST be sent and received over TLS" (TLS-014: its first bytes
# are a TLS record, not plaintext NBD): the reference server's core checks each, on every connection.
@pytest.mark.req("TLS-030", "TLS-032", "TLS-033", "TLS-035", "TLS-052", "INTEROP-014", "TLS-014")
def test_qemu_io_tls_read(client_runner: ClientRunner, tls_tool: str, qemu_tool: str, reference: Reference, session: Session,
                          verdict: Any, client_peer: PeerSpec) -> None:
    server = target(reference, client_peer)
    argv = client_runner.tool_argv("qemu-io", server, "-c", f"read -v {OFFSET} 1024")
    read = ok(client_runner.run(argv, TOOL_TIMEOUT), session)
    assert parse_read_dump(read.stdout) == expected_bytes(server.export, OFFSET, 1024)
    session.judge(verdict, "TLS-030", "TLS-035", "INTEROP-014")
    verdict.timeline(tls_feature(reference.kind), True)
    verdict.info(f"TLS {reference.kind}: qemu-io read ok ({server.transport})")


@pytest.mark.req("TLS-030", "TLS-035", "TLS-052", "TLS-014")
def test_qemu_img_tls_info(client_runner: ClientRunner, tls_tool: str, qemu_tool: str, reference: Reference, session: Session,
                           client_peer: PeerSpec, verdict: Any) -> None:
    server = target(reference, client_peer)
    info = json.loads(ok(client_runner.run(client_runner.tool_argv("qemu-img", server, "info", "--output=json"),
                                    TOOL_TIMEOUT), session).stdout)
    assert info["virtual-size"] == server.export.size
    session.judge(verdict, "TLS-030", "TLS-035")


NBDSH_READ = """
import contextlib
import json
print(json.dumps({{"tls": h.get_tls_negotiated(), "size": h.get_size(), "data": h.pread(1024, {offset}).hex()}}))
"""


def nbdsh_tls_argv(server: RunningServer, libnbd: tuple[int, ...], script: str) -> list[str]:
    """nbdsh connected over TLS, then ``script`` (the TLS quirks live in fixtures.peers.libnbd_clients)."""
    return nbdsh_argv(server, ("-c", script), libnbd)


@pytest.mark.req("TLS-030", "TLS-032", "TLS-033", "TLS-035", "TLS-052", "URI-003", "TLS-014")
def test_nbdsh_tls_read(client_runner: ClientRunner, tls_tool: str, nbdinfo_tool: str, reference: Reference, session: Session,
                        verdict: Any, client_peer: PeerSpec) -> None:
    server = target(reference, client_peer)
    argv = nbdsh_tls_argv(server, client_runner.libnbd_version, NBDSH_READ.format(offset=OFFSET))
    out = json.loads(ok(client_runner.run(argv, TOOL_TIMEOUT), session).stdout.strip().splitlines()[-1])
    assert out["tls"] is True and out["size"] == server.export.size
    assert bytes.fromhex(out["data"]) == expected_bytes(server.export, OFFSET, 1024)
    session.judge(verdict, "TLS-030", "TLS-035", "URI-003")
    verdict.timeline(tls_feature(reference.kind), True)
    verdict.info(f"TLS {reference.kind}: nbdsh read ok")


@pytest.mark.req("TLS-030", "TLS-035", "URI-003", "TLS-014")
def test_nbdinfo_tls(client_runner: ClientRunner, tls_tool: str, nbdinfo_tool: str, reference: Reference, session: Session, verdict: Any,
                     client_peer: PeerSpec) -> None:
    server = target(reference, client_peer)
    if server.export.tls_verify_peer and client_runner.libnbd_version < URI_TLS_CERTIFICATES_SINCE:
        verdict.not_applicable(f"libnbd {client_runner.versions.get('libnbd-bin')} has no tls-certificates "
                               "URI parameter, and nbdinfo takes only a URI: it cannot present a client certificate")
    argv = client_runner.tool_argv("nbdinfo", server, "--json")
    result = client_runner.run(argv, TOOL_TIMEOUT)
    records = session.records()
    if result.rc == SIGPIPE_EXIT and records and all("NBD_CMD_DISC" in r.reason for r in records):
        # Seen with nbdinfo 1.6 under -n 2 load (not when run alone): killed by SIGPIPE after it sent
        # NBD_CMD_DISC and before printing anything.  The server had served it and closed the TLS session
        # (close_notify, then close) as proto.md asks on NBD_CMD_DISC; the client then writes its own
        # TLS close to a closed socket without ignoring SIGPIPE.  A client robustness race, no protocol
        # breach: reported, then the same command is rerun with SIGPIPE ignored (the NBD traffic is
        # unchanged) so the TLS exchange is still judged.
        # Reported as non-strict: no protocol rule names it, but users see nbdinfo fail (exit 141).
        verdict.add(Verdict.NON_STRICT, expected="nbdinfo exits 0 after a clean NBD_CMD_DISC",
                    observed="killed by SIGPIPE after NBD_CMD_DISC (the TLS exchange was judged on a rerun with "
                             "SIGPIPE ignored)")
        result = client_runner.run(["sh", "-c", "trap '' PIPE; exec \"$@\"", "sh", *argv], TOOL_TIMEOUT)
    info = json.loads(ok(result, session).stdout)
    assert info["TLS"] is True
    assert info["exports"][0]["export-size"] == server.export.size
    session.judge(verdict, "TLS-030", "TLS-035", "URI-003")


# "If the TLS handshake fails (for instance the client's certificate does not match) the server MUST
# terminate the session" binds the server; for the client: "If the TLS handshake fails (e.g. server
# certificate does not validate) the client must terminate the session" (TLS-039).  The client is given
# a CA directory that did not sign the server's certificate; it must not reach transmission.
@pytest.mark.req("TLS-039", "URI-019")
@pytest.mark.parametrize("transport", ["unix", "tcp"])
def test_client_rejects_untrusted_server(client_runner: ClientRunner, tool: str, untrusted_reference: Reference,
                                         verdict: Any, client_peer: PeerSpec,
                                         transport: str) -> None:
    """A client given another CA refuses the server: it never reaches transmission."""
    if "x509" not in client_peer.tls:
        verdict.not_applicable(f"the matrix row lists tls {list(client_peer.tls)}, not x509")
    reference = untrusted_reference
    session = Session(reference, client_peer)
    server = reference.unix_view if transport == "unix" else reference.tcp_view
    if transport == "unix" and target(reference, client_peer).transport == "tcp":
        verdict.not_applicable("qemu before 7.0 does TLS only over IP sockets")
    other = replace(server.tls, x509_dir=server.tls.other_ca_cert.parent)
    untrusted = replace(server, tls=other, uri=make_uri(export=server.export_name, transport=server.transport,
                                                        socket_path=server.socket, port=server.port, tls="x509",
                                                        material=other))
    libnbd = client_runner.libnbd_version
    if client_peer.implementation == "qemu-io":
        argv = client_runner.tool_argv("qemu-io", untrusted, "-c", "read 0 512")
    else:
        argv = nbdsh_tls_argv(untrusted, libnbd, "print(h.pread(512, 0).hex())")
    result = client_runner.run(argv, TOOL_TIMEOUT)
    records = session.records()
    served = sum(r.requests for r in records)
    # uri.md: "By default clients SHOULD verify the server's identity if TLS is negotiated and if a suitable
    # Certificate Authority is available" (URI-019): libnbd >= 1.8 takes the CA from the URI's
    # tls-certificates= and no tls-verify-peer= is given, so this is its default.
    ids = ("TLS-039", "URI-019") if (client_peer.implementation != "qemu-io"
                                     and libnbd >= URI_TLS_CERTIFICATES_SINCE) else ("TLS-039",)
    # SECURITY: a client that reads from a server whose certificate its CA did not sign (libnbd before
    # 1.18.5 over Unix sockets: CVE-2024-7383) is a failure, listed as such in suites/baseline.yaml.
    if result.ok or served:
        verdict.fail(*ids, expected="the client ends the session when the server's certificate does not "
                     "validate", observed=f"SECURITY: read from a server whose certificate does not chain to the "
                     f"given CA, over {transport} ({served} request(s) served)")
        return
    # A refusal counts only if the client really got to the handshake: a tool that did not start, hung,
    # or never connected says nothing about certificates.
    if result.timed_out or result.rc in (126, 127) or not records:
        raise HarnessError(f"the client never reached the TLS handshake (exit {result.rc}, timed out "
                           f"{result.timed_out}, {len(records)} connection(s)): {result.stderr[-300:]}")
    verdict.expect(not any(r.requests for r in records), *ids, expected="no request after the failed handshake",
                   observed=f"untrusted server certificate ({transport}): refused, exit {result.rc}")


# --------------------------------------------------------------------------------------------------
# Refusals: a wrong PSK, and a server that will not (or cannot) do TLS.  Each client is configured for
# TLS exactly as in the reads above; the server is one of this module's own (suites/client/_own.py).


def _client_argv(client_runner: ClientRunner, peer: PeerSpec, view: Any) -> list[str]:
    """The TLS client's read of 512 bytes at 0 against ``view`` (a RunningServer or a look-alike)."""
    if peer.implementation == "qemu-io":
        return client_runner.tool_argv("qemu-io", view, "-c", "read 0 512")
    return nbdsh_tls_argv(view, client_runner.libnbd_version, "print(h.pread(512, 0).hex())")


def _tls_view(own: Any, kind: str, material: Any) -> Any:
    """A RunningServer look-alike for ``own`` (an _own.Own) that tells the client tools to do TLS."""
    from types import SimpleNamespace
    transport = "unix" if own.socket is not None else "tcp"
    export = SimpleNamespace(tls=kind, tls_verify_peer=False, size=own.size)
    uri = make_uri(export=own.export_name, transport=transport, socket_path=own.socket, port=own.port, tls=kind,
                   material=material)
    return SimpleNamespace(export=export, transport=transport, socket=own.socket, port=own.port,
                           export_name=own.export_name, tls=material, uri=uri, host=own.host)


def _tls_capable(client_peer: PeerSpec, verdict: Any, kind: str, transport: str) -> None:
    """Not-applicable unless the row lists this TLS kind and the client does TLS on this transport."""
    if kind not in client_peer.tls:
        verdict.not_applicable(f"the matrix row lists tls {list(client_peer.tls)}, not {kind}")
    if (transport == "unix" and client_peer.implementation == "qemu-io"
            and parse_version(client_peer.version) < TLS_OVER_UNIX_SINCE):
        verdict.not_applicable("qemu before 7.0 does TLS only over IP sockets")


def _refused(verdict: Any, result: Any, records: list[Any], what: str, *ids: str) -> None:
    """The client must end without reading: no request served, exit status not 0, no hang."""
    served = sum(r.requests for r in records)
    # a CommandResult (timed_out, stdout, stderr) or a batch StepResult (rc None when killed, out)
    if getattr(result, "timed_out", result.rc is None):
        verdict.fail(*ids, expected=f"{what}: the client ends the session", observed="the client hung (killed)")
        return
    text = getattr(result, "out", None) or f"{getattr(result, 'stdout', '')[-200:]} {getattr(result, 'stderr', '')[-200:]}"
    # SECURITY: a client that reads although it asked for TLS and got none is a downgrade.
    observed = (f"SECURITY: exit {result.rc}, {served} request(s) served in plaintext"
                if served or result.ok else f"refused: exit {result.rc}; {text[-300:]}")
    verdict.expect(not result.ok and not served, *ids, expected=f"{what}: the client ends the session without "
                   "reading", observed=observed)


# "If the TLS handshake fails (e.g. ...) the client must terminate the session" (TLS-039), "client after
# failed TLS" must hard-disconnect (DISC-005): the client holds the right identity with another key.
@pytest.mark.req("TLS-039", "DISC-005")
@pytest.mark.parametrize("transport", ["unix", "tcp"])
def test_client_rejects_wrong_psk(client_runner: ClientRunner, tool: str, _references: dict[str, Reference],
                                  verdict: Any, client_peer: PeerSpec, transport: str, peer_workdir: Any,
                                  evidence: Any) -> None:
    """A PSK that is not the server's: the handshake fails and the client gives up."""
    _tls_capable(client_peer, verdict, "psk", transport)
    reference = _references["psk"]
    session = Session(reference, client_peer)
    evidence.add("reference server transcripts", session.transcripts)
    server = reference.unix_view if transport == "unix" else reference.tcp_view
    psk_dir = peer_workdir / "wrong-psk"
    psk_dir.mkdir(exist_ok=True)
    wrong = bytes(b ^ 0x5A for b in server.tls.psk_key)
    (psk_dir / "keys.psk").write_text(f"{server.tls.psk_identity}:{wrong.hex()}\n")
    other = replace(server.tls, psk_dir=psk_dir, psk_file=psk_dir / "keys.psk", psk_key=wrong)
    view = replace(server, tls=other, uri=make_uri(export=server.export_name, transport=server.transport,
                                                   socket_path=server.socket, port=server.port, tls="psk",
                                                   material=other))
    result = client_runner.run(_client_argv(client_runner, client_peer, view), TOOL_TIMEOUT)
    records = session.records()
    if not records:
        raise HarnessError(f"the client never reached the server (exit {result.rc}): {result.stderr[-300:]}")
    _refused(verdict, result, records, "wrong PSK", "TLS-039")
    verdict.expect(not any(r.tls for r in records), "DISC-005", expected="no TLS session and the client gone",
                   observed="; ".join(session.reasons()))


SERVERS_WITHOUT_TLS = {
    # NOTLS: STARTTLS is answered NBD_REP_ERR_POLICY.
    "notls": {},
    # Oldstyle: no options at all, the greeting carries the export (nothing to ask TLS with).
    "oldstyle": {"oldstyle": True},
    # Newstyle without NBD_FLAG_FIXED_NEWSTYLE: the client must not send STARTTLS (TLS-032).
    "nofixed": {"mask_handshake": 0},
}


# A client that asked for TLS and meets a server that is not willing: "A client that only wants TLS SHOULD
# terminate the session if STARTTLS is answered with an error" (TLS-038; TLS-036 allows continuing only
# for a client content without TLS), "MUST NOT proceed in plaintext" (TLS-048), "must not send STARTTLS
# unless both fixed-newstyle flags were exchanged" (TLS-032, the core checks); with nbds URIs "the
# connection MUST fail" (URI-003/005/008).  Over Unix sockets and TCP alike.
@pytest.mark.req("TLS-048", "TLS-038", "TLS-036", "TLS-032", "URI-003", "URI-005", "URI-008", "DISC-009")
@pytest.mark.parametrize("transport", ["unix", "tcp"])
def test_client_refuses_plaintext(client_runner: ClientRunner, tool: str, peer_tls_material: Any, verdict: Any,
                                  client_peer: PeerSpec, transport: str, peer_workdir: Any, evidence: Any) -> None:
    """TLS asked for; a NOTLS, an oldstyle and a non-fixed-newstyle server: the client reads nothing."""
    from suites.client._own import Step, describe, options_sent, own_server, run_steps
    _tls_capable(client_peer, verdict, "x509", transport)
    with contextlib.ExitStack() as stack:
        owns = {k: stack.enter_context(own_server(peer_workdir, f"{k}-{transport}", transport=transport, **kw))
                for k, kw in SERVERS_WITHOUT_TLS.items()}
        for k, own in owns.items():
            # proto.md "Terminating the session": a party mandated to terminate "MUST initiate a hard
            # disconnect if it is not possible to use a soft disconnect. Such circumstances include ... the
            # client following a failed TLS negotiation".  A client that insists on TLS (an nbds URI: "the
            # connection MUST fail") and meets a server that cannot negotiate it at all (oldstyle, no fixed
            # newstyle) is read as that case: its hang-up is allowed; which ending it chose is shown.
            verdict.watch(own.watch, allow=("DISC-007", "DISC-024") if k != "notls" else ())
            evidence.add(f"reference server '{k}' transcript", lambda o=own: o.watch.transcript)
        steps = [Step(k, _client_argv(client_runner, client_peer, _tls_view(own, "x509", peer_tls_material)))
                 for k, own in owns.items()]
        results = run_steps(client_runner, steps, timeout=TOOL_TIMEOUT)
        recorded = {k: own.records() for k, own in owns.items()}
    for server_kind, records in recorded.items():
        if not records:
            raise HarnessError(f"the client never reached the {server_kind} server: {results[server_kind].out[-300:]}")
        ids = ["TLS-048"]
        if client_peer.implementation != "qemu-io":
            ids += ["URI-003" if transport == "tcp" else "URI-005", "URI-008"]     # libnbd: an nbds[+unix] URI
        _refused(verdict, results[server_kind], records, f"{server_kind} server over {transport}", *ids)
        if server_kind == "notls":
            starttls = [r for r in records if Opt.STARTTLS in options_sent(r)]
            verdict.expect(bool(starttls), "TLS-036", expected="the client asks NBD_OPT_STARTTLS",
                           observed=describe(records))
            # After the error the client ends; a client that stops negotiating does so with NBD_OPT_ABORT.
            for r in starttls:
                after = options_sent(r)[options_sent(r).index(Opt.STARTTLS) + 1:]
                verdict.expect(after in ([], [Opt.ABORT]), "TLS-038", "TLS-036",
                               expected="after the STARTTLS error: NBD_OPT_ABORT or nothing, no other option",
                               observed=describe([r]))
                verdict.expect(after == [Opt.ABORT], "DISC-009", expected="NBD_OPT_ABORT before closing",
                               observed=describe([r]))
        if server_kind == "nofixed":
            sent = [r for r in records if Opt.STARTTLS in options_sent(r)]
            verdict.expect(not sent, "TLS-032", expected="no NBD_OPT_STARTTLS without NBD_FLAG_FIXED_NEWSTYLE",
                           observed=describe(records))
        verdict.info(f"{server_kind} over {transport}: {describe(records)}")


TLS_VERSIONS = {"tls12": ("TLSv1_2", "TLSv1_2"), "default": None, "tls11": ("TLSv1_1", "TLSv1_1")}
STATE_OPTIONS = (Opt.STRUCTURED_REPLY, Opt.EXTENDED_HEADERS, Opt.SET_META_CONTEXT)


def _judge_tls_haggling(verdict: Any, record: Any) -> None:
    """What a TLS client sends around NBD_OPT_STARTTLS (one connection that reached transmission)."""
    from suites.client._own import describe, options_sent
    opts = options_sent(record)
    seen = describe([record])
    verdict.expect(bool(opts) and opts[0] == Opt.STARTTLS, "TLS-037", expected="NBD_OPT_STARTTLS first",
                   observed=seen)
    before = [o for o in opts[:opts.index(Opt.STARTTLS)] if o in STATE_OPTIONS] if Opt.STARTTLS in opts else []
    verdict.expect(not before, "TLS-055", expected="no state-changing option before STARTTLS", observed=seen)
    after = opts[opts.index(Opt.STARTTLS) + 1:] if Opt.STARTTLS in opts else opts
    lost = [o for o in before if o not in after]
    verdict.expect(not lost, "SR-021", "EXT-041", expected="options agreed before STARTTLS are negotiated again "
                   "after it", observed=seen)
    verdict.expect(Opt.GO in after and Opt.EXPORT_NAME not in after, "TLS-042",
                   expected="haggling ends with NBD_OPT_GO (the server supports it)", observed=seen)


# "NBD implementations supporting TLS MUST support TLS version 1.2" (TLS-043), "SHOULD support any later
# versions" (TLS-044: the default server offers 1.3 and the client is expected to take it), "MAY support
# older versions but SHOULD NOT do so by default" (TLS-046: a server offering only TLS 1.1 is refused).
# The TLS sessions that reached transmission are also judged on their option order: STARTTLS first
# (TLS-037), nothing stateful before it (TLS-055), renegotiated after it (SR-021, EXT-041), GO (TLS-042).
@pytest.mark.req("TLS-043", "TLS-044", "TLS-046", "TLS-037", "TLS-055", "TLS-042", "SR-021", "EXT-041")
def test_tls_protocol_versions(client_runner: ClientRunner, tool: str, peer_tls_material: Any, verdict: Any,
                               client_peer: PeerSpec, peer_workdir: Any, evidence: Any) -> None:
    """TLS 1.2 only: works; the default: TLS 1.3; TLS 1.1 only: refused by default."""
    from nbdref.server import TLSConfig

    from suites.client._own import Step, describe, own_server, run_steps
    _tls_capable(client_peer, verdict, "x509", "tcp")
    with contextlib.ExitStack() as stack:
        owns = {k: stack.enter_context(own_server(
                    peer_workdir, f"tlsv-{k}", transport="tcp",
                    tls=TLSConfig(mode="require", certificates=peer_tls_material.x509_dir, versions=v)))
                for k, v in TLS_VERSIONS.items()}
        for k, own in owns.items():
            verdict.watch(own.watch, allow=("DISC-007", "DISC-024") if k == "tls11" else ())
            evidence.add(f"reference server '{k}' transcript", lambda o=own: o.watch.transcript)
        steps = [Step(k, _client_argv(client_runner, client_peer, _tls_view(own, "x509", peer_tls_material)))
                 for k, own in owns.items()]
        results = run_steps(client_runner, steps, timeout=TOOL_TIMEOUT)
        recorded = {k: own.records() for k, own in owns.items()}
    for k in ("tls12", "default"):
        data = [r for r in recorded[k] if r.requests]
        versions = [r.tls_version for r in recorded[k]]
        if k == "tls12":
            verdict.expect(results[k].ok and bool(data) and "TLSv1.2" in versions, "TLS-043",
                           expected="a TLS 1.2 session and the read", observed=f"exit {results[k].rc}, versions "
                           f"{versions}; {describe(recorded[k])}; {results[k].out[-200:]!r}")
        else:
            verdict.expect("TLSv1.3" in versions, "TLS-044", expected="TLS 1.3 against a server offering it",
                           observed=f"versions {versions}")
        for r in data:
            _judge_tls_haggling(verdict, r)
    res, records = results["tls11"], recorded["tls11"]
    served = sum(r.requests for r in records)
    verdict.expect(not res.ok and not served and not any(r.tls_version for r in records), "TLS-046",
                   expected="a server offering only TLS 1.1 is refused (not enabled by default)",
                   observed=f"exit {res.rc}, TLS {[r.tls_version for r in records]}, {served} request(s)")


def _tls_list_argv(client_runner: ClientRunner, peer: PeerSpec, view: Any) -> list[str]:
    """List the exports over TLS and end with NBD_OPT_ABORT: qemu-nbd --list (qemu's nbd/client.c) or
    nbdsh in option mode (libnbd; X.509 through the API, which every libnbd of the matrix has)."""
    if peer.implementation == "qemu-io":
        return ["qemu-nbd", "--list", "-b", "127.0.0.1", "-p", str(view.port), "--object",
                f"tls-creds-x509,id=tls0,endpoint=client,dir={view.tls.x509_dir}", "--tls-creds", "tls0"]
    uri = f"nbd://127.0.0.1:{view.port}/{view.export_name}"
    setup = (f"h.set_opt_mode(True); h.set_tls(nbd.TLS_REQUIRE); h.set_tls_certificates({str(view.tls.x509_dir)!r}); "
             f"h.connect_uri({uri!r})")
    return ["nbdsh", "-c", setup, "-c", "h.opt_list(lambda n, d: print('export', n)); h.opt_abort()"]


# "The client can send (and the server can reply to) an NBD_OPT_ABORT. This MUST be followed by the client
# shutting down TLS (if it is running), and the client dropping the connection" (DISC-001): after the ACK
# the server waits a second and records a TLS close_notify, a bare EOF, or nothing.
@pytest.mark.req("DISC-001", "OPT-012", "DISC-009")
def test_abort_shuts_tls_down(client_runner: ClientRunner, tool: str, peer_tls_material: Any, verdict: Any,
                              client_peer: PeerSpec, peer_workdir: Any, evidence: Any) -> None:
    """A TLS listing ends with NBD_OPT_ABORT, then the client's close_notify, then its close."""
    from nbdref.server import TLSConfig

    from suites.client._own import describe, options_sent, own_server
    _tls_capable(client_peer, verdict, "x509", "tcp")
    with own_server(peer_workdir, "tls-abort", transport="tcp",
                    tls=TLSConfig(mode="require", certificates=peer_tls_material.x509_dir)) as own:
        verdict.watch(own.watch)
        evidence.add("reference server transcript", lambda: own.watch.transcript)
        view = _tls_view(own, "x509", peer_tls_material)
        result = client_runner.run(_tls_list_argv(client_runner, client_peer, view), TOOL_TIMEOUT)
        records = own.records()
    aborted = [r for r in records if r.tls and Opt.ABORT in options_sent(r)]
    if not aborted:
        raise HarnessError(f"no TLS connection ended with NBD_OPT_ABORT (exit {result.rc}): {describe(records)}; "
                           f"{result.stdout[-200:]} {result.stderr[-200:]}")
    verdict.expect(result.ok, "DISC-009", expected="the listing succeeds and ends with NBD_OPT_ABORT",
                   observed=f"exit {result.rc}: {result.stdout[-200:]} {result.stderr[-200:]}")
    for r in aborted:
        verdict.expect(r.after_abort == "close_notify", "DISC-001", expected="after NBD_OPT_ABORT's ACK: TLS "
                       "close_notify, then the connection dropped", observed=f"the client: {r.after_abort or '?'}")


# "A party initiating a hard disconnect while TLS is running should shut TLS down first" (DISC-002, option
# haggling) and "A party dropping the connection in transmission phase should shut TLS down first"
# (DISC-016).  A client hard-disconnects legitimately when the server breaks a MUST (DISC-003 / DISC-017):
# a FORCEDTLS server whose option replies inside TLS carry a wrong magic (the STARTTLS ACK is spared), and
# one whose first READ reply does.  The reference server's transport tells a TLS close_notify before the
# EOF from a bare EOF; its core judges each hard disconnect (a breach is non-strict: SHOULD).  A client
# that answers the bad reply with NBD_OPT_ABORT ends softly instead: not a hard disconnect, shown as info.
# After NBD_CMD_DISC the disconnect is soft and "the server MUST close down the TLS session" (DISC-015):
# the client's own close then is not judged here (the hard-disconnect text does not cover it).
TLS_FAULTS = {"haggling": ("wrong-option-reply-magic", "DISC-002"), "transmission": ("wrong-reply-magic", "DISC-016")}


@pytest.mark.req("DISC-002", "DISC-016", "TLS-014")
def test_hard_disconnect_shuts_tls_down(client_runner: ClientRunner, tool: str, peer_tls_material: Any,
                                        verdict: Any, client_peer: PeerSpec, peer_workdir: Any,
                                        evidence: Any) -> None:
    """A server breach inside TLS, in haggling and in transmission: the client's hang-up has close_notify."""
    from nbdref.server import TLSConfig

    from suites.client._own import Step, describe, options_sent, own_server, run_steps
    _tls_capable(client_peer, verdict, "x509", "tcp")
    with contextlib.ExitStack() as stack:
        owns = {k: stack.enter_context(own_server(
                    peer_workdir, f"tls-hard-{k}", transport="tcp", fault=fault,
                    tls=TLSConfig(mode="require", certificates=peer_tls_material.x509_dir)))
                for k, (fault, _rule) in TLS_FAULTS.items()}
        for k, own in owns.items():
            verdict.watch(own.watch)
            evidence.add(f"reference server '{k}' transcript", lambda o=own: o.watch.transcript)
        steps = [Step(k, _client_argv(client_runner, client_peer, _tls_view(own, "x509", peer_tls_material)))
                 for k, own in owns.items()]
        results = run_steps(client_runner, steps, timeout=TOOL_TIMEOUT)
        recorded = {k: own.records() for k, own in owns.items()}
    for k, (fault, rule) in TLS_FAULTS.items():
        records, res = recorded[k], results[k]
        tls = [r for r in records if r.tls]
        if not tls:
            raise HarnessError(f"{k}: no connection reached TLS (exit {res.rc}): {describe(records)}; {res.out[-300:]}")
        judged = [r for r in tls if rule in r.checked]
        if judged:
            verdict.info(f"{k} ({fault}), exit {res.rc}: " + "; ".join(_tls_ending(r, rule) for r in judged))
        elif any(Opt.ABORT in options_sent(r) for r in tls):
            verdict.info(f"{k} ({fault}): the client ended with NBD_OPT_ABORT, a soft disconnect (after its ACK: "
                         f"{[r.after_abort for r in tls]}); no hard disconnect for {rule} to judge")
        else:
            verdict.info(f"{k} ({fault}): no hang-up of the client under TLS to judge: {describe(tls)}")


def _tls_ending(record: Any, rule: str) -> str:
    """How one connection's client left: its TLS close_notify before the EOF, or a bare EOF."""
    bare = any(v.req_id == rule for v in record.violations)
    return f"#{record.id}: {'a bare EOF, no close_notify' if bare else 'close_notify, then EOF'} ({record.reason})"
