"""`python -m reports merge A.json B.json ... --out results.json`: the results files of shards
(`--shard K/N`, fixtures/shards.py) or of separate runs as one results file, so the reports built from
it are the same as one run's.

Records are kept whole (nothing a later builder reads is lost); evidence paths, relative to each input's
directory, are made relative to the output's.  The inputs must come from the same harness version and
the same matrix file (digest), and no test (nodeid) may appear twice: overlapping shards would count a
result twice, which is a mistake to report, not to paper over.  The header spans the runs: the earliest
start, the duration to the latest end.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from reports.index import RESULTS_SCHEMA, ReportError, load_run


def _rebase(evidence: list[str], src: Path, dst: Path) -> list[str]:
    if src == dst:
        return list(evidence)
    return [Path(os.path.relpath(src / e, dst)).as_posix() if "/" in e else e for e in evidence]


def merge_files(paths: list[str | Path], out: str | Path) -> dict[str, Any]:
    """The merged results document for writing to `out` (nothing written here)."""
    if not paths:
        raise ReportError("merge: no results file given")
    dst = Path(out).resolve().parent
    headers, records, shared = [], [], []
    seen: dict[str, Path] = {}
    for p in map(Path, paths):
        load_run(p)                                       # validates, with its one-line errors
        data = json.loads(p.read_text(encoding="utf-8"))
        headers.append((p, data["harness"]))
        shared += data.get("shared_servers_started", [])
        for record in data["results"]:
            if record["nodeid"] in seen:
                raise ReportError(f"{p}: {record['nodeid']} is also in {seen[record['nodeid']]}: the shards "
                                  "overlap (same --shard twice?)")
            seen[record["nodeid"]] = p
            records.append({**record, "evidence": _rebase(record.get("evidence", []), p.resolve().parent, dst)})
    first_path, first = headers[0]
    for p, h in headers[1:]:
        for key in ("version", "matrix_sha256"):
            if h.get(key) != first.get(key):
                raise ReportError(f"{p}: harness {key} {h.get(key)!r} differs from {first_path}'s "
                                  f"{first.get(key)!r}: not shards of one run")
    start = min(h["started"] for _, h in headers)
    end = max(h["started"] + h["duration"] for _, h in headers)
    counts: dict[str, int] = {}
    for r in records:
        counts[r["verdict"]] = counts.get(r["verdict"], 0) + 1
    harness = {**first, "started": start, "duration": round(end - start, 3)}
    return {"schema": RESULTS_SCHEMA, "harness": harness, "merged_from": [str(p) for p, _ in headers],
            "shared_servers_started": shared, "counts": dict(sorted(counts.items())), "results": records}


def write_merged(paths: list[str | Path], out: str | Path) -> Path:
    """Merge and write `out` atomically; returns its path."""
    doc = merge_files(paths, out)
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1))
    tmp.replace(path)
    return path


__all__ = ["merge_files", "write_merged"]
