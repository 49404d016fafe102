"""The timeline fallback grid: every client peer against the reference server in every persona.

A persona makes the reference server advertise what one release of qemu-nbd, nbdkit or nbd-server did
(nbdref.personas).  In each client x persona cell the client runs ONE session (fixtures/drivers.py
`session`: read, write, zero, trim, flush, cache, DF read, block status, read back) and every test
below judges that one run from what the client returned and what the server recorded:

- it connects and moves data correctly (read bytes, written bytes, zeroes);
- it falls back to NBD_OPT_EXPORT_NAME when NBD_OPT_GO is refused, and uses GO when offered;
- it never sends what the persona did not offer: no structured-reply-only request or metadata option
  without structured replies, no extended header when they were refused, no WRITE_ZEROES / TRIM /
  FLUSH / CACHE / DF without the flag, no BLOCK_STATUS without a negotiated context;
- per feature, whether it used what the persona offered is judged by the client's own version against
  the timeline (a client older than a feature does not use it: `unsupported-ok`).  These judgements
  carry client, persona and feature: the report's client x persona x feature grid.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import pytest
from nbdref import personas
from nbdref._constants import Cmd, CmdFlag, Opt, TxFlag

from fixtures.drivers import Outcome, SessionPlan, SessionResult, driver_for
from fixtures.exports import expected_bytes
from fixtures.judging import HarnessError
from suites.client._common import RecordsView, Wire

SECTION = "Option haggling"
REGION = 64 * 1024
READ_OFFSET, READ_LENGTH = 8192 + 512, 4096        # in the first MiB: nobody writes there

# Ids judged by the tests of this module themselves (so the data test does not report them twice).
JUDGED_HERE = frozenset({"WZ-014", "TRIM-006", "FLUSH-003", "CMD-008", "RD-003", "BS-003", "BS-043", "BS-025",
                         "EXT-002"})


@dataclass
class Cell:
    """One client x persona run: what the client returned, and the server's records of it."""

    plan: SessionPlan
    outcome: Outcome
    result: SessionResult
    records: list[Any]
    wire: Wire
    persona: personas.Persona
    expected_read: bytes
    held: bytes                          # what the server's disk holds at plan.base afterwards


_CELLS: dict[tuple[str, str], Cell | BaseException] = {}


def _persona(persona_peer: Any) -> personas.Persona:
    return personas.get(persona_peer.persona)


@pytest.fixture
def driver(request: pytest.FixtureRequest, client_peer: Any, peer_workdir: Any) -> Any:
    runner = None if client_peer.launcher == "in-process" else request.getfixturevalue("client_runner")
    return driver_for(client_peer, runner, peer_workdir)


@pytest.fixture
def cell(request: pytest.FixtureRequest, client_peer: Any, persona_peer: Any, verdict: Any, evidence: Any,
         driver: Any) -> Cell:
    """The cell's one client session, run by the first test of the cell in this process."""
    why = driver.can("session")
    if why:
        verdict.not_applicable(why)
    key = (client_peer.id, persona_peer.id)
    if key not in _CELLS:
        try:
            _CELLS[key] = _run_cell(request, client_peer, persona_peer, driver)
        except HarnessError as e:
            _CELLS[key] = e
    found = _CELLS[key]
    if isinstance(found, BaseException):
        raise found
    evidence.add("persona server transcript", lambda: RecordsView(found.records).transcript)
    evidence.add("client output", lambda: found.outcome.why())
    return found


def _run_cell(request: pytest.FixtureRequest, client_peer: Any, persona_peer: Any, driver: Any) -> Cell:
    from fixtures.plugin import REGION_START
    from fixtures.sharing import claim_region
    server = request.getfixturevalue("persona_server")
    export = request.getfixturevalue("reference_export")
    if dict(persona_peer.options).get("handshake") == "oldstyle":
        # an oldstyle server has no export names: a client asked for "exp" rightly refuses it
        from fixtures.launch import make_uri
        server = dataclasses.replace(server, export_name="", uri=make_uri(
            export="", transport=server.transport, socket_path=server.socket, port=server.port))
    run = request.getfixturevalue("harness_run")
    base = claim_region(run, persona_peer.id, "grid", size=REGION, total=export.size - REGION_START,
                        first=REGION_START)
    plan = SessionPlan(read_offset=READ_OFFSET, read_length=READ_LENGTH, base=base)
    first = len(server.handle.records)
    outcome = driver.do("session", server, plan)
    records = list(server.handle.records)[first:]
    for record in records:
        if not record.wait(15):
            raise HarnessError(f"connection {record.id} of {persona_peer.id} did not end within 15 s")
    result = outcome.value if isinstance(outcome.value, SessionResult) else SessionResult()
    held = bytes(server.handle.exports[0].backend.pread(base, 12288))
    return Cell(plan=plan, outcome=outcome, result=result, records=records, wire=Wire(records),
                persona=_persona(persona_peer), expected_read=expected_bytes(export, READ_OFFSET, READ_LENGTH),
                held=held)


def _offered(w: Wire) -> dict[str, bool]:
    """What the server offered on this connection (its transmission flags, structured replies, the
    contexts SET_META_CONTEXT returned), by the step of a session that would use it."""
    f = w.tx_flags
    return {"zero": bool(f & TxFlag.SEND_WRITE_ZEROES), "trim": bool(f & TxFlag.SEND_TRIM),
            "flush": bool(f & TxFlag.SEND_FLUSH), "cache": bool(f & TxFlag.SEND_CACHE),
            "df": bool(f & TxFlag.SEND_DF) and w.structured, "block_status": w.structured and bool(w.contexts)}


def _haggles(persona_peer: Any) -> bool:
    """Whether the server's handshake has option haggling with replies (fixed newstyle): oldstyle has
    no options, and plain newstyle only NBD_OPT_EXPORT_NAME."""
    return dict(persona_peer.options).get("handshake", "fixed-newstyle") == "fixed-newstyle"


# "Every implementation MUST support NOTLS mode" (INTEROP-002), "NBD_CMD_READ" (INTEROP-010) and
# "NBD_CMD_WRITE" (INTEROP-011); the server's core checks every request the client sent (WR-002 framing,
# BSZ-033 range, no zero-length READ or WRITE: RD-008, WR-003): the client connects in every persona and
# moves data correctly.
@pytest.mark.req("INTEROP-002", "INTEROP-010", "INTEROP-011", "WR-002", "BSZ-033", "RD-008", "WR-003")
def test_persona_moves_data(client_peer: Any, persona_peer: Any, cell: Cell, verdict: Any) -> None:
    """Read, write, zero and read back give the right bytes, and the server holds them."""
    verdict.watch(RecordsView(cell.records, skip=JUDGED_HERE))
    r, plan = cell.result, cell.plan
    verdict.expect(cell.records != [] and r.read is not None, "INTEROP-002", expected="the client connects "
                   "without TLS and reads", observed=f"{len(cell.records)} connection(s); {cell.outcome.why()}")
    verdict.expect(r.read == cell.expected_read, "INTEROP-010", expected=f"{READ_LENGTH} bytes of the export at "
                   f"{READ_OFFSET}", observed=f"read {'nothing' if r.read is None else r.read[:16].hex() + '...'}")
    verdict.expect(r.ok("write") and r.readback == plan.readback() and cell.held == plan.readback(), "INTEROP-011",
                   "WR-002",
                   expected="the write and the zeroed range read back (client and server's disk agree)",
                   observed=f"steps {r.steps}; read back {(r.readback or b'')[:8].hex()}...; disk "
                            f"{cell.held[:8].hex()}... {cell.held[4096:4104].hex()}...")
    empty = [q for q in cell.wire.requests if q.command in (Cmd.READ, Cmd.WRITE) and q.length == 0]
    verdict.expect(not empty, "RD-008", "WR-003", expected="no zero-length READ or WRITE",
                   observed=f"{len(empty)} such request(s): {empty[:3]}")
    offered = _offered(cell.wire)
    for step, ok in offered.items():
        if ok and step in r.steps and not r.ok(step):
            verdict.fail(expected=f"{step} succeeds: {cell.persona.name} offers it",
                         observed=f"{step} failed: {r.steps[step][1]}")
    verdict.info(f"{client_peer.id} x {persona_peer.id}: options {cell.wire.option_names()}; "
                 f"steps {', '.join(f'{k}={ok}' for k, (ok, _) in r.steps.items())}")


# "Clients SHOULD fall back to NBD_OPT_EXPORT_NAME when NBD_OPT_GO is unsupported" (OPT-010, GO-021);
# implementations talking to older peers implement EXPORT_NAME as well (INTEROP-019).
@pytest.mark.req("OPT-010", "GO-021", "INTEROP-019")
@pytest.mark.feature("NBD_OPT_EXPORT_NAME")
def test_persona_go_refused_falls_back(client_peer: Any, persona_peer: Any, cell: Cell, verdict: Any) -> None:
    """Against a persona without NBD_OPT_GO the client ends haggling with NBD_OPT_EXPORT_NAME."""
    if not _haggles(persona_peer):
        verdict.not_applicable(f"{persona_peer.id}: a handshake without option replies (no NBD_OPT_GO to refuse)")
    if cell.persona.opt_go:
        verdict.not_applicable(f"{cell.persona.name} offers NBD_OPT_GO: there is no refusal to fall back from")
    w = cell.wire
    fell_back = w.sent(Opt.EXPORT_NAME) and cell.result.read is not None
    how = ("asked NBD_OPT_GO, was refused, sent NBD_OPT_EXPORT_NAME" if w.sent(Opt.GO) and fell_back else
           "sent NBD_OPT_EXPORT_NAME directly" if fell_back else f"options {w.option_names()}")
    # EXPORT_NAME (supported, INTEROP-019) is judged either way; the fallback (OPT-010, GO-021) only when
    # the client asked for GO first -- a client that never tried GO shows no fallback.
    verdict.expect(fell_back, "INTEROP-019", expected="NBD_OPT_EXPORT_NAME, then transmission", observed=how)
    if w.sent(Opt.GO):
        verdict.expect(fell_back, "OPT-010", "GO-021", expected="NBD_OPT_EXPORT_NAME after NBD_REP_ERR_UNSUP "
                       "to NBD_OPT_GO, then transmission", observed=how)
    verdict.info(how)


# "Clients SHOULD use NBD_OPT_GO in preference to NBD_OPT_EXPORT_NAME" (OPT-009).
@pytest.mark.req("OPT-009")
@pytest.mark.feature("NBD_OPT_GO")
def test_persona_go_offered_is_used(client_peer: Any, persona_peer: Any, cell: Cell, verdict: Any) -> None:
    """Against a persona with NBD_OPT_GO the client ends haggling with GO, not EXPORT_NAME."""
    if not cell.persona.opt_go or not _haggles(persona_peer):
        verdict.not_applicable(f"{persona_peer.id} does not offer NBD_OPT_GO")
    w = cell.wire
    verdict.expect(Opt.GO in w.acks and not w.sent(Opt.EXPORT_NAME), "OPT-009", expected="NBD_OPT_GO, acknowledged",
                   observed=f"options {w.option_names()}")


# Without structured replies: "a client MUST NOT use extensions needing reply payloads without first
# enabling structured replies" (SR-020; EXT-018/EXT-036 in the extended-headers text): no BLOCK_STATUS,
# no DF; no SET_META_CONTEXT (BS-043, EXT-025) or LIST_META_CONTEXT (BS-025, EXT-019) before structured
# replies; and it "SHOULD ... carry on with simple replies" (SR-018).
@pytest.mark.req("SR-018", "SR-020", "EXT-018", "EXT-036", "BS-043", "EXT-025", "BS-025", "EXT-019")
@pytest.mark.feature("NBD_OPT_STRUCTURED_REPLY")
def test_persona_without_structured_replies(client_peer: Any, persona_peer: Any, cell: Cell, verdict: Any) -> None:
    """A persona that refuses structured replies gets simple-reply traffic only, and data still moves."""
    w = cell.wire
    if w.structured:
        verdict.not_applicable("structured replies were negotiated")
    payload_reqs = w.commands(Cmd.BLOCK_STATUS) + w.with_flag(CmdFlag.DF)
    verdict.expect(not payload_reqs, "SR-020", "EXT-018", "EXT-036", expected="no BLOCK_STATUS and no DF without "
                   "structured replies", observed=f"{len(payload_reqs)} such request(s): {payload_reqs[:3]}")
    verdict.expect(not w.sent(Opt.SET_META_CONTEXT), "BS-043", "EXT-025", expected="no NBD_OPT_SET_META_CONTEXT "
                   "before structured replies", observed=f"options {w.option_names()}")
    verdict.expect(not w.sent(Opt.LIST_META_CONTEXT), "BS-025", "EXT-019", expected="no NBD_OPT_LIST_META_CONTEXT "
                   "before structured replies", observed=f"options {w.option_names()}")
    verdict.expect(cell.result.read == cell.expected_read and cell.held == cell.plan.readback(), "SR-018",
                   expected="the client carries on with simple replies", observed=cell.outcome.why())


# "Clients SHOULD handle NBD_REP_ERR_UNSUP [to NBD_OPT_EXTENDED_HEADERS] and fall back to compact
# headers" (EXT-039): a client that asked is refused and goes on with compact requests.
@pytest.mark.req("EXT-039")
@pytest.mark.feature("NBD_OPT_EXTENDED_HEADERS")
def test_persona_refuses_extended_headers(client_peer: Any, persona_peer: Any, cell: Cell, verdict: Any) -> None:
    """A client that asks for extended headers and is refused carries on with compact headers."""
    from fixtures.timeline import expected
    p = cell.persona
    if p.extended_headers or not _haggles(persona_peer):
        verdict.not_applicable(f"{persona_peer.id} does not refuse NBD_OPT_EXTENDED_HEADERS")
    w = cell.wire
    if not w.sent(Opt.EXTENDED_HEADERS):
        e = expected("NBD_OPT_EXTENDED_HEADERS", client_peer)
        if e.answer != "yes":
            verdict.not_applicable(f"{client_peer.id} does not ask for extended headers ({e.reason})")
        verdict.timeline("NBD_OPT_EXTENDED_HEADERS", False, how="never asked, so no fallback to observe")
        return
    breaches = [v for r in cell.records for v in r.violations if v.req_id.startswith("EXT")]
    verdict.expect(not breaches and cell.result.read == cell.expected_read, "EXT-039",
                   expected="compact request headers after the refusal, and the data path works",
                   observed=f"{breaches[:3] or 'no breach'}; {cell.outcome.why()}")


# With extended headers, "NBD_CMD_WRITE MUST use the flag NBD_CMD_FLAG_PAYLOAD_LEN" (EXT-002) and every
# request uses the 32-byte extended header (EXT-037), and NBD_OPT_EXTENDED_HEADERS carried no data (EXT-029):
# the server's core checks each of them.  Its own test (named for the writes) so a known breach is matched
# by its baseline entry only where it can happen.
@pytest.mark.req("EXT-002", "EXT-037", "EXT-029")
@pytest.mark.feature("NBD_OPT_EXTENDED_HEADERS")
def test_persona_extended_writes(client_peer: Any, persona_peer: Any, cell: Cell, verdict: Any) -> None:
    """Once extended headers are negotiated, the session's WRITEs are framed as the extension says."""
    if Opt.EXTENDED_HEADERS not in cell.wire.acks:
        verdict.not_applicable("extended headers were not negotiated on this connection")
    verdict.watch(RecordsView(cell.records, only=frozenset({"EXT-002", "EXT-037", "EXT-029"})))
    verdict.expect(bool(cell.wire.commands(Cmd.WRITE)), "EXT-002", expected="the session's WRITEs reach the server",
                   observed=f"{len(cell.wire.commands(Cmd.WRITE))} WRITE(s)")


# Flag-exposed commands the persona did not advertise: "The client MUST NOT use a flag-exposed feature
# ... unless its flag was set" (CMD-008), per command (WZ-014, TRIM-006, FLUSH-003, RD-003/RD-005 for
# DF), and no BLOCK_STATUS without a selected context (BS-003, BS-045, BS-066).
UNOFFERED = [
    pytest.param("zero", Cmd.WRITE_ZEROES, 0, marks=pytest.mark.req("CMD-008", "WZ-014"), id="WRITE_ZEROES"),
    pytest.param("trim", Cmd.TRIM, 0, marks=pytest.mark.req("CMD-008", "TRIM-006"), id="TRIM"),
    pytest.param("flush", Cmd.FLUSH, 0, marks=pytest.mark.req("CMD-008", "FLUSH-003"), id="FLUSH"),
    pytest.param("cache", Cmd.CACHE, 0, marks=pytest.mark.req("CMD-008"), id="CACHE"),
    pytest.param("df", None, CmdFlag.DF, marks=pytest.mark.req("CMD-008", "RD-003", "RD-005"), id="DF"),
    pytest.param("block_status", Cmd.BLOCK_STATUS, 0, marks=pytest.mark.req("BS-003", "BS-045", "BS-066"),
                 id="BLOCK_STATUS"),
]
STEP_IDS = {"zero": ("CMD-008", "WZ-014"), "trim": ("CMD-008", "TRIM-006"), "flush": ("CMD-008", "FLUSH-003"),
            "cache": ("CMD-008",), "df": ("CMD-008", "RD-003", "RD-005"), "block_status": ("BS-003", "BS-045", "BS-066")}
FLAG_OF = {"zero": TxFlag.SEND_WRITE_ZEROES, "trim": TxFlag.SEND_TRIM, "flush": TxFlag.SEND_FLUSH,
           "cache": TxFlag.SEND_CACHE, "df": TxFlag.SEND_DF}


@pytest.mark.parametrize(("step", "command", "flag"), UNOFFERED)
def test_persona_unoffered_not_sent(client_peer: Any, persona_peer: Any, cell: Cell, verdict: Any, driver: Any,
                                    step: str, command: int | None, flag: int) -> None:
    """The client asked to do `step`; the persona does not offer it: the request never goes out."""
    if _offered(cell.wire)[step]:
        verdict.not_applicable(f"{persona_peer.id} offered it on this connection")
    if step not in cell.result.steps:
        verdict.not_applicable(f"the {driver.kind} session has no {step} step"
                               + (f" ({driver.NO_CACHE})" if step == "cache" and hasattr(driver, "NO_CACHE") else ""))
    w = cell.wire
    sent = w.commands(command) if command is not None else w.with_flag(flag)
    what = f"NBD_CMD_{Cmd(command).name}" if command is not None else "NBD_CMD_FLAG_DF"
    verdict.expect(not sent, *STEP_IDS[step], expected=f"no {what}: {cell.persona.name} did not offer it "
                   f"({'no context negotiated' if step == 'block_status' else FLAG_OF[step].name + ' clear'})",
                   observed=f"{len(sent)} sent: {sent[:3]}")
    ok, detail = cell.result.steps[step]
    verdict.info(f"{step}: the client {'reported success' if ok else 'refused it itself: ' + detail[:160]}")


# The grid row of this cell: each feature the persona offers, judged by the client's version against
# the timeline (`pass` / `unsupported-ok` / `missing` / `early`); each it does not offer, recorded.
# (offered(persona, wire), used(wire)): options by the persona (asking is how a client finds out),
# commands by what the server advertised on the connection.
FEATURES: dict[str, tuple[Any, Any]] = {
    "NBD_OPT_GO": (lambda p, w: p.opt_go, lambda w: w.sent(Opt.GO)),
    # extended headers supersede structured replies: a client that got them has no need to ask for SR
    "NBD_OPT_STRUCTURED_REPLY": (lambda p, w: p.structured_replies,
                                 lambda w: w.sent(Opt.STRUCTURED_REPLY) or Opt.EXTENDED_HEADERS in w.acks),
    "NBD_OPT_EXTENDED_HEADERS": (lambda p, w: p.extended_headers, lambda w: w.sent(Opt.EXTENDED_HEADERS)),
    "NBD_OPT_SET_META_CONTEXT": (lambda p, w: w.structured and bool(p.meta_contexts),
                                 lambda w: w.sent(Opt.SET_META_CONTEXT)),
    "NBD_CMD_BLOCK_STATUS": (lambda p, w: _offered(w)["block_status"], lambda w: bool(w.commands(Cmd.BLOCK_STATUS))),
    "NBD_CMD_WRITE_ZEROES": (lambda p, w: _offered(w)["zero"], lambda w: bool(w.commands(Cmd.WRITE_ZEROES))),
    "NBD_CMD_TRIM": (lambda p, w: _offered(w)["trim"], lambda w: bool(w.commands(Cmd.TRIM))),
    "NBD_CMD_FLUSH": (lambda p, w: _offered(w)["flush"], lambda w: bool(w.commands(Cmd.FLUSH))),
    "NBD_CMD_CACHE": (lambda p, w: _offered(w)["cache"], lambda w: bool(w.commands(Cmd.CACHE))),
    "NBD_CMD_FLAG_DF": (lambda p, w: _offered(w)["df"], lambda w: bool(w.with_flag(CmdFlag.DF))),
}
# Session steps behind the command features (a client whose session has no such step is not judged).
FEATURE_STEP = {"NBD_CMD_BLOCK_STATUS": "block_status", "NBD_CMD_WRITE_ZEROES": "zero", "NBD_CMD_TRIM": "trim",
                "NBD_CMD_FLUSH": "flush", "NBD_CMD_CACHE": "cache", "NBD_CMD_FLAG_DF": "df"}


def test_persona_feature_grid(client_peer: Any, persona_peer: Any, cell: Cell, verdict: Any) -> None:
    """One judgement per feature: the client x persona x feature grid of the report."""
    p, w = cell.persona, cell.wire
    if not w.requests:
        verdict.info(f"no transmission ({cell.outcome.why()}): no feature to judge (test_persona_moves_data "
                     "says why)", only=True)
        return
    for feature, (offered, used) in FEATURES.items():
        step = FEATURE_STEP.get(feature)
        if feature.startswith("NBD_OPT_") and not _haggles(persona_peer):
            verdict.info(f"{feature}: {persona_peer.id} has no option haggling", feature=feature)
            continue
        if step and step not in cell.result.steps:
            verdict.info(f"{feature}: the client's session cannot ask for it", feature=feature)
            continue
        if offered(p, w):
            verdict.timeline(feature, used(w), how=f"offered by {p.name}")
        elif feature.startswith("NBD_OPT_"):    # asking is allowed; the refusal is the persona's answer
            verdict.info(f"{feature}: not offered by {p.name}; {'asked, refused' if used(w) else 'not asked'}",
                         feature=feature)
        elif used(w):
            verdict.fail(expected=f"{feature} not used: {p.name} does not offer it",
                         observed=f"{feature} used ({w.option_names()})")
        else:
            verdict.info(f"{feature}: not offered by {p.name}, not used", feature=feature)
