"""The differential table: one row per case of suites/differential, one answer per server peer.

The differential battery (suites/differential/) asks every server peer the same odd question and
records the answer as a short normalized string (the result's `observed`: "NBD_EINVAL", "NBD_REP_ACK",
"hard disconnect", ...).  This module sets those answers side by side, over index.json's result objects
(reports/index.py), so a reader sees at once where servers disagree and which spec sentence leaves the
room: rows where servers give different answers come first, each citing the requirement texts.

    rows = table(index["results"])
    # [{"case", "title", "section", "requirements", "spec", "answers", "verdicts", "disagree"}, ...]
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

DIFFERENTIAL_SCHEMA = "nbd-harness/differential/1"
NODE_PREFIX = "suites/differential/"
CASE_PREFIX = "differential."
# Verdicts whose `observed` is not the peer's answer: the cell shows the verdict instead.
FAILED = frozenset({"fail", "harness-error", "missing", "known"})
# Verdicts that are no answer at all: shown, but they neither agree nor disagree with anyone.
NO_ANSWER = frozenset({"not-applicable", "harness-error"})


def is_differential(result: dict[str, Any]) -> bool:
    return str(result.get("nodeid", "")).startswith(NODE_PREFIX) or str(result.get("case", "")).startswith(CASE_PREFIX)


def answer_of(result: dict[str, Any]) -> str:
    """The cell: the recorded answer, or the verdict when the case failed (or was excused as known).
    A result's `observed` joins several judgements with "; "; the battery's answer is the first."""
    verdict = str(result.get("verdict", ""))
    if verdict in FAILED or verdict == "not-applicable":
        return verdict
    observed = str(result.get("observed") or "")
    return observed.split("; ", 1)[0] or verdict


def _spec(ids: Iterable[str]) -> dict[str, dict[str, str | None]]:
    from nbdref import requirements as catalogue
    out: dict[str, dict[str, str | None]] = {}
    for rid in ids:
        try:
            entry = catalogue.get(rid)
            out[rid] = {"level": entry.level, "text": entry.text, "section": entry.section}
        except KeyError:                # an id the catalogue lacks: listed, visibly unknown
            out[rid] = {"level": None, "text": None, "section": None}
    return out


def table(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per differential case: `answers` {server id: answer}, `verdicts` {server id: verdict},
    `disagree` (more than one distinct answer among the servers that answered), `requirements` (every id
    the case's results name, marker first) and `spec` (their catalogue texts).  Disagreements first,
    then by case id; servers sorted by id."""
    rows: dict[str, dict[str, Any]] = {}
    for r in results:
        if not is_differential(r) or not r.get("server"):
            continue
        row = rows.setdefault(r["case"], {"case": r["case"], "title": r.get("title") or "",
                                          "section": r.get("section"), "requirements": [],
                                          "answers": {}, "verdicts": {}})
        for rid in r.get("requirements") or ():
            if rid not in row["requirements"]:
                row["requirements"].append(rid)
        row["answers"][r["server"]] = answer_of(r)
        row["verdicts"][r["server"]] = str(r.get("verdict", ""))
    out = []
    for row in rows.values():
        row["answers"] = dict(sorted(row["answers"].items()))
        row["verdicts"] = dict(sorted(row["verdicts"].items()))
        answered = {a for s, a in row["answers"].items() if row["verdicts"][s] not in NO_ANSWER}
        row["disagree"] = len(answered) > 1
        row["spec"] = _spec(row["requirements"])
        out.append(row)
    out.sort(key=lambda row: (not row["disagree"], row["case"]))
    return out


def document(results: list[dict[str, Any]]) -> dict[str, Any]:
    """differential.json: the table with its counts."""
    rows = table(results)
    return {"schema": DIFFERENTIAL_SCHEMA, "cases": len(rows),
            "disagreements": sum(1 for row in rows if row["disagree"]),
            "servers": sorted({s for row in rows for s in row["answers"]}), "rows": rows}


def write(path: str | Path, results: list[dict[str, Any]]) -> Path:
    """Write differential.json (atomically) from index.json's result objects."""
    target = Path(path)
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_text(json.dumps(document(results), indent=1) + "\n")
    tmp.replace(target)
    return target
