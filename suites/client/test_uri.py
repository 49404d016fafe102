"""NBD URIs (uri.md) as clients parse them, observed by where they connect and what they send.

Each URI form gets a reference server of its own (suites/client/_own.py) serving exactly the export
name the form should produce, so the server's records say whether the client connected there and
which name it sent.  One client run visits every form: nbdinfo --size or qemu-img info for each,
plus nbdcopy / nbdsh or qemu-io once (the same parser behind every tool of a package).  TLS URIs
(nbds, nbds+unix) are judged in test_tls.py.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import pytest
from nbdref import events as ev

from suites.client._own import (
    MiB,
    Step,
    client_events,
    describe,
    free_loopback,
    own_server,
    parse_size,
    run_steps,
    runner_for,
    size_step,
    watch_all,
)

SECTION = "NBD URI"
IANA_PORT = 10809
SIZE = MiB


@dataclass
class Form:
    """One URI form: the server it should reach (None: it must reach none) and what it proves."""

    name: str
    transport: str            # of its server
    export: str | None        # export name the server serves = the name the client must send
    make: Any                 # own -> URI
    ids: tuple[str, ...]
    host: str = "127.0.0.1"
    port: int = 0


def _names_sent(record: Any) -> list[str]:
    return [e.name for e in client_events(record)
            if isinstance(e, ev.OptGo | ev.OptInfo | ev.OptExportName)]


def _tool_step(kind: str, name: str, uri: str, tool: str) -> Step:
    """A second tool of the same package on one URI: nbdcopy (to /dev/null) or qemu-io."""
    if kind == "libnbd" and tool == "nbdcopy":
        return Step(name, ["nbdcopy", uri, "null:"])
    if kind == "libnbd":
        return Step(name, ["nbdsh", "-u", uri, "-c", "print(h.get_size())", "-c", "h.shutdown()"])
    if kind == "qemu":
        return Step(name, ["qemu-io", "-f", "raw", "-r", "-c", "read 0 512", uri])
    return size_step(kind, name, uri)


FORMS = [
    # uri.md's table: "nbd://example.com/disk" -> "disk"; "//disk" -> "/disk"; "hello%20world" -> "hello
    # world"; "nbd://example.com/" and "nbd://example.com" -> "" (URI-015); the authority names the TCP
    # endpoint (URI-009); percent-encoding per RFC 3986 (URI-001).
    Form("tcp", "tcp", "disk", lambda o: f"nbd://127.0.0.1:{o.port}/disk", ("URI-009", "URI-015", "URI-002")),
    Form("double-slash", "tcp", "/disk", lambda o: f"nbd://127.0.0.1:{o.port}//disk", ("URI-015",)),
    Form("space", "tcp", "hello world", lambda o: f"nbd://127.0.0.1:{o.port}/hello%20world",
         ("URI-015", "URI-001")),
    Form("utf8", "tcp", "é", lambda o: f"nbd://127.0.0.1:{o.port}/%C3%A9", ("URI-015", "URI-001")),
    Form("encoded-slash", "tcp", "x/y", lambda o: f"nbd://127.0.0.1:{o.port}/x%2Fy", ("URI-015", "URI-001")),
    Form("trailing-slash", "tcp", "", lambda o: f"nbd://127.0.0.1:{o.port}/", ("URI-015",)),
    Form("no-path", "tcp", "", lambda o: f"nbd://127.0.0.1:{o.port}", ("URI-015",)),
    # "If the port field is not present then it MUST default to ... 10809" (URI-013; HS-001: a client
    # wanting newstyle connects to the IANA port): a server on 10809 of a loopback address of its own.
    Form("default-port", "tcp", "disk", lambda o: f"nbd://{o.host}/disk", ("URI-013", "HS-001"),
         host="iana", port=IANA_PORT),
    # "Literal IPv6 addresses MUST be formatted in the way specified by RFC 2732" (URI-012).
    Form("ipv6", "tcp", "disk", lambda o: f"nbd://[::1]:{o.port}/disk", ("URI-012",), host="::1"),
    # "nbd+unix: ... MUST include a parameter called socket" (URI-004, URI-016).
    Form("unix", "unix", "disk", lambda o: f"nbd+unix:///disk?socket={o.socket}", ("URI-004", "URI-016",
                                                                                    "URI-002")),
    Form("unix-space", "unix", "hello world", lambda o: f"nbd+unix:///hello%20world?socket={o.socket}",
         ("URI-015", "URI-001")),
]


@contextlib.contextmanager
def _servers(workdir: Any, forms: list[Form]) -> Any:
    with contextlib.ExitStack() as stack:
        owns = {}
        for f in forms:
            host = free_loopback(IANA_PORT) if f.host == "iana" else f.host
            owns[f.name] = stack.enter_context(own_server(workdir, f"uri-{f.name}", transport=f.transport,
                                                          export=f.export or "", size=SIZE, host=host, port=f.port))
        yield owns


@pytest.mark.req("URI-001", "URI-002", "URI-004", "URI-009", "URI-012", "URI-013", "URI-015", "URI-016", "HS-001")
@pytest.mark.feature("newstyle")
def test_uri_forms(request: Any, client_peer: Any, kind: str, peer_workdir: Any, verdict: Any,
                   evidence: Any) -> None:
    """Every form of uri.md's table reaches its server with the export name the table gives."""
    runner = runner_for(request, kind)
    with _servers(peer_workdir, FORMS) as owns:
        watch_all(verdict, evidence, list(owns.values()))
        uris = {f.name: f.make(owns[f.name]) for f in FORMS}
        steps = [size_step(kind, f.name, uris[f.name]) for f in FORMS]
        second = "nbdcopy" if kind == "libnbd" else "qemu-io"
        steps.append(_tool_step(kind, "second-tool", uris["unix-space"], second))
        results = run_steps(runner, steps)
        records = {name: own.records() for name, own in owns.items()}
    for f in FORMS:
        res, recs = results[f.name], records[f.name]
        names = [n for r in recs for n in _names_sent(r)]
        size = parse_size(res.out) if res.ok else None
        verdict.expect(size == SIZE and bool(names) and set(names) == {f.export}, *f.ids,
                       expected=f"{uris[f.name]} reaches its server and sends export name {f.export!r}",
                       observed=f"exit {res.rc}, size {size}, names sent {names}; {describe(recs)}; "
                                f"{res.out[-200:]!r}")
    res = results["second-tool"]
    verdict.expect(res.ok, "URI-015", "URI-001", expected=f"{second} opens {uris['unix-space']} too",
                   observed=f"exit {res.rc}: {res.out[-300:]!r}")


# URIs a client must refuse or may treat as it likes: nbd+unix / nbds+unix without socket= (URI-004,
# URI-006, URI-016: "MUST include a socket key"), a query parameter it does not understand ("SHOULD be
# diagnosed by the parser", URI-022), an authority on a Unix-socket URI (URI-010: "SHOULD NOT be used";
# "It is up to the NBD client what should happen": any answer is recorded).
@pytest.mark.req("URI-004", "URI-006", "URI-016", "URI-022", "URI-010")
@pytest.mark.feature("newstyle")
def test_uri_refusals(request: Any, client_peer: Any, kind: str, peer_workdir: Any, verdict: Any,
                      evidence: Any) -> None:
    """URIs without a socket are refused, unknown query parameters diagnosed, authority on unix recorded."""
    runner = runner_for(request, kind)
    with contextlib.ExitStack() as stack:
        unix = stack.enter_context(own_server(peer_workdir, "uri-unix", export="disk", size=SIZE))
        tcp = stack.enter_context(own_server(peer_workdir, "uri-tcp", transport="tcp", export="disk", size=SIZE))
        watch_all(verdict, evidence, [unix, tcp])
        uris = {
            "no-socket": "nbd+unix:///disk",
            "tls-no-socket": "nbds+unix:///disk",
            "bogus-tcp": f"nbd://127.0.0.1:{tcp.port}/disk?bogus=1",
            "bogus-unix": f"nbd+unix:///disk?socket={unix.socket}&bogus=1",
            "unix-authority": f"nbd+unix://localhost/disk?socket={unix.socket}",
        }
        results = run_steps(runner, [size_step(kind, n, u) for n, u in uris.items()])
        recs = unix.records() + tcp.records()
    for name, ids in (("no-socket", ("URI-004", "URI-016")), ("tls-no-socket", ("URI-006", "URI-016"))):
        res = results[name]
        verdict.expect(not res.ok, *ids, expected=f"{uris[name]} is refused (no socket parameter)",
                       observed=f"exit {res.rc}: {res.out[-200:]!r}")
    for name in ("bogus-tcp", "bogus-unix"):
        res = results[name]
        diagnosed = not res.ok or "bogus" in res.out
        verdict.expect(diagnosed, "URI-022", expected=f"{uris[name]}: the unknown parameter 'bogus' is diagnosed "
                       "(an error, or a message naming it)", observed=f"exit {res.rc}, output {res.out[-200:]!r}")
    res = results["unix-authority"]
    if res.ok:
        # It reached the Unix socket, so it did not use the authority ("localhost") to connect: URI-010
        # held.  A refusal says nothing either way ("It is up to the NBD client what should happen").
        verdict.held("URI-010", expected="the authority is not used for a Unix-socket URI",
                       observed="connected to the socket")
    verdict.info(f"{uris['unix-authority']}: exit {res.rc} ({'connected to the socket' if res.ok else 'refused'}): "
                 f"{res.out[-150:]!r}")
    verdict.info(f"connections: {describe(recs)}")


# "Clients which do not support TLS SHOULD give an error when encountering an NBD URI that requires TLS"
# (URI-023).  Only a client row without TLS (e.g. a custom client whose matrix row lists no tls kind) can
# show it; it gets an nbds:// URI through its driver's `size` action and must fail without reading.
@pytest.mark.req("URI-023")
@pytest.mark.feature("NBD_OPT_STARTTLS")
def test_tls_uri_without_tls_support(request: Any, client_peer: Any, peer_workdir: Any, verdict: Any,
                                     evidence: Any) -> None:
    """A client without TLS refuses nbds:// (it cannot honour 'the connection MUST fail' otherwise)."""
    from types import SimpleNamespace

    from fixtures.drivers import driver_for
    if client_peer.tls:
        verdict.not_applicable(f"the matrix row lists tls {list(client_peer.tls)}: this client supports TLS")
    runner = None if client_peer.launcher == "in-process" else request.getfixturevalue("client_runner")
    driver = driver_for(client_peer, runner, peer_workdir)
    why = driver.can("size")
    if why:
        verdict.not_applicable(why)
    with own_server(peer_workdir, "uri-notls", transport="tcp", export="disk", size=SIZE) as own:
        watch_all(verdict, evidence, [own])
        view = SimpleNamespace(uri=own.uri(scheme="nbds"), socket=None, port=own.port, host=own.host,
                               export_name=own.export_name, tls=None, export=SimpleNamespace(tls=None))
        out = driver.do("size", view)
        records = own.records()
    served = sum(r.requests for r in records)
    verdict.expect(not out.ok and not served, "URI-023", expected=f"{view.uri} is refused with an error",
                   observed=f"ok {out.ok}, {served} request(s); {out.why()}")
