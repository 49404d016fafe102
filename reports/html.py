"""The matrix page: index.json (+ requirements.json and the run's judgements) rendered as one HTML page
with a detail page per result, after Autobahn|Testsuite's report.

Self-contained on purpose: CSS inline, no script, no font or image from the network, so the directory
can be uploaded as a CI artifact and opened from disk years later.  Templates are in reports/templates/
(Jinja2, autoescaped).  Every grid is computed here, in plain Python (`page_context`), so the templates
only lay out what this module decided and a test can check the numbers without a browser.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fixtures.verdicts import GRAVITY, Result, Verdict, gravest

TEMPLATES = Path(__file__).with_name("templates")
CASES_DIR = "cases"                          # detail pages, beside index.html
MAX_EVIDENCE_CHARS = 200_000                 # one evidence text embedded in a detail page
INTEROP_PREFIX = "suites/interop/"           # results of real clients against real servers
PERSONA_PREFIX = "nbdref-server["            # reference-server personas (their ids)

# Colour, short mark and meaning of each verdict: the legend, the cells and the detail pages.
STYLE: dict[Verdict, tuple[str, str, str]] = {
    Verdict.PASS: ("#2e7d32", "P", "the peer did what the spec asks"),
    Verdict.FAIL: ("#c62828", "F", "a MUST / MUST NOT broken"),
    Verdict.NON_STRICT: ("#f9a825", "NS", "a SHOULD / SHOULD NOT broken: reported, not failed"),
    Verdict.KNOWN: ("#8e24aa", "K", "a failure listed in the baseline, with its reference"),
    Verdict.FIXED: ("#00897b", "FX", "a baseline entry that now passes"),
    Verdict.UNSUPPORTED_OK: ("#9ccc65", "U", "absent, as the timeline and the configuration expect"),
    Verdict.MISSING: ("#e64a19", "M", "absent, though the timeline and the configuration say present"),
    Verdict.EARLY: ("#1e88e5", "E", "present before the timeline says (a backport)"),
    Verdict.SPEC_TENSION: ("#795548", "T", "the spec contradicts itself here: both texts cited"),
    Verdict.INFO: ("#90a4ae", "I", "an observation the spec allows"),
    Verdict.NOT_APPLICABLE: ("#e0e0e0", "-", "the case cannot apply to this peer"),
    Verdict.HARNESS_ERROR: ("#212121", "H", "the harness's fault, never counted against the peer"),
}


# --------------------------------------------------------------------------------------------------
# What the page shows


@dataclass
class Cell:
    """One box of a grid: the gravest verdict of what fell into it, the counts, and where to click."""

    verdicts: list[Verdict] = field(default_factory=list)
    href: str | None = None
    title: str = ""

    @property
    def verdict(self) -> Verdict:
        return gravest(self.verdicts)

    @property
    def counts(self) -> list[tuple[str, int]]:
        """(verdict, count) in order of gravity, only those present."""
        return [(str(v), self.verdicts.count(v)) for v in GRAVITY if v in self.verdicts]


def page_slug(case: str) -> str:
    """A case's detail page name (path-safe): one page per case, a section per result on it (a few
    hundred files for a full run rather than thousands: writing files is what the build spends)."""
    from fixtures.sharing import slug
    return f"{slug(case, keep=60, digits=10)}.html"


def anchor(nodeid: str) -> str:
    """A result's section id on its case's page."""
    from fixtures.sharing import slug
    return "r-" + slug(nodeid, keep=0, digits=12).lstrip("-")


def detail_href(row: dict[str, Any]) -> str:
    """Where a result's detail is, relative to index.html."""
    return f"{CASES_DIR}/{page_slug(row['case'])}#{anchor(row['nodeid'])}"


def _under_test(r: dict[str, Any]) -> str:
    """The column a result belongs to in the case matrix: the peer under test; for a pair (both under
    test) the server, its client going to the row (clients x servers would be hundreds of columns)."""
    if r["subject"] == "client":
        return r["client"] or "-"
    return r["server"] or "-"


def _row(r: dict[str, Any]) -> str:
    return f"{r['case']} ({r['client']})" if r["subject"] == "pair" else r["case"]


def _counts(verdicts: Iterable[str]) -> dict[str, int]:
    out = {str(v): 0 for v in Verdict}
    for v in verdicts:
        out[v] += 1
    return out


def matrix_sections(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The case x (client, server) matrix, one block per proto.md section: columns are the peers under
    test that section's results name, rows its cases (a pair's case once per client), counts per
    section."""
    by_section: dict[str, list[dict[str, Any]]] = {}
    for r in results:
        by_section.setdefault(r["section"] or "(none)", []).append(r)
    out = []
    for section in sorted(by_section):
        rows = by_section[section]
        columns = sorted({_under_test(r) for r in rows})
        cases: dict[str, dict[str, Any]] = {}
        for r in rows:
            case = cases.setdefault(_row(r), {"case": _row(r), "title": r["title"], "cells": {}})
            cell = case["cells"].setdefault(_under_test(r), Cell())
            cell.verdicts.append(Verdict(r["verdict"]))
            cell.href = detail_href(r)
            cell.title = f"{_row(r)} on {_under_test(r)}: {r['verdict']}"
        counts = _counts(r["verdict"] for r in rows)
        out.append({"section": section, "columns": columns, "cases": [cases[c] for c in sorted(cases)],
                    "counts": counts, "total": len(rows)})
    return out


def timeline_grid(results: list[Result]) -> dict[str, Any]:
    """Feature x peer: what the timeline expects of the peer's version against what was seen, from the
    judgements that name a feature (Judge.timeline).  `early` and `missing` stand out by their colour."""
    cells: dict[tuple[str, str], Cell] = {}
    detail: dict[tuple[str, str], set[str]] = {}
    for r in results:
        for j in r.judgements:
            if not j.feature or j.verdict == Verdict.NOT_APPLICABLE:
                continue
            peer = j.peer or (r.peer.id if r.peer else "-")
            cell = cells.setdefault((j.feature, peer), Cell())
            cell.verdicts.append(j.verdict)
            expected = (j.expected.split(":", 1)[0] or "?").strip()
            seen = (j.observed.split(" ", 1)[0] or "?").strip()
            detail.setdefault((j.feature, peer), set()).add(f"expected {expected}, observed {seen}")
    for key, cell in cells.items():
        cell.title = f"{key[0]} on {key[1]}: " + "; ".join(sorted(detail[key]))
    features = sorted({f for f, _ in cells})
    peers = sorted({p for _, p in cells})
    marks = {key: _expected_seen(detail[key]) for key in cells}
    return {"features": features, "peers": peers, "cells": cells, "marks": marks}


def _expected_seen(lines: set[str]) -> str:
    """The cell's short text: expected/observed as y/n/? (yes, no, unknown; present, absent)."""
    short = {"yes": "y", "no": "n", "unknown": "?", "present": "y", "absent": "n"}
    pairs = set()
    for line in lines:
        exp, _, seen = line.removeprefix("expected ").partition(", observed ")
        pairs.add(f"{short.get(exp, '?')}/{short.get(seen, '?')}")
    return " ".join(sorted(pairs))


def pair_grid(results: list[dict[str, Any]], *, rows_of: str, columns_of: str) -> dict[str, Any]:
    """A rows x columns grid of gravest verdicts with counts, and its per-feature breakdown."""
    cells: dict[tuple[str, str], Cell] = {}
    features: dict[str, dict[tuple[str, str], Cell]] = {}
    for r in results:
        key = (r[rows_of], r[columns_of])
        cells.setdefault(key, Cell()).verdicts.append(Verdict(r["verdict"]))
        features.setdefault(r["feature"] or "(no feature)", {}).setdefault(key, Cell()).verdicts.append(
            Verdict(r["verdict"]))
    return {"rows": sorted({k[0] for k in cells}), "columns": sorted({k[1] for k in cells}), "cells": cells,
            "features": {f: features[f] for f in sorted(features)}}


def persona_results(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Results whose subject is the client and whose server is a reference-server persona."""
    return [r for r in results if r["subject"] == "client" and (r["server"] or "").startswith(PERSONA_PREFIX)]


def interop_results(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Results of suites/interop/: real clients against real servers."""
    return [r for r in results if r["nodeid"].startswith(INTEROP_PREFIX) and r["client"] and r["server"]]


def differential(results: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], str | None]:
    """reports/differential.py's table (same question to every server, answers side by side), when that
    module exists; (rows, problem).  Its absence is no error: the section says there were no cases."""
    try:
        module = importlib.import_module("reports.differential")
    except ModuleNotFoundError as e:
        if e.name == "reports.differential":
            return [], None
        return [], f"reports.differential could not be imported: {e}"
    try:
        rows = list(module.table(results))
    except Exception as e:                  # the page must still be written
        return [], f"reports.differential.table failed: {type(e).__name__}: {e}"
    return rows, None


def requirement_rows(requirements: dict[str, Any], peers: list[str]) -> list[dict[str, Any]]:
    """Each requirement id with level, text and one verdict per peer (None: not tested on that peer)."""
    out = []
    for rid, entry in requirements["requirements"].items():
        out.append({"id": rid, "level": entry["level"] or "?", "text": " ".join((entry["text"] or "").split()),
                    "tests": entry["tests"], "verdicts": [entry["verdicts"].get(p) for p in peers]})
    return out


def image_ids(peers: list[dict[str, Any]], *, timeout: float = 5.0) -> dict[str, dict[str, str | None]]:
    """Debian suite -> the image tag its recipe gives (content-addressed: a recipe change is a new tag)
    and, where the Docker CLI answers, that tag's image id.  Nothing here is fatal: the page says what
    it could learn."""
    import shutil
    import subprocess
    suites = sorted({p["matrix"]["suite"] for p in peers if p.get("matrix") and p["matrix"].get("suite")})
    out: dict[str, dict[str, str | None]] = {}
    try:
        from fixtures.images import DebootstrapRecipe, image_tag
        recipe = DebootstrapRecipe()
    except Exception:
        return out
    docker = shutil.which("docker")
    for suite in suites:
        try:
            tag = image_tag(suite, recipe.key(suite))
        except Exception:
            continue
        image_id = None
        if docker:
            try:
                r = subprocess.run([docker, "image", "inspect", "--format", "{{.Id}}", tag],
                                   capture_output=True, text=True, timeout=timeout)
                image_id = r.stdout.strip() or None if r.returncode == 0 else None
            except (OSError, subprocess.SubprocessError):
                image_id = None
        out[suite] = {"tag": tag, "id": image_id}
    return out


def page_context(index: dict[str, Any], requirements: dict[str, Any], results: list[Result]
                 ) -> dict[str, Any]:
    """Everything index.html shows, computed (the template only lays it out)."""
    rows = index["results"]
    by_nodeid = {r.nodeid: r for r in results}
    augmented = [{**r, "judgements": [_judgement_json(j) for j in by_nodeid[r["nodeid"]].judgements]
                  if r["nodeid"] in by_nodeid else []} for r in rows]
    diff_rows, diff_problem = differential(augmented)
    tested = sorted({p for e in requirements["requirements"].values() for p in e["verdicts"]})
    personas = persona_results(rows)
    interop = interop_results(rows)
    return {
        "index": index, "style": {str(v): s for v, s in STYLE.items()}, "verdicts": [str(v) for v in Verdict],
        "sections": matrix_sections(rows), "timeline": timeline_grid(results),
        "personas": pair_grid(personas, rows_of="client", columns_of="server") if personas else None,
        "interop": pair_grid(interop, rows_of="client", columns_of="server") if interop else None,
        "requirement_peers": tested, "requirements": requirement_rows(requirements, tested),
        "differential": diff_rows, "differential_problem": diff_problem,
        "matrix_short": (index["harness"]["matrix_sha256"] or "")[:12],
        "images": image_ids(index["peers"]),
    }


def _judgement_json(j: Any) -> dict[str, Any]:
    return {"verdict": str(j.verdict), "requirements": list(j.requirements), "expected": j.expected,
            "observed": j.observed, "feature": j.feature, "peer": j.peer, "texts": list(j.texts),
            "reference": j.reference}


# --------------------------------------------------------------------------------------------------
# Detail pages


def _evidence(out_dir: Path, names: list[str]) -> list[dict[str, Any]]:
    """Each evidence entry: a path under out_dir (its text embedded, cut at MAX_EVIDENCE_CHARS) or a bare
    name (a run without --nbd-results wrote no files)."""
    out = []
    for name in names:
        path = out_dir / name
        shown = Path(name).stem.replace("-", " ") if "/" in name else name      # the file's name is the source's
        entry: dict[str, Any] = {"name": shown, "href": None, "text": None}
        if "/" in name:
            entry["href"] = "../" + name
            try:
                text = path.read_text(encoding="utf-8", errors="replace")
            except OSError:
                text = None
            if text is not None and len(text) > MAX_EVIDENCE_CHARS:
                text = text[:MAX_EVIDENCE_CHARS] + f"\n... cut; the whole text is in {name}\n"
            entry["text"] = text
        out.append(entry)
    return out


def case_context(row: dict[str, Any], result: Result | None, peers: dict[str, Any], out_dir: Path
                 ) -> dict[str, Any]:
    """What one result's detail page shows."""
    from nbdref import requirements as catalogue
    reqs = []
    for rid in row["requirements"]:
        try:
            entry = catalogue.get(rid)
            reqs.append({"id": rid, "level": entry.level, "text": " ".join(str(entry.text).split())})
        except KeyError:
            reqs.append({"id": rid, "level": "?", "text": "(not in the requirement catalogue)"})
    return {"r": row, "result": result, "anchor": anchor(row["nodeid"]), "peers": [peers[p] for p in (row["client"], row["server"]) if p in peers],
            "requirements": reqs, "evidence": _evidence(out_dir, row["evidence"]),
            "judgements": [_judgement_json(j) for j in result.judgements] if result else []}


# --------------------------------------------------------------------------------------------------
# Writing


def environment() -> Any:
    import jinja2
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES)), autoescape=True,
                             trim_blocks=True, lstrip_blocks=True, undefined=jinja2.StrictUndefined)
    return env


def write_html(out_dir: str | Path, index: dict[str, Any], requirements: dict[str, Any],
               results: list[Result]) -> Path:
    """Write out_dir/index.html and out_dir/cases/<case>.html, a section per result (stale pages
    removed); returns index.html."""
    out = Path(out_dir)
    cases = out / CASES_DIR
    cases.mkdir(parents=True, exist_ok=True)
    env = environment()
    by_nodeid = {r.nodeid: r for r in results}
    peers = {p["id"]: p for p in index["peers"]}
    case_page = env.get_template("case.html")
    by_case: dict[str, list[dict[str, Any]]] = {}
    for row in index["results"]:
        by_case.setdefault(row["case"], []).append(row)
    written = set()
    for case, rows in by_case.items():
        name = page_slug(case)
        written.add(name)
        entries = [case_context(row, by_nodeid.get(row["nodeid"]), peers, out) for row in rows]
        (cases / name).write_text(case_page.render(case=case, title=rows[0]["title"], entries=entries,
                                                   style={str(v): st for v, st in STYLE.items()}),
                                  encoding="utf-8")
    for old in cases.glob("*.html"):
        if old.name not in written:
            old.unlink()
    page = out / "index.html"
    tmp = page.with_name(page.name + ".tmp")
    tmp.write_text(env.get_template("index.html").render(**page_context(index, requirements, results)),
                   encoding="utf-8")
    os.replace(tmp, page)
    return page


__all__ = ["STYLE", "detail_href", "page_context", "page_slug", "write_html"]
