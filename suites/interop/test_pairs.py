"""Real client x real server: every client peer against every server peer, through the validating proxy.

The proxy (nbdref.proxy, fixture `pair` / `proxied` of fixtures/proxying.py) forwards the bytes
unchanged and checks both directions: each breach is judged against the side that committed it
(`peer=` the client or the server peer), so a failing pair names the side and the rule; the
transcript of both directions and the pcapng are its evidence.  Per pair: one `session` of the client
driver (read, write, zero, trim, flush, cache, DF read, block status, read back: what the driver has),
then size, list and map, and TLS (x509, psk) where both sides can.  Each test records what the pair
negotiated (verdict.info): handshake (GO / EXPORT_NAME / oldstyle), structured replies, extended
headers, meta contexts, TLS.  Results carry both peers: the report's client x server grid.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from fixtures.drivers import (
    QEMU_TLS_OVER_UNIX_SINCE,
    Outcome,
    SessionPlan,
    SessionResult,
    _version,
    driver_for,
)
from fixtures.exports import expected_bytes
from fixtures.judging import HarnessError

SECTION = "Baseline"
REGION = 64 * 1024
READ_OFFSET, READ_LENGTH = 8192 + 512, 4096        # in the first MiB of the writable export: nobody writes there
TLS_KINDS = ("x509", "psk")


@pytest.fixture
def driver(request: pytest.FixtureRequest, client_peer: Any, peer_workdir: Any) -> Any:
    runner = None if client_peer.launcher == "in-process" else request.getfixturevalue("client_runner")
    return driver_for(client_peer, runner, peer_workdir)


def _oldstyle(server_peer: Any) -> bool:
    return dict(server_peer.options).get("handshake") == "oldstyle"


def _target(server: Any, server_peer: Any) -> Any:
    """An oldstyle server has no export names: a client asked for "exp" rightly refuses it."""
    if not _oldstyle(server_peer):
        return server
    from fixtures.launch import make_uri
    return dataclasses.replace(server, export_name="", uri=make_uri(
        export="", transport=server.transport, socket_path=server.socket, port=server.port))


def _negotiated(pair: Any) -> str:
    """One line per connection: what the pair agreed on."""
    out = []
    for n in pair.negotiated():
        if "handshake" not in n:
            out.append(f"no transmission (options {', '.join(n.get('options', [])) or 'none'})")
            continue
        ctx = ",".join(n.get("meta_contexts") or []) or "none"
        out.append(f"{n['handshake']}; structured replies {n.get('structured_replies')}; extended headers "
                   f"{n.get('extended_headers')}; contexts {ctx}; TLS {n.get('tls')}; "
                   f"commands {n.get('commands', {})}")
    return " | ".join(dict.fromkeys(out)) or "no connection reached the proxy"


def _run(driver: Any, verdict: Any, action: str, server: Any, *args: Any) -> Outcome:
    why = driver.can(action, server)
    if why:
        verdict.not_applicable(why)
    return driver.do(action, server, *args)


def _refused(pair: Any, option_name: str) -> bool:
    """The server answered the client's option with an error reply (a refusal the spec allows)."""
    from nbdref import events as ev
    from nbdref._constants import Opt
    code = Opt[option_name]
    return any(isinstance(e.event, ev.RepError) and e.event.option == code
               for r in pair.records() for e in r.transcript if e.direction == "S")


def _gave_up_without_export_name(pair: Any) -> bool:
    """No connection of the pair reached transmission, at least one NBD_OPT_INFO / NBD_OPT_GO was refused
    or could not be sent (the server is not fixed newstyle), and the client never sent NBD_OPT_EXPORT_NAME."""
    from nbdref import events as ev
    from nbdref._constants import Opt
    records = pair.records()
    sent = [e.event for r in records for e in r.transcript if e.direction == "C" and e.event is not None]
    if any(isinstance(e, ev.OptExportName) for e in sent) or any(isinstance(e, ev.Request) for e in sent):
        return False
    refused = any(isinstance(e.event, ev.RepError) and e.event.option in (Opt.INFO, Opt.GO)
                  for r in records for e in r.transcript if e.direction == "S")
    plain = any(isinstance(e.event, ev.NewstyleGreeting) and not e.event.flags & 1
                for r in records for e in r.transcript if e.direction == "S")
    return refused or plain


def _first_breach(pair: Any, client_peer: Any, server_peer: Any) -> tuple[Any, str] | None:
    """(peer, "ID by the client|server") of the first mandatory breach the proxy saw, if any: a data
    path that fails after it fails because of it (that breach is the pair's failure, judged already)."""
    from nbdref.requirements import MANDATORY_LEVELS
    for r in pair.records():
        for v in r.violations:
            if v.level in MANDATORY_LEVELS:
                side = "client" if v.direction == "C" else "server"
                return (client_peer if v.direction == "C" else server_peer), f"{v.req_id} by the {side}"
    return None


def _refused_commands(pair: Any) -> dict[str, int]:
    """Commands the server answered with an error (command name -> error), from the transcripts."""
    from nbdref import events as ev
    out: dict[str, int] = {}
    for r in pair.records():
        pending: dict[int, str] = {}
        for e in r.transcript:
            x = getattr(e, "event", None)
            if e.direction == "C" and isinstance(x, ev.Request):
                pending[x.cookie] = getattr(x.command, "name", str(x.command))
            elif e.direction == "S" and isinstance(x, ev.SimpleReply | ev.ErrorChunk) and x.error:
                name = pending.get(x.cookie)
                if name is not None:
                    out.setdefault(name, int(x.error))
    return out


def _culprit(pair: Any, client_peer: Any, server_peer: Any, command: str) -> tuple[Any, str]:
    """Who a failed data check is about: the server when it refused `command` (a request the client
    was entitled to send: no client breach was seen), else the pair (peer None)."""
    err = _refused_commands(pair).get(command)
    if err is not None:
        return server_peer, f"the server answered NBD_CMD_{command} with error {err}"
    return None, "no error reply from the server"


def _held(server: Any, offset: int, length: int) -> bytes | None:
    """What the server's export now holds, read directly (not through the proxy) by the reference client."""
    from nbdref.client import Client, ClientError
    try:
        with Client(timeout=10) as c:
            c.connect_uri(server.uri)
            return bytes(c.pread(length, offset))
    except (ClientError, OSError) as e:
        raise HarnessError(f"reading back from {server.spec.id} directly failed: {type(e).__name__}: {e}") from e


# "Every implementation MUST support NOTLS mode" (INTEROP-002), NBD_CMD_READ (INTEROP-010) and
# NBD_CMD_WRITE (INTEROP-011): the pair connects without TLS and moves data correctly; every rule the
# proxy checks on either side's messages is judged against that side.
@pytest.mark.req("INTEROP-002", "INTEROP-010", "INTEROP-011")
@pytest.mark.feature("newstyle")
def test_pair_moves_data(client_peer: Any, server_peer: Any, pair: Any, region: Any, writable_export: Any,
                         driver: Any, verdict: Any) -> None:
    """One client session through the proxy: the read, the write, the zeroed range and the read back
    are right, and the server's disk holds them."""
    server = _target(pair.via, server_peer)
    plan = SessionPlan(read_offset=READ_OFFSET, read_length=READ_LENGTH, base=region(REGION))
    outcome = _run(driver, verdict, "session", server, plan)
    r = outcome.value if isinstance(outcome.value, SessionResult) else SessionResult()
    held = _held(_target(pair.upstream, server_peer), plan.base, 12288)
    records = pair.records()
    want = expected_bytes(writable_export, READ_OFFSET, READ_LENGTH)
    checks = [
        (records != [] and r.read is not None, "INTEROP-002", "READ", "the client connects without TLS and reads",
         f"{len(records)} connection(s); {outcome.why()}"),
        (r.read == want, "INTEROP-010", "READ", f"{READ_LENGTH} bytes of the export at {READ_OFFSET}",
         f"read {'nothing' if r.read is None else r.read[:16].hex() + '...'}"),
        (r.ok("write") and r.readback == plan.readback() and held == plan.readback(), "INTEROP-011", "WRITE",
         "the write and the zeroed range read back, and the server's disk holds them",
         f"steps {r.steps}; read back {(r.readback or b'')[:8].hex()}...; disk "
         f"{(held or b'')[:8].hex()}... {(held or b'')[4096:4104].hex()}..."),
    ]
    breach = _first_breach(pair, client_peer, server_peer)
    for ok, rid, command, expected, observed in checks:
        if ok:
            verdict.held(rid, expected=expected, observed=observed)
        elif breach is not None:
            # One root cause, one failure: the breach (watched, attributed) broke the session.
            verdict.info(f"{rid} not met after {breach[1]}: {observed}")
        else:
            peer, why = _culprit(pair, client_peer, server_peer, command)
            verdict.fail(rid, expected=expected, observed=f"{why}; {observed}", peer=peer)
    failed = {k: d for k, (ok, d) in r.steps.items() if not ok}
    verdict.info(f"negotiated: {_negotiated(pair)}; steps failed: {failed or 'none'}")


@pytest.mark.req("INTEROP-002")
@pytest.mark.feature("newstyle")
def test_pair_size(client_peer: Any, server_peer: Any, pair: Any, writable_export: Any, driver: Any,
                   verdict: Any) -> None:
    """The client reports the export's size through the proxy."""
    out = _run(driver, verdict, "size", _target(pair.via, server_peer))
    if _wrong_size_announced(verdict, pair, server_peer, out, writable_export.size):
        return
    if not out.ok and _gave_up_without_export_name(pair):
        # The server refused (or, in plain newstyle, could not take) the newer options and the client
        # ended the session instead of going on with NBD_OPT_EXPORT_NAME: "Clients SHOULD fall back to
        # NBD_OPT_EXPORT_NAME when NBD_OPT_GO is unsupported" (OPT-010) -- the client's side of the pair.
        verdict.fail("OPT-010", expected="after the refusal, NBD_OPT_EXPORT_NAME and the size",
                     observed=f"no NBD_OPT_EXPORT_NAME; {_negotiated(pair)}; {out.why()}", peer=client_peer)
        return
    verdict.expect(out.ok and out.value == writable_export.size, "INTEROP-002",
                   expected=f"size {writable_export.size}", observed=f"{out.value}; {out.why()}")
    verdict.info(f"negotiated: {_negotiated(pair)}")


def _wrong_size_announced(verdict: Any, pair: Any, server_peer: Any, out: Outcome, size: int) -> bool:
    """The client reported a wrong size that the server announced (NBD_INFO_EXPORT, the EXPORT_NAME
    reply): the server's failure, not the client's (it reported what it was told)."""
    if not (out.ok and out.value != size and out.value in _announced_sizes(pair)):
        return False
    verdict.fail(expected=f"the server announces the export's size {size}",
                 observed=f"it announced {out.value} (the client reported that): {_negotiated(pair)}",
                 peer=server_peer)
    return True


def _announced_sizes(pair: Any) -> set[int]:
    from nbdref import events as ev
    return {x.export_size for r in pair.records() for e in r.transcript if e.direction == "S"
            and isinstance(x := getattr(e, "event", None), ev.RepInfoExport | ev.ExportNameReply | ev.OldstyleGreeting)}


# "Every implementation MUST support NBD_OPT_LIST and its response" (INTEROP-008); a server may still
# refuse to list (NBD_REP_ERR_POLICY, LIST-*): that is recorded, not failed.
@pytest.mark.req("INTEROP-008")
@pytest.mark.feature("NBD_OPT_LIST")
def test_pair_list(client_peer: Any, server_peer: Any, pair: Any, writable_export: Any, driver: Any,
                   verdict: Any) -> None:
    """The client lists the server's exports through the proxy and finds the export."""
    if _oldstyle(server_peer) or dict(server_peer.options).get("handshake") == "newstyle":
        verdict.not_applicable(f"{server_peer.id}: no option haggling with replies (no NBD_OPT_LIST)")
    out = _run(driver, verdict, "list", pair.via)
    if not out.ok and _refused(pair, "LIST"):
        verdict.info(f"the server refused NBD_OPT_LIST; the client reported: {out.why()}")
        return
    names = list(out.value or [])
    served = writable_export.name in names or (bool(names) and all(
        _serves(pair.upstream, name, writable_export.size) for name in names[:4]))
    # (nbdkit's file plugin serves any name and lists its default export "": honest, not a breach.)
    verdict.expect(out.ok and served, "INTEROP-008", expected=f"the listing names {writable_export.name!r} "
                   "or only exports the server serves", observed=f"{names}; {out.why()}")
    verdict.info(f"lists {names}; negotiated: {_negotiated(pair)}")


def _serves(server: Any, name: str, size: int) -> bool:
    """The server serves an export `name` of `size` bytes (asked directly by the reference client)."""
    from nbdref.client import Client, ClientError
    try:
        with Client(timeout=10) as c:
            c.set_export_name(name)
            c.connect_uri(server.uri)
            return c.get_size() == size
    except (ClientError, OSError):
        return False


@pytest.mark.feature("NBD_CMD_BLOCK_STATUS")
def test_pair_map(client_peer: Any, server_peer: Any, pair: Any, writable_export: Any, driver: Any,
                  verdict: Any) -> None:
    """The client maps the export through the proxy: extents start at 0 and cover it."""
    out = _run(driver, verdict, "map", _target(pair.via, server_peer))
    neg = pair.negotiated()
    contexts = any("base:allocation" in (n.get("meta_contexts") or []) for n in neg)
    if not out.ok and not contexts:
        verdict.info(f"no base:allocation negotiated ({_negotiated(pair)}); the client's map failed: {out.why()}",
                     only=True)
        return
    rows = out.value or []
    covered = sum(length for _, length in rows)
    if not out.ok or not rows or rows[0][0] != 0 or covered != writable_export.size:
        verdict.fail(expected=f"extents from 0 covering {writable_export.size} bytes",
                     observed=f"{rows[:4]}... covering {covered}; {out.why()}")
    verdict.info(f"negotiated: {_negotiated(pair)}; {len(rows)} extents")


# "Implementations wanting maximum interoperability SHOULD support TLS" (INTEROP-014): both sides
# list the kind, the proxy terminates TLS on both sides with the run's material and checks the
# decrypted streams.
@pytest.mark.req("INTEROP-014")
@pytest.mark.feature("NBD_OPT_STARTTLS")
@pytest.mark.parametrize("kind", TLS_KINDS)
def test_pair_tls(request: pytest.FixtureRequest, client_peer: Any, server_peer: Any, proxied: Any,
                  driver: Any, verdict: Any, kind: str) -> None:
    """Over TLS, through the proxy: the client reports the size; both streams are checked."""
    from fixtures.plugin import tls_peer_server
    if kind not in tuple(client_peer.tls or ()):
        verdict.not_applicable(f"{client_peer.id}: the matrix row lists tls {list(client_peer.tls or ())}, not {kind}")
    server = tls_peer_server(request, server_peer, kind)
    # qemu before 7.0 does TLS only over IP sockets: the proxy listens on TCP for it, whatever the server does.
    old_qemu = client_peer.implementation == "qemu-io" and _version(client_peer) < QEMU_TLS_OVER_UNIX_SINCE
    p = proxied(server, "tcp" if old_qemu else None)
    out = _run(driver, verdict, "tls", _target(p.via, server_peer))
    records = p.records()
    if _wrong_size_announced(verdict, p, server_peer, out, server.export.size):
        return
    tls_both = any(r.tls for r in records)
    verdict.expect(out.ok and out.value == server.export.size and tls_both, "INTEROP-014",
                   expected=f"TLS with both sides, size {server.export.size}",
                   observed=f"{out.value}; TLS on {sum(r.tls for r in records)}/{len(records)} connection(s) "
                            f"({'; '.join(r.reason for r in records)}); {out.why()}")
    verdict.info(f"negotiated: {_negotiated(p)}")
