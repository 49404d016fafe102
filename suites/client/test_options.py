"""Options as clients send them: listing and aborting, servers that refuse optional options, server
replies a client must tolerate (an undefined transmission flag, NBD_REP_ERR_SHUTDOWN, no ACK to ABORT).

Reference servers of the test's own (suites/client/_own.py) in personas and faults; one client run per
test.  The server's core checks each option (OPT-012, OPT-017, BS-025/027/043/046, DISC-007, DISC-014);
the test judges from the transcript what the client chose to send and whether it carried on.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from nbdref._constants import Cmd, Opt
from nbdref.personas import DIRTY_BITMAP, with_changes
from nbdref.personas import get as persona

from suites.client._own import (
    MiB,
    Step,
    client_events,
    describe,
    options_sent,
    own_server,
    parse_read,
    pattern,
    read_once,
    read_step,
    requests_sent,
    run_steps,
    runner_for,
    watch_all,
)

SECTION = "Option haggling"
OFFSET, LENGTH = MiB + 4096, 512


def list_step(kind: str, name: str, own: Any, *, contexts: bool = False) -> Step:
    """List the server's exports: nbdinfo --list, qemu-nbd --list (qemu's nbd/client.c), opt_list; with
    ``contexts`` also base:allocation by NBD_OPT_LIST_META_CONTEXT (libnbd through nbdsh, nbdref)."""
    if kind == "qemu":
        where = ["-k", str(own.socket)] if own.socket else ["-b", str(own.host), "-p", str(own.port)]
        return Step(name, ["qemu-nbd", "--list", *where])
    if kind == "libnbd" and not contexts:
        return Step(name, ["nbdinfo", "--list", own.uri()])
    if kind == "libnbd":
        script = ("names = []\nh.opt_list(lambda n, d: names.append(n))\nh.add_meta_context('base:allocation')\n"
                  "ctx = []\nh.opt_list_meta_context(lambda n: ctx.append(n))\nh.opt_abort()\n"
                  "print('exports:', *names, 'contexts:', *ctx)")
        connect = f"h.set_opt_mode(True); h.connect_uri({own.uri()!r})"
        return Step(name, ["nbdsh", "-c", connect, "-c", script])

    def call() -> str:
        from nbdref.client import Client
        with Client(timeout=15) as c:
            c.set_opt_mode(True)
            c.connect_uri(own.uri())
            names = [n for n, _ in c.opt_list()]
            ctx = c.opt_list_meta_context(["base:allocation"]) if contexts else []
            c.opt_abort()
        return "exports: " + " ".join(names) + " contexts: " + " ".join(ctx)
    return Step(name, call=call)


def map_step(kind: str, name: str, uri: str) -> Step:
    """Map base:allocation if the server lets the client (qemu-img map, nbdinfo --map, block_status)."""
    if kind == "qemu":
        return Step(name, ["qemu-img", "map", "--output=json", "-f", "raw", uri])
    if kind == "libnbd":
        return Step(name, ["nbdinfo", "--map", uri])

    def call() -> str:
        from nbdref.client import Client
        rows: list[dict[str, int]] = []
        with Client(timeout=15) as c:
            c.add_meta_context("base:allocation")
            c.connect_uri(uri)
            if c.can_meta_context("base:allocation"):
                size, off = c.get_size(), 0
                while off < size:
                    before = len(rows)

                    def cb(_ctx: str, start: int, entries: list[int], _err: int) -> None:
                        pos = start
                        for n, f in zip(entries[0::2], entries[1::2], strict=True):
                            rows.append({"start": pos, "length": n, "flags": f})
                            pos += n
                    c.block_status(size - off, off, cb)
                    if len(rows) == before:
                        break
                    off = rows[-1]["start"] + rows[-1]["length"]
            c.shutdown()
        return "NBDREF " + json.dumps(rows)
    return Step(name, call=call)


def parse_map(kind: str, out: str) -> list[tuple[int, bool, bool]] | None:
    """(length, hole, zero) per extent as the client reported them; None when it printed no map."""
    try:
        if kind == "qemu":
            return [(e["length"], not e["data"], bool(e["zero"])) for e in json.loads(out)]
        if kind == "libnbd":
            # nbdinfo --map: "OFFSET LENGTH TYPE [DESCRIPTION]"; TYPE is the raw status (a diagnostic tool
            # prints what it got; an unknown bit leaves the description out): judged on the known bits.
            rows = [line.split(None, 3) for line in out.splitlines() if line.strip()]
            return [(int(r[1]), bool(int(r[2]) & 1), bool(int(r[2]) & 2)) for r in rows
                    if len(r) >= 3 and r[0].isdigit()]
        line = next(x for x in out.splitlines() if x.startswith("NBDREF "))
        return [(r["length"], bool(r["flags"] & 1), bool(r["flags"] & 2)) for r in json.loads(line[7:])]
    except (ValueError, KeyError, StopIteration, IndexError):
        return None


# NBD_OPT_LIST "MUST NOT" carry data (OPT-017), NBD_OPT_ABORT "SHOULD NOT" (OPT-012); a client that stops
# negotiating "MUST do so with a soft disconnect" (DISC-009, DISC-007: no bare close during haggling);
# every implementation supports LIST and ABORT (INTEROP-007, INTEROP-008).  A server without the ACK to
# ABORT (persona nbd-server-3.24 closes at once): "the client SHOULD cope" (OPT-014).  LIST_META_CONTEXT
# queries (libnbd, nbdref; qemu-nbd --list sends none) start with a namespace and a colon (BS-027), a
# well-formed namespace (BS-007) in a string that obeys the string rules (BS-008); ABORT ends haggling
# without a hard disconnect (DISC-006).
@pytest.mark.req("OPT-012", "OPT-017", "DISC-007", "DISC-009", "INTEROP-007", "INTEROP-008", "OPT-014", "BS-027",
                 "BS-007", "BS-008", "DISC-006")
@pytest.mark.feature("NBD_OPT_LIST")
def test_list_then_abort(request: Any, client_peer: Any, kind: str, peer_workdir: Any, verdict: Any,
                         evidence: Any) -> None:
    """The client lists the exports and ends with NBD_OPT_ABORT; without the server's ACK it is fine."""
    runner = runner_for(request, kind)
    with own_server(peer_workdir, "list") as own, \
            own_server(peer_workdir, "list-noack", persona="nbd-server-3.24") as noack:
        watch_all(verdict, evidence, [own, noack])
        results = run_steps(runner, [list_step(kind, "list", own, contexts=True), list_step(kind, "noack", noack)])
        records, noack_records = own.records(), noack.records()
    res = results["list"]
    verdict.expect(res.ok and "exp" in res.out, "INTEROP-008", expected="the listing names export 'exp'",
                   observed=f"exit {res.rc}: {res.out[-200:]!r}")
    for r in records + noack_records:
        opts = options_sent(r)
        if Opt.LIST not in opts:
            continue
        verdict.expect(opts[-1] == Opt.ABORT or bool(r.requests), "DISC-009", "DISC-007", "INTEROP-007",
                       expected="after the listing: NBD_OPT_ABORT (or on into transmission and NBD_CMD_DISC)",
                       observed=describe([r]))
    res = results["noack"]
    verdict.expect(res.ok, "OPT-014", expected="no NBD_REP_ACK to NBD_OPT_ABORT, the server just closes: the "
                   "client reports no failure", observed=f"exit {res.rc}: {res.out[-200:]!r}; {describe(noack_records)}")


# "On receiving NBD_REP_ERR_SHUTDOWN the client MUST initiate a soft disconnect" (DISC-014, checked by the
# core on the next option): fault option-err-shutdown answers the client's first option so.
@pytest.mark.req("DISC-014")
@pytest.mark.feature("newstyle")
def test_err_shutdown_means_abort(request: Any, client_peer: Any, kind: str, peer_workdir: Any, verdict: Any,
                                  evidence: Any) -> None:
    """NBD_REP_ERR_SHUTDOWN to the first option: the client sends NBD_OPT_ABORT and nothing else."""
    res, records = read_once(request, kind, peer_workdir, verdict, evidence, "errshut", OFFSET, LENGTH, fault="option-err-shutdown")
    for r in records:
        opts = options_sent(r)
        if not opts or opts[0] in (Opt.STARTTLS, Opt.EXPORT_NAME):
            continue
        verdict.expect(opts[1:] == [Opt.ABORT], "DISC-014", expected="NBD_OPT_ABORT right after NBD_REP_ERR_SHUTDOWN",
                       observed=describe([r]))
    verdict.info(f"exit {res.rc}: {res.out[-200:]!r}; {describe(records)}")


# "Clients SHOULD ignore unknown [transmission] flags" (CMD-013): NBD_INFO_EXPORT carries bit 15.
@pytest.mark.req("CMD-013")
@pytest.mark.feature("newstyle")
def test_unknown_transmission_flag_ignored(request: Any, client_peer: Any, kind: str, peer_workdir: Any,
                                           verdict: Any, evidence: Any) -> None:
    """An undefined transmission flag bit: the client reads as usual."""
    res, records = read_once(request, kind, peer_workdir, verdict, evidence, "txflag", OFFSET, LENGTH, fault="unknown-transmission-flag")
    got = parse_read(kind, res.out) if res.ok else None
    verdict.expect(got == pattern(OFFSET, LENGTH), "CMD-013", expected="transmission flag bit 15 ignored, the read "
                   "works", observed=f"exit {res.rc}: {res.out[-200:]!r}; {describe(records)}")


SIMPLE_ONLY = with_changes(persona("qemu-2.8"), name="simple-only")
NO_BASE_ALLOCATION = with_changes(persona("nbdref"), name="no-base-allocation", meta_contexts=(DIRTY_BITMAP,))


# A server without structured replies (qemu 2.8): "Clients SHOULD handle NBD_REP_ERR_UNSUP to
# NBD_OPT_STRUCTURED_REPLY and carry on with simple replies" (SR-018, INTEROP-009), fall back to compact
# headers (EXT-039), and "MUST NOT use extensions needing reply payloads" — no BLOCK_STATUS, no DF (SR-020,
# EXT-018, EXT-036); no meta-context option before structured replies (BS-025/043, EXT-019/025).  A server
# whose SET_META_CONTEXT selects nothing (no base:allocation): no BLOCK_STATUS either (BS-003, BS-045,
# BS-066).  The client reads and maps each.
@pytest.mark.req("SR-018", "INTEROP-009", "EXT-039", "SR-020", "EXT-018", "EXT-036", "BS-003", "BS-045", "BS-066",
                 "EXT-001", "SR-015", "BS-043", "BS-046")
@pytest.mark.feature("NBD_OPT_STRUCTURED_REPLY")
def test_no_reply_payload_extensions(request: Any, client_peer: Any, kind: str, peer_workdir: Any, verdict: Any,
                                     evidence: Any) -> None:
    """Without structured replies or without a context: simple replies read right, no BLOCK_STATUS."""
    runner = runner_for(request, kind)
    with own_server(peer_workdir, "simple", persona=SIMPLE_ONLY) as simple, \
            own_server(peer_workdir, "nobase", persona=NO_BASE_ALLOCATION) as nobase:
        watch_all(verdict, evidence, [simple, nobase])
        results = run_steps(runner, [read_step(kind, "read", simple.uri(), OFFSET, LENGTH),
                                     map_step(kind, "map-simple", simple.uri()),
                                     map_step(kind, "map-nobase", nobase.uri())])
        simple_records, nobase_records = simple.records(), nobase.records()
    res = results["read"]
    got = parse_read(kind, res.out) if res.ok else None
    verdict.expect(got == pattern(OFFSET, LENGTH), "SR-018", "INTEROP-009", "EXT-039",
                   expected="STRUCTURED_REPLY/EXTENDED_HEADERS refused: the read works with simple replies",
                   observed=f"exit {res.rc}: {res.out[-200:]!r}; {describe(simple_records)}")
    for records, ids in ((simple_records, ("SR-020", "EXT-018", "EXT-036", "BS-003")),
                         (nobase_records, ("BS-003", "BS-045", "BS-066"))):
        bs = [r.id for r in records for q in requests_sent(r) if q.command == Cmd.BLOCK_STATUS]
        verdict.expect(not bs, *ids, expected="no NBD_CMD_BLOCK_STATUS without a selected context",
                       observed=f"BLOCK_STATUS on connection(s) {bs}" if bs else describe(records))
    df = [r.id for r in simple_records for q in requests_sent(r) if q.flags & 0x04]
    verdict.expect(not df, "SR-020", expected="no NBD_CMD_FLAG_DF without structured replies",
                   observed=f"DF on connection(s) {df}" if df else "none")
    for name in ("map-simple", "map-nobase"):
        verdict.info(f"{name}: exit {results[name].rc}: {results[name].out[-150:]!r}")
    sent = [type(e).__name__ for r in simple_records for e in client_events(r)][:1]
    assert sent, "the client never reached the server without structured replies"


# "The client MUST ignore information replies it does not understand" (GO-011, GO-030: NBD_REP_INFO type
# 0x1234 before the others) and "MUST NOT rely on any ordering of NBD_REP_INFO replies" (GO-029:
# NBD_INFO_EXPORT last).  Both are legal server behaviour: the client reads the right bytes from each.
@pytest.mark.req("GO-011", "GO-030", "GO-029")
@pytest.mark.feature("NBD_OPT_GO")
def test_info_replies_unknown_and_reordered(request: Any, client_peer: Any, kind: str, peer_workdir: Any,
                                            verdict: Any, evidence: Any) -> None:
    """An undefined information type, and the information replies reversed: reads still right."""
    runner = runner_for(request, kind)
    with own_server(peer_workdir, "info-unknown", fault="unknown-info-reply") as unknown, \
            own_server(peer_workdir, "info-reversed", fault="reversed-info-replies") as reversed_:
        watch_all(verdict, evidence, [unknown, reversed_])
        results = run_steps(runner, [read_step(kind, "unknown", unknown.uri(), OFFSET, LENGTH),
                                     read_step(kind, "reversed", reversed_.uri(), OFFSET, LENGTH)])
        recorded = {"unknown": unknown.records(), "reversed": reversed_.records()}
    for name, ids in (("unknown", ("GO-011", "GO-030")), ("reversed", ("GO-029",))):
        res = results[name]
        got = parse_read(kind, res.out) if res.ok else None
        verdict.expect(got == pattern(OFFSET, LENGTH), *ids, expected=f"{name} information replies: the read works",
                       observed=f"exit {res.rc}: {res.out[-200:]!r}; {describe(recorded[name])}")


NBDSH_LIST_THEN_MAP = """
h.add_meta_context("base:allocation")
listed = []
h.opt_list_meta_context(lambda name: listed.append(name))
h.opt_go()
seen = []
h.block_status(65536, 0, lambda ctx, off, entries, err: seen.append((ctx, list(entries))))
print("LISTED", listed, "SEEN", seen)
h.shutdown()
"""


def _list_then_map(kind: str, uri: str) -> Step | None:
    """NBD_OPT_LIST_META_CONTEXT, then SET, GO and BLOCK_STATUS on one connection (libnbd, nbdref)."""
    if kind == "libnbd":
        return Step("list-map", ["nbdsh", "-c", f"h.set_opt_mode(True); h.connect_uri({uri!r})",
                                 "-c", NBDSH_LIST_THEN_MAP])
    if kind == "nbdref":
        def call() -> str:
            from nbdref.client import Client
            seen: list[Any] = []
            with Client(timeout=15) as c:
                c.set_opt_mode(True)
                c.add_meta_context("base:allocation")
                c.connect_uri(uri)
                listed = c.opt_list_meta_context(["base:allocation"])
                c.opt_go()
                c.block_status(65536, 0, lambda ctx, off, entries, err: seen.append((ctx, list(entries))))
                c.shutdown()
            return f"LISTED {listed} SEEN {seen}"
        return Step("list-map", call=call)
    return None


# base:allocation: "clients MUST ignore unknown flags" (BS-024: bit 5 set in every status); "Clients SHOULD
# cope with consecutive descriptors that have the same status" (BS-076: every extent split in two); context
# IDs are "transient" per connection (BS-052: two connections, other IDs) and those of LIST replies are to
# be disregarded (BS-042: nonzero there, then SET gives others).  The export is all data: every map must say
# so and cover it.  The core holds each SET_META_CONTEXT query the client sends to "namespace, colon,
# leaf-name" (BS-007) and the string rules (BS-008).
@pytest.mark.req("BS-024", "BS-076", "BS-052", "BS-042", "BS-007", "BS-008")
@pytest.mark.feature("NBD_CMD_BLOCK_STATUS")
def test_block_status_reshaped(request: Any, client_peer: Any, kind: str, peer_workdir: Any, verdict: Any,
                               evidence: Any) -> None:
    """Unknown status bits, split extents, shifted context IDs: the map is still 'all data'."""
    runner = runner_for(request, kind)
    with own_server(peer_workdir, "bs-bits", fault="unknown-status-bits") as bits, \
            own_server(peer_workdir, "bs-split", fault="split-extents") as split, \
            own_server(peer_workdir, "bs-ids", fault="shifted-context-ids") as ids:
        watch_all(verdict, evidence, [bits, split, ids])
        steps = [map_step(kind, "bits", bits.uri()), map_step(kind, "split", split.uri()),
                 map_step(kind, "ids-1", ids.uri()), map_step(kind, "ids-2", ids.uri())]
        extra = _list_then_map(kind, ids.uri())
        results = run_steps(runner, steps + ([extra] if extra else []))
        records = ids.records()
    size = bits.size
    for name, rid in (("bits", "BS-024"), ("split", "BS-076"), ("ids-1", "BS-052"), ("ids-2", "BS-052")):
        res = results[name]
        rows = parse_map(kind, res.out) if res.ok else None
        good = rows is not None and sum(n for n, _, _ in rows) == size and not any(h or z for _, h, z in rows)
        verdict.expect(good, rid, expected=f"{name}: the map covers the export, all data (no hole, no zero)",
                       observed=f"exit {res.rc}: {res.out[-200:]!r}")
    ids_seen = sorted({e.context_id for r in records for e in (x.event for x in r.transcript or [])
                       if type(e).__name__ == "RepMetaContext" and e.option == 10})
    verdict.info(f"context ids the server gave per connection: {ids_seen}")
    if extra:
        res = results["list-map"]
        verdict.expect(res.ok and "base:allocation" in res.out.split("SEEN", 1)[-1], "BS-042",
                       expected="after LIST (nonzero ids) and SET (other ids), BLOCK_STATUS is read under the SET id",
                       observed=f"exit {res.rc}: {res.out[-300:]!r}")
