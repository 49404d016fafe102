"""The coverage listing: which requirement ids the suites trace, which they really observed, on whom.

The target is what the issues ask the suites to cover: every id of the catalogue whose `testable` starts
with "black-box" and whose level is MUST, MUST NOT, SHOULD or SHOULD NOT, on the side it binds (a "both"
rule counts on each side).  Per side and id the listing says:

- `traced`: a test of that side names the id on its req marker (`tests`);
- `observed_against`: the peers on which a test really saw it — the reference core checked it on the
  peer's messages, or the test judged it (Result.observed_requirements) — and which of them are third
  party (not nbdref, personas included in nbdref);
- `listed`: not traced, but in suites/untestable.yaml with the reason no black-box test can see it;
- `claimed_not_observed`: cases whose marker names the id, that passed, and did not observe it — a marker
  that claims more than the test saw.

Built from a results file (fixtures/judging.py writes it); `python -m reports coverage` prints it and
`python -m reports build` writes reports/out/coverage.json.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from fixtures.verdicts import Result, Verdict

COVERAGE_SCHEMA = "nbd-harness/coverage/1"
TARGET_LEVELS = frozenset({"MUST", "MUST NOT", "SHOULD", "SHOULD NOT"})
SIDES = ("server", "client")
UNTESTABLE = Path(__file__).resolve().parents[1] / "suites" / "untestable.yaml"
REFERENCE_IMPLEMENTATION = "nbdref"


class CoverageError(ValueError):
    """suites/untestable.yaml is malformed; str() names the file and the entry."""


def target_ids() -> dict[str, list[str]]:
    """side -> the catalogue ids the suites of that side must trace or list, in catalogue order."""
    from nbdref import requirements as catalogue
    out: dict[str, list[str]] = {side: [] for side in SIDES}
    for r in catalogue.catalogue().values():
        if r.level not in TARGET_LEVELS or not str(r.testable).startswith("black-box"):
            continue
        for side in SIDES:
            if r.binds in (side, "both"):
                out[side].append(r.id)
    return out


def load_untestable(path: str | Path = UNTESTABLE) -> dict[str, dict[str, str]]:
    """side -> {id: reason} from suites/untestable.yaml; CoverageError for an unknown id, a side the
    rule does not bind, an id outside the target, or an empty reason."""
    from nbdref import requirements as catalogue
    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as e:
        raise CoverageError(f"{p}: cannot read: {e}") from None
    if not isinstance(data, dict) or set(data) - set(SIDES):
        raise CoverageError(f"{p}: top level must be a mapping with keys {', '.join(SIDES)}")
    targets = {side: set(ids) for side, ids in target_ids().items()}
    out: dict[str, dict[str, str]] = {}
    for side in SIDES:
        entries = data.get(side) or {}
        if not isinstance(entries, dict):
            raise CoverageError(f"{p}: {side}: must map requirement ids to reasons")
        for rid, reason in entries.items():
            where = f"{p}: {side}: {rid}"
            try:
                catalogue.get(str(rid))
            except KeyError:
                raise CoverageError(f"{where}: no such requirement id") from None
            if rid not in targets[side]:
                raise CoverageError(f"{where}: not a black-box MUST/SHOULD rule binding the {side}; "
                                    f"only those need a reason to be left out")
            if not isinstance(reason, str) or not reason.strip():
                raise CoverageError(f"{where}: the reason is empty")
        out[side] = {str(k): " ".join(str(v).split()) for k, v in entries.items()}
    return out


def _sides_of(result: Result) -> tuple[str, ...]:
    if result.subject == "pair":
        return SIDES
    return (result.subject,) if result.subject in SIDES else ()


def _peer_of(result: Result, side: str) -> Any:
    return result.server if side == "server" else result.client


def coverage(results: Iterable[Result], untestable: dict[str, dict[str, str]] | None = None) -> dict[str, Any]:
    """The listing (see the module docstring) for a run's results."""
    from nbdref import requirements as catalogue
    untestable = load_untestable() if untestable is None else untestable
    results = list(results)
    targets = target_ids()
    sides: dict[str, Any] = {}
    for side in SIDES:
        wanted = set(targets[side])
        tests: dict[str, set[str]] = {}
        seen: dict[str, dict[str, bool]] = {}           # id -> peer id -> third party
        claimed: dict[str, set[str]] = {}
        for r in results:
            if side not in _sides_of(r):
                continue
            peer = _peer_of(r, side)
            # What was seen of this side's peer; a pair's record keeps its two sides apart.
            observed = (set(r.observed_by_peer.get(peer.id, ())) if r.observed_by_peer and peer is not None
                        else set(r.observed_requirements))
            for rid in set(r.requirements) & wanted:
                tests.setdefault(rid, set()).add(r.case)
                if r.verdict == Verdict.PASS and rid not in observed:
                    claimed.setdefault(rid, set()).add(r.case)
            if peer is not None:
                for rid in observed & wanted:
                    seen.setdefault(rid, {})[peer.id] = peer.implementation != REFERENCE_IMPLEMENTATION
        listed = untestable.get(side, {})
        entries: dict[str, Any] = {}
        for rid in targets[side]:
            r = catalogue.get(rid)
            peers = seen.get(rid, {})
            status = "traced" if rid in tests else "listed" if rid in listed else "untraced"
            entries[rid] = {
                "level": r.level, "binds": r.binds, "text": " ".join(str(r.text).split()), "status": status,
                "tests": sorted(tests.get(rid, ())),
                "observed_against": sorted(peers),
                "third_party": sorted(p for p, third in peers.items() if third),
                "reason": listed.get(rid),
                "claimed_not_observed": sorted(claimed.get(rid, ())),
            }
        values = entries.values()
        sides[side] = {
            "target": len(entries),
            "traced": sum(e["status"] == "traced" for e in values),
            "listed": sum(e["status"] == "listed" for e in values),
            "untraced": [rid for rid, e in entries.items() if e["status"] == "untraced"],
            "observed": sum(bool(e["observed_against"]) for e in values),
            "observed_third_party": sum(bool(e["third_party"]) for e in values),
            "listed_and_traced": sorted(rid for rid in listed if rid in tests),
            "requirements": entries,
        }
    return {"schema": COVERAGE_SCHEMA, "sides": sides}


def summary_lines(listing: dict[str, Any]) -> list[str]:
    """One line per side, for the terminal."""
    lines = []
    for side, s in listing["sides"].items():
        lines.append(f"{side}-bound ids: {s['target']}: {s['traced']} traced by tests, {s['listed']} listed "
                     f"untestable, {len(s['untraced'])} untraced; observed on the wire {s['observed']} "
                     f"({s['observed_third_party']} against a third-party {side})")
    return lines


def listing_lines(listing: dict[str, Any], side: str | None = None, *, verbose: bool = False) -> list[str]:
    """The listing as text: per id its status, tests and peers (all of them with `verbose`)."""
    out: list[str] = []
    for name, s in listing["sides"].items():
        if side and name != side:
            continue
        out.append(f"== {name}-bound: {s['target']} ids")
        for rid, e in s["requirements"].items():
            peers = e["observed_against"]
            third = e["third_party"]
            if e["status"] == "listed":
                detail = f"untestable: {e['reason']}"
            elif e["status"] == "untraced":
                detail = "no test"
            else:
                names = e["tests"] if verbose else e["tests"][:2] + (["..."] if len(e["tests"]) > 2 else [])
                detail = (f"{len(e['tests'])} test(s) {', '.join(names)}; observed on {len(peers)} peer(s), "
                          f"{len(third)} third-party" + (f": {', '.join(third)}" if verbose and third else ""))
            if e["claimed_not_observed"]:
                detail += f"; marker claims it but did not see it: {', '.join(e['claimed_not_observed'])}"
            out.append(f"{rid:9} {e['level']:10} {e['status']:8} {detail}")
        out.extend(summary_lines({"sides": {name: s}}))
    return out
