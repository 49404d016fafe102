"""Robustness: every client peer against every fault of the reference server (nbdref.faults).

Each case starts a reference server of its own that breaks the protocol in one way (a wrong magic, a
cut connection, a stall, a broken reply chunk...), has the client read twice on one connection (the
fault hits the first READ, or the handshake), and stops that server STOP_AFTER seconds in.  The client
must fail the operation cleanly within that bound: an error, not a hang, not a crash, and never wrong
data returned as good.  Which allowed reaction it chose (error at once, error when the server hung up,
tolerated with the right data, went on with the next read) is recorded.  Faults that the spec answers
with a client rule name it: an inconsistent chunk or unknown chunk type ends the connection (SR-053,
SR-027), an unknown error chunk fails the reply (SR-051), unknown reply flags are ignored (SR-026),
chunks are reassembled (RD-023), an unknown error value is taken as NBD_EINVAL (ERR-012).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest
from nbdref import faults
from nbdref._constants import Cmd, Opt

from fixtures.drivers import driver_for
from fixtures.exports import ExportRequest, expected_bytes
from fixtures.judging import HarnessError
from fixtures.launch import export_workdir
from fixtures.launchers.inprocess import start_reference
from suites.client._common import RecordsView, Wire

SECTION = "Structured replies"
MiB = 1 << 20
EXPORT = ExportRequest(name="exp", size=1 * MiB, content="pattern", read_only=True)
READS = [(64 * 1024 + 512, 4096), (128 * 1024, 4096)]     # the fault hits the first; the second is normal
STOP_AFTER = 5.0              # the broken server hangs up this long after the client started
BOUND = 20.0                  # the client must have ended by then: later is a hang
STALL = 1                     # seconds the stall faults keep silent before the server hangs up
# Faults after which the server only waits (the client can but wait too): hang up sooner.
STOP_SOONER = {"missing-done": 2.0}
CRASH_SIGNALS = {4: "SIGILL", 6: "SIGABRT", 7: "SIGBUS", 8: "SIGFPE", 11: "SIGSEGV"}

# Every fault of the catalogue is a case (a new fault is judged for robustness at once).  Here: the
# persona a fault needs (structured-unnegotiated: a server without structured replies, qemu 2.10; the
# others: the whole-spec persona), the ids a case judges, the parameter of the stall faults.
PERSONA = {"structured-unnegotiated": "qemu-2.10"}
IDS: dict[str, tuple[str, ...]] = {
    "chunk-outside-range": ("SR-053",), "error-chunk-bad-message-length": ("SR-053",),
    "unknown-chunk-type": ("SR-027",), "unknown-error-chunk": ("SR-051",), "unknown-reply-flag": ("SR-026",),
    "chunks-out-of-order": ("RD-023",), "unknown-error-value": ("ERR-012",),
}
PARAM = {"stall-handshake": STALL, "stall-reply": STALL}
CASES: dict[str, tuple[str, tuple[str, ...]]] = {
    (f"{name}:{PARAM[name]}" if name in PARAM else name): (PERSONA.get(name, "nbdref"), IDS.get(name, ()))
    for name in faults.FAULTS
}
# Faults the spec answers with a hard disconnect (SR-027, SR-053).
HARD_DISCONNECT = {"chunk-outside-range", "unknown-chunk-type", "error-chunk-bad-message-length"}
MUST_SUCCEED = {"unknown-reply-flag", "chunks-out-of-order"}
MUST_FAIL = {"chunk-outside-range", "unknown-chunk-type", "unknown-error-chunk", "unknown-error-value",
             "wrong-greeting-magic", "wrong-option-reply-magic", "wrong-reply-magic", "error-chunk-zero-error",
             "error-chunk-bad-message-length", "disconnect-handshake", "disconnect-reply"}


def _params() -> list[Any]:
    out = []
    for spec, (_persona, ids) in CASES.items():
        marks = [pytest.mark.req(*ids)] if ids else []
        out.append(pytest.param(spec, marks=marks, id=spec.split(":")[0]))
    return out


@pytest.fixture
def fault_server(fault: str) -> Iterator[Any]:
    """A reference server of its own with `fault` (one per case: a fault applies once per connection,
    and its hang-up must not disturb other cases)."""
    persona = CASES[fault][0]
    server = start_reference(EXPORT, workdir=export_workdir(f"fault-{fault.split(':')[0]}"), persona=persona,
                             fault=fault)
    try:
        yield server
    finally:
        server.stop()


@pytest.mark.parametrize("fault", _params())
def test_client_meets_fault(request: pytest.FixtureRequest, client_peer: Any, fault: str, fault_server: Any,
                            peer_workdir: Any, verdict: Any, evidence: Any) -> None:
    """The client fails the operation cleanly, in bounded time, and never returns wrong data as good."""
    f = faults.get(fault)
    if f is not None and (f.status_bits or f.split_extents or f.context_ids):
        verdict.not_applicable(f"{f.name} reshapes block-status replies or context ids; this case only reads "
                               "(the metadata suites provoke it)")
    runner = None if client_peer.launcher == "in-process" else request.getfixturevalue("client_runner")
    driver = driver_for(client_peer, runner, peer_workdir)
    why = driver.can("reads")
    if why:
        verdict.not_applicable(why)
    srv = fault_server.handle
    first = len(srv.records)
    stop_after = STOP_SOONER.get(fault.split(":")[0], STOP_AFTER)
    timer = threading.Timer(stop_after, fault_server.stop)
    timer.start()
    try:
        out = driver.do("reads", fault_server, READS)
    finally:
        timer.cancel()
    fault_server.stop()
    records = list(srv.records)[first:]
    for record in records:
        if not record.wait(10):
            raise HarnessError(f"connection {record.id} of the fault server did not end")
    view = RecordsView(records)
    evidence.add("fault server transcript", lambda: view.transcript)
    evidence.add("client output", out.why)
    name = fault.split(":")[0]
    ids = CASES[fault][1]
    wire = Wire(records)
    if f is not None and f.needs_structured and not wire.structured and records:
        verdict.not_applicable("the client negotiated no structured replies, so this fault never applies")
    if f is not None and f.needs_simple and wire.structured:
        verdict.not_applicable("the client negotiated structured replies, so this fault never applies")
    # a custom client's error text follows no convention: its errno name is not judged
    reaction = _judge(verdict, name, ids, out, records, wire, stop_after,
                      errno_named=client_peer.implementation != "custom")
    verdict.info(f"{name}: {reaction}")


def _after_fault(records: list[Any]) -> list[str]:
    """The requests the client sent after its first READ, on that READ's connection (a client that
    must hard-disconnect sends none; NBD_CMD_DISC is a soft disconnect)."""
    for r in records:
        reqs = Wire([r]).requests
        firsts = [i for i, q in enumerate(reqs) if q.command == Cmd.READ]
        if firsts:
            return [Cmd(q.command).name if q.command in set(Cmd) else hex(q.command) for q in reqs[firsts[0] + 1:]]
    return []


def _judge(verdict: Any, name: str, ids: tuple[str, ...], out: Any, records: list[Any], wire: Wire,
           stop_after: float, *, errno_named: bool) -> str:
    """Judge the client's reaction; return it in words."""
    took = out.seconds
    rc = out.rc
    if out.timed_out or took >= BOUND:
        verdict.fail(*ids, expected=f"the client ends within {BOUND:.0f} s (the server hung up after {stop_after:.0f} s)",
                     observed=f"still running after {took:.1f} s: a hang")
        return "hang"
    signal = -rc if rc is not None and rc < 0 else rc - 128 if rc is not None and rc > 128 else None
    if signal in CRASH_SIGNALS:
        verdict.fail(*ids, expected="an error, not a crash", observed=f"killed by {CRASH_SIGNALS[signal]} ({out.why()})")
        return "crash"
    reads = out.value if isinstance(out.value, list) else [(False, None, out.stderr[-200:])] * len(READS)
    (ok1, data1, err1), (ok2, data2, _err2) = reads[0], reads[1]
    want1 = expected_bytes(EXPORT, *READS[0])
    want2 = expected_bytes(EXPORT, *READS[1])
    for (ok, data), want, which in (((ok1, data1), want1, "first"), ((ok2, data2), want2, "second")):
        if ok and data != want:
            verdict.fail(*ids, expected="never wrong data returned as good",
                         observed=f"the {which} read returned {len(data or b'')} bytes that differ from the export")
            return "wrong data returned as good"
    when = "at once" if took < stop_after - 0.5 else "when the server hung up"
    went_on = ok2 and any(len(Wire([r]).commands(Cmd.READ)) >= 2 for r in records)   # same connection
    after = _after_fault(records)
    ending = (f"then sent {' '.join(after)}" if after else "then closed without another request")
    if name in MUST_SUCCEED:
        verdict.expect(ok1, *ids, expected="the first read succeeds with the right data (the spec says the "
                       "client ignores / reassembles this)", observed=f"it failed: {err1[:200]}")
        return f"read ok ({took:.1f} s)" if ok1 else f"read failed {when}: {err1[:120]}"
    reaction = f"error {when} ({took:.1f} s): {err1.strip()[:160]}; {ending}"
    if name in MUST_FAIL and not verdict.expect(not ok1, *ids, expected="the broken reply is not accepted as a "
                                                "successful read", observed=f"the first read succeeded after {name}"):
        return "accepted the broken reply"
    if ok1:
        return f"tolerated: right data ({took:.1f} s)"
    if name in HARD_DISCONNECT:
        # "If the client receives an unknown or unexpected type, other than an error chunk, it MUST
        # initiate a hard disconnect" (SR-027); "for all other messages with unknown or unexpected type
        # or inconsistent contents, the client MUST initiate a hard disconnect" (SR-053)
        verdict.expect(not after, *ids, expected="a hard disconnect: no further request on that connection after "
                       "the broken reply", observed=f"{reaction}" + ("; went on: the next read on the same connection "
                                                                   "succeeded" if went_on else ""))
    if name == "unknown-error-value":
        # "treat an unexpected error value as if it were NBD_EINVAL" (a failed command, not a hang-up)
        if errno_named:
            # how each tool names NBD_EINVAL: qemu "Invalid argument", libnbd "EINVAL", nbdref "EINVAL"
            verdict.expect("EINVAL" in err1 or "Invalid argument" in err1, *ids, expected="the read fails as "
                           "NBD_EINVAL", observed=f"the client reported: {err1.strip()[:200]}")
        verdict.expect(went_on, *ids, expected="the read fails and the client goes on with the next request",
                       observed=reaction + (f"; next read ok={ok2}, {len(records)} connection(s), "
                                            f"{len(wire.commands(Cmd.READ))} READ(s)" if not went_on else ""))
    if went_on:
        reaction += "; went on: the next read on the same connection succeeded"
    if any(o.option == Opt.GO for o in wire.options) and not wire.requests and name.startswith("wrong-option"):
        reaction += "; stopped in haggling"
    return reaction
