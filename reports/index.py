"""index.json and requirements.json: the run's results file (fixtures/judging.py) reshaped for readers.

results.json is the harness's own record: complete, in the order the workers finished, with everything a
test established.  The reports read a smaller, stable, versioned shape instead, so an HTML page, a CI
gate or a `jq` one-liner does not depend on the harness's internals, and two runs diff line by line
(results sorted, every verdict counted even when zero).  Schemas: reports/schema/*.schema.json; the
shape is described in reports/README.md.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from fixtures.verdicts import PeerRef, Result, Verdict, gravest

INDEX_SCHEMA = "nbd-harness/index/1"
REQUIREMENTS_SCHEMA = "nbd-harness/requirements/1"
RESULTS_SCHEMA = 1                     # the results file version these builders read
NO_SECTION = "(none)"                  # by_section key of results whose module has no SECTION
SCHEMA_DIR = Path(__file__).with_name("schema")
# What the header must hold for index.json to be valid (matrix_sha256 is null when the matrix was absent).
HARNESS_FIELDS: dict[str, tuple[type, ...]] = {
    "version": (str,), "matrix": (str,), "matrix_sha256": (str, type(None)), "started": (int, float),
    "duration": (int, float)}


class ReportError(ValueError):
    """An input the reports cannot be built from; str() is one line naming the file."""


# --------------------------------------------------------------------------------------------------
# Reading the run


def load_run(results_path: str | Path) -> tuple[dict[str, Any], list[Result]]:
    """The results file's header (`harness`) and records; ReportError for anything unreadable, so the CLI
    can say in one line which file and which record is wrong instead of showing a traceback."""
    path = Path(results_path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ReportError(f"{path}: cannot read the results file: {getattr(e, 'strerror', None) or e}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ReportError(f"{path}:{e.lineno}: not JSON: {e.msg}") from None
    if not isinstance(data, dict):
        raise ReportError(f"{path}: not a results file (a JSON object with 'schema', 'harness', 'results')")
    if data.get("schema") != RESULTS_SCHEMA:
        raise ReportError(f"{path}: results schema {data.get('schema')!r}, this builder reads {RESULTS_SCHEMA}")
    harness, records = data.get("harness"), data.get("results")
    if not isinstance(harness, dict) or not isinstance(records, list):
        raise ReportError(f"{path}: 'harness' must be an object and 'results' a list")
    for key, kind in HARNESS_FIELDS.items():
        if not isinstance(harness.get(key), kind):
            raise ReportError(f"{path}: harness.{key} is missing or not a {kind[0].__name__}")
    results = []
    for i, record in enumerate(records):
        try:
            results.append(Result.from_json(record))
        except (KeyError, TypeError, ValueError) as e:
            raise ReportError(f"{path}: results[{i}]: malformed record ({type(e).__name__}: {e})") from None
    return harness, results


def rebase_evidence(results: list[Result], results_dir: str | Path, out_dir: str | Path) -> None:
    """Evidence paths are relative to the results file's directory (fixtures/evidence.py); the documents
    written into `out_dir` name them relative to it.  Bare names (no file was written) stay as they are."""
    src, dst = Path(results_dir).resolve(), Path(out_dir).resolve()
    if src == dst:
        return
    for r in results:
        r.evidence = [Path(os.path.relpath(src / e, dst)).as_posix() if "/" in e else e for e in r.evidence]


def _harness(header: dict[str, Any]) -> dict[str, Any]:
    return {"version": header["version"], "matrix": header["matrix"], "matrix_sha256": header.get("matrix_sha256"),
            "started": header["started"],
            "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(header["started"])),
            "duration": header["duration"]}


# --------------------------------------------------------------------------------------------------
# Pieces


def verdict_counts(verdicts: Iterable[Verdict]) -> dict[str, int]:
    """Every verdict with its count, zeros included: a key that exists in every run diffs cleanly."""
    out = {str(v): 0 for v in Verdict}
    for v in verdicts:
        out[str(v)] += 1
    return out


def named_requirements(result: Result) -> list[str]:
    """The ids a result names: its test's req marker first, then those its judgements name (a core
    violation of a rule the test did not declare is still about that rule)."""
    ids = list(result.requirements)
    for j in result.judgements:
        ids.extend(j.requirements)
    return list(dict.fromkeys(ids))


def _sort_key(r: Result) -> tuple[str, str, str, str]:
    return (r.case, r.server.id if r.server else "", r.client.id if r.client else "", r.nodeid)


def _peers(results: list[Result], matrix: Any | None) -> list[dict[str, Any]]:
    """One entry per peer id any result names.  `runs` comes from whichever record saw the peer running
    (a test skipped before its peer started has none); workers that disagree are all listed."""
    refs: dict[str, list[PeerRef]] = {}
    for r in results:
        for ref in (r.client, r.server):
            if ref is not None:
                refs.setdefault(ref.id, []).append(ref)
    out = []
    for pid in sorted(refs):
        first = refs[pid][0]
        ran = sorted({ref.runs for ref in refs[pid] if ref.runs})
        out.append({"id": pid, "implementation": first.implementation, "role": first.role,
                    "launcher": first.launcher, "version": first.version,
                    "runs": ", ".join(ran) if ran else None,
                    "matrix": _matrix_entry(matrix, pid) if matrix is not None else None})
    return out


def _matrix_entry(matrix: Any, peer_id: str) -> dict[str, Any] | None:
    """What the matrix says about how the peer is started, without starting anything (no Docker)."""
    from fixtures.matrix import client_tools
    from fixtures.peers import SERVER_ADAPTERS
    try:
        spec = matrix.get(peer_id)
    except KeyError:
        return None
    if spec.command:
        binary: str | None = spec.command[0]
    elif spec.launcher == "in-process":
        binary = None
    elif spec.role == "server":
        adapter = SERVER_ADAPTERS.get(spec.implementation)
        binary = adapter.binary if adapter else None
    else:
        binary = next(iter(client_tools(spec)), None)
    return {"line": spec.source_line, "suite": spec.suite, "image": spec.image, "persona": spec.persona,
            "binary": binary or None, "command": list(spec.command) if spec.command else None,
            "tls": list(spec.tls), "options": dict(spec.options)}


def _load_matrix(matrix_path: str | Path, run_sha256: str | None) -> tuple[Any, dict[str, Any]]:
    from fixtures.matrix import MatrixError, load_matrix
    try:
        matrix = load_matrix(matrix_path)
    except MatrixError as e:
        more = f" (and {len(e.problems) - 1} more)" if len(e.problems) > 1 else ""
        raise ReportError(f"{e.problems[0]}{more}") from None
    digest = hashlib.sha256(Path(matrix_path).read_bytes()).hexdigest()
    return matrix, {"path": str(matrix_path), "sha256": digest, "same_as_run": digest == run_sha256}


def _result(r: Result) -> dict[str, Any]:
    return {"case": r.case, "nodeid": r.nodeid, "title": r.title, "section": r.section, "feature": r.feature,
            "requirements": named_requirements(r), "subject": r.subject,
            "client": r.client.id if r.client else None, "server": r.server.id if r.server else None,
            "verdict": str(r.verdict), "expected": r.expected, "observed": r.observed,
            "evidence": list(r.evidence), "baseline": r.baseline,
            "observed_requirements": list(r.observed_requirements)}


# --------------------------------------------------------------------------------------------------
# The two documents


def index_from(header: dict[str, Any], results: list[Result], matrix_path: str | Path | None = None
               ) -> dict[str, Any]:
    """index.json from an already loaded run (see build_index)."""
    harness = _harness(header)
    matrix, matrix_info = (_load_matrix(matrix_path, harness["matrix_sha256"]) if matrix_path is not None
                           else (None, None))
    by_section: dict[str, list[Verdict]] = {}
    for r in results:
        by_section.setdefault(r.section or NO_SECTION, []).append(r.verdict)
    return {"schema": INDEX_SCHEMA, "harness": harness, "matrix": matrix_info,
            "counts": verdict_counts(r.verdict for r in results),
            "by_section": {s: verdict_counts(v) for s, v in sorted(by_section.items())},
            "peers": _peers(results, matrix),
            "results": [_result(r) for r in sorted(results, key=_sort_key)]}


def requirements_from(header: dict[str, Any], results: list[Result]) -> dict[str, Any]:
    """requirements.json from an already loaded run (see build_requirements)."""
    from nbdref import requirements as catalogue
    tests: dict[str, set[str]] = {}
    worst: dict[str, dict[str, list[Verdict]]] = {}
    for r in results:
        peer = r.peer
        for rid in named_requirements(r):
            tests.setdefault(rid, set()).add(r.case)
            per_peer = worst.setdefault(rid, {})
            if peer is not None:
                per_peer.setdefault(peer.id, []).append(r.verdict)
    out: dict[str, Any] = {}
    for rid in sorted(tests):
        try:
            entry = catalogue.get(rid)
            level, text, binds = entry.level, entry.text, entry.binds
        except KeyError:                       # an id the catalogue lacks: still listed, visibly unknown
            level = text = binds = None
        out[rid] = {"level": level, "text": text, "binds": binds, "tests": sorted(tests[rid]),
                    "verdicts": {p: str(gravest(v)) for p, v in sorted(worst[rid].items())}}
    return {"schema": REQUIREMENTS_SCHEMA, "harness": _harness(header), "requirements": out}


def build_index(results_path: str | Path, matrix_path: str | Path | None = None) -> dict[str, Any]:
    """index.json's content for a results file; with `matrix_path`, each peer also gets how the matrix
    starts it (suite or image, persona, binary, command)."""
    return index_from(*load_run(results_path), matrix_path)


def build_requirements(results_path: str | Path) -> dict[str, Any]:
    """requirements.json's content: each requirement id any result names, with its catalogue entry, the
    cases that name it and, per peer under test, the gravest verdict (fixtures.verdicts.GRAVITY) of them."""
    return requirements_from(*load_run(results_path))


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    tmp.replace(path)                          # a reader never sees half a file


def write_documents(out_dir: str | Path, index: dict[str, Any], requirements: dict[str, Any]
                    ) -> tuple[Path, Path]:
    """Write both documents into out_dir; returns (index.json, requirements.json)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = (out / "index.json", out / "requirements.json")
    _write_json(paths[0], index)
    _write_json(paths[1], requirements)
    return paths


def write_reports(results_path: str | Path, out_dir: str | Path, matrix_path: str | Path | None = None
                  ) -> tuple[Path, Path]:
    """Build out_dir/index.json and out_dir/requirements.json from a results file; returns their paths."""
    header, results = load_run(results_path)
    return write_documents(out_dir, index_from(header, results, matrix_path), requirements_from(header, results))


__all__ = ["INDEX_SCHEMA", "REQUIREMENTS_SCHEMA", "ReportError", "build_index",
           "build_requirements", "write_documents", "write_reports"]
