"""reports/html.py: the matrix page.  Its grids are computed in Python (page_context), checked here on a
hand-made run; then a real small run is built by the CLI and opened in headless Chromium, which must
render the counts of that run, and a detail page must show the wire transcript.  A screenshot is kept."""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fixtures.verdicts import Judgement, PeerRef, Verdict
from reports.html import page_context, page_slug, write_html
from reports.index import index_from, load_run, requirements_from
from tests.reports.test_index import CLIENT, PERSONA, QEMU, QEMU_IO, hand_made, result, write_results

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = "/usr/bin/chromium"
REAL_SERVER = PeerRef(id="nbdkit-1.32@host", implementation="nbdkit", role="server", launcher="local",
                      version="1.32", runs="1.32.5-1")


def _context(tmp_path: Path, results: list) -> dict:
    header, loaded = load_run(write_results(tmp_path / "results.json", results))
    return page_context(index_from(header, loaded), requirements_from(header, loaded), loaded)


def test_matrix_groups_by_section_with_counts(tmp_path: Path) -> None:
    ctx = _context(tmp_path, hand_made())
    sections = {s["section"]: s for s in ctx["sections"]}
    assert set(sections) == {"Conventions", "(none)"}
    conv = sections["Conventions"]
    assert conv["total"] == sum(conv["counts"].values()) == len(hand_made()) - 1
    assert sum(s["total"] for s in ctx["sections"]) == len(ctx["index"]["results"])
    # columns: the peer under test (the pair's client, since the client is under test there)
    assert QEMU.id in conv["columns"] and QEMU_IO.id in conv["columns"] and CLIENT.id not in conv["columns"]
    fail = next(c for c in conv["cases"] if c["case"] == "t.fail")["cells"][QEMU.id]
    assert fail.verdict == Verdict.FAIL and fail.href.startswith("cases/") and ".html#r-" in fail.href


def test_timeline_persona_and_interop_grids(tmp_path: Path) -> None:
    feature = [Judgement(verdict=Verdict.EARLY, expected="no: before 7.0", observed="present (advertised)",
                         feature="NBD_OPT_EXTENDED_HEADERS", peer=QEMU.id, explicit=False)]
    runs = [
        result("t.early", Verdict.EARLY, judgements=feature),
        result("client.x.t_read", Verdict.PASS, PERSONA, client=QEMU_IO, subject="client"),
        result("client.x.t_write", Verdict.FAIL, PERSONA, client=QEMU_IO, subject="client"),
        result("interop.x.t_copy", Verdict.PASS, REAL_SERVER, client=QEMU_IO, subject="pair"),
    ]
    runs[-1].nodeid = "suites/interop/test_x.py::t_copy[qemu-io-7.2@host->nbdkit-1.32@host]"
    ctx = _context(tmp_path, runs)
    t = ctx["timeline"]
    cell = t["cells"][("NBD_OPT_EXTENDED_HEADERS", QEMU.id)]
    assert cell.verdict == Verdict.EARLY and t["marks"][("NBD_OPT_EXTENDED_HEADERS", QEMU.id)] == "n/y"
    personas = ctx["personas"]
    assert personas["rows"] == [QEMU_IO.id] and personas["columns"] == [PERSONA.id]
    grid_cell = personas["cells"][(QEMU_IO.id, PERSONA.id)]
    assert grid_cell.verdict == Verdict.FAIL and grid_cell.counts == [("fail", 1), ("pass", 1)]
    assert ctx["interop"]["cells"][(QEMU_IO.id, REAL_SERVER.id)].verdict == Verdict.PASS


def test_page_says_what_a_run_did_not_have(tmp_path: Path) -> None:
    header, loaded = load_run(write_results(tmp_path / "results.json", [result("t.pass", Verdict.PASS)]))
    page = write_html(tmp_path / "out", index_from(header, loaded), requirements_from(header, loaded), loaded)
    text = page.read_text()
    assert "None in this run." in text                                     # no suites/interop results
    if not (ROOT / "reports" / "differential.py").exists():
        assert "There were no differential cases in this run." in text
    assert "http://" not in text and "https://" not in text and "<script" not in text   # self-contained
    detail = tmp_path / "out" / "cases" / page_slug(loaded[0].case)
    assert "Not written: the run did not write evidence files" not in detail.read_text()  # no evidence at all


# --------------------------------------------------------------------------------------------------
# A real run, in a real browser


def _chromium() -> str:
    if Path(CHROMIUM).exists():
        return CHROMIUM
    if os.environ.get("CI") == "true":
        pytest.fail(f"{CHROMIUM} is missing (Debian package chromium; ./run installs it)")
    pytest.skip(f"{CHROMIUM} is missing: the matrix page is not checked in a browser (apt-get install chromium)")


def _browser(*args: str, url: Path, tmp_path: Path) -> str:
    proc = subprocess.run([_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                           f"--user-data-dir={tmp_path / 'chromium-profile'}", *args, url.as_uri()],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def test_the_page_of_a_small_run_renders_in_chromium(tmp_path: Path) -> None:
    _chromium()
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k not in ("NBD_HARNESS_RUN_ID", "PYTEST_XDIST_WORKER",
                                                             "PYTEST_ADDOPTS", "PYTEST_CURRENT_TEST", "CI")}
    inner = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-n", "0",
                            "suites/server/test_info_go.py", "suites/server/test_list.py",
                            "--peer-id", "nbdref-server[[]nbdref]", "--peer-id", "nbdref-server[[]qemu-2.6]",
                            f"--nbd-results={out / 'results.json'}"], cwd=ROOT, env=env, capture_output=True,
                           text=True, timeout=300)
    assert inner.returncode == 0, inner.stdout[-3000:]
    build = subprocess.run([sys.executable, "-m", "reports", "build", "--results", str(out / "results.json"),
                            "--out", str(out), "--matrix", "matrix.yaml"], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=120)
    assert build.returncode == 0, build.stderr
    assert f"the matrix page: {out / 'index.html'}" in build.stdout
    raw = json.loads((out / "results.json").read_text())
    assert len(raw["results"]) >= 5 and len(raw["counts"]) >= 2       # a run worth checking

    dom = _browser("--dump-dom", url=out / "index.html", tmp_path=tmp_path)
    # the totals: the counts of that run, every verdict (zeros too)
    totals = dict(re.findall(r'id="total-([a-z-]+)" data-count="(\d+)"', dom))
    assert totals.pop("results") == str(len(raw["results"]))
    assert {v: int(n) for v, n in totals.items() if int(n)} == raw["counts"]
    assert set(totals) == {str(v) for v in Verdict}
    # the case matrix: one linked cell per result, each section's count adds up
    matrix = dom[dom.index('id="matrix"'):dom.index('id="timeline"')]
    cells = re.findall(r'<td class="v v-([a-z-]+)" data-verdict="\1"[^>]*><a href="(cases/[^"]+)">', matrix)
    assert len(cells) == len(raw["results"])
    assert sorted(v for v, _ in cells) == sorted(r["verdict"] for r in raw["results"])
    section_totals = [int(n) for n in re.findall(r'class="section" data-section="[^"]*" data-total="(\d+)"', matrix)]
    assert sum(section_totals) == len(raw["results"])
    assert "nbdref-server[qemu-2.6]" in dom and "timeline-grid" in dom

    # a detail page: expected vs observed, the spec sentence, the transcript from the evidence file
    href = cells[0][1]
    page, _, section = href.partition("#")
    detail = html.unescape(_browser("--dump-dom", url=out / page, tmp_path=tmp_path))
    assert section and f'id="{section}"' in detail
    mine = detail[detail.index(f'id="{section}"'):]
    mine = mine[:mine.index("</section>")]                          # the linked result's own section
    assert 'class="expected-observed"' in mine
    transcript = re.search(r'<pre class="evidence transcript">(.*?)</pre>', mine, re.S)
    assert transcript, mine[:2000]
    assert re.search(r"^C: NBD_OPT_", transcript.group(1), re.M) and re.search(r"^S: ", transcript.group(1), re.M)

    shot = tmp_path / "matrix.png"
    _browser("--window-size=1400,1800", f"--screenshot={shot}", url=out / "index.html", tmp_path=tmp_path)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    keep = ROOT / "reports" / "out" / "screenshots"
    if keep.is_dir():
        shutil.copy(shot, keep / "matrix.png")


def test_differential_section_shows_every_servers_answer(tmp_path: Path) -> None:
    if not (ROOT / "reports" / "differential.py").exists():
        pytest.skip("reports/differential.py is not there yet (another module's work)")
    runs = [result("differential.options.t_odd", Verdict.INFO, server, observed=answer)
            for server, answer in ((QEMU, "NBD_REP_ERR_INVALID"), (PERSONA, "NBD_REP_ERR_UNSUP"))]
    for r in runs:
        r.nodeid = f"suites/differential/test_options.py::t_odd[{r.server.id}]"
    header, loaded = load_run(write_results(tmp_path / "results.json", runs))
    page = write_html(tmp_path / "out", index_from(header, loaded), requirements_from(header, loaded), loaded)
    text = page.read_text()
    table = text[text.index('id="differential-table"'):text.index('id="requirements"')]
    assert "NBD_REP_ERR_INVALID" in table and "NBD_REP_ERR_UNSUP" in table and "disagree" in table
