"""The gate, by exit code: a new failure exits 1, the same failure in the baseline exits 0 (`known`), a
baseline entry that now passes exits 0 and is reported `fixed`, and --strict-should makes a broken
SHOULD fail the run.  Inner pytest runs of the real suites against in-process peers (the persona
nbd-server-3.24 reproduces nbd-server's NBD_OPT_INFO size-zero bug on purpose), and the host's qemu-nbd
for `fixed` (personas are never `fixed`: fixtures/judging.py).  Empty selections and idle peers are in
tests/suites/test_harness_detects.py."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
BUGGY = ("suites/server/test_info_go.py", "-k", "test_info_then_go", "--peer-id", "nbdref-server[[]nbd-server-3.24]")
CASE = "server.info_go.test_info_then_go"


def inner(cwd: Path, *args: str, results: Path) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    env = {k: v for k, v in os.environ.items() if k not in ("NBD_HARNESS_RUN_ID", "PYTEST_XDIST_WORKER",
                                                             "PYTEST_ADDOPTS", "PYTEST_CURRENT_TEST", "CI")}
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-n", "0", "-q",
                           f"--nbd-results={results}", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)
    data = json.loads(results.read_text()) if results.exists() else {"results": []}
    return proc, data


def only(data: dict[str, Any], case: str) -> dict[str, Any]:
    found = [r for r in data["results"] if r["case"] == case]
    assert len(found) == 1, [r["case"] for r in data["results"]]
    return found[0]


def test_a_baselined_failure_exits_0_and_a_new_one_exits_1(tmp_path: Path) -> None:
    proc, data = inner(ROOT, *BUGGY, results=tmp_path / "a.json")
    r = only(data, CASE)
    assert (r["verdict"], proc.returncode) == ("known", 0), proc.stdout[-3000:]
    assert "nbd-server-info-size-zero" in r["baseline"]

    empty = tmp_path / "baseline.yaml"
    empty.write_text("version: 1\nentries: []\n")
    proc, data = inner(ROOT, *BUGGY, f"--baseline={empty}", results=tmp_path / "b.json")
    r = only(data, CASE)
    assert (r["verdict"], proc.returncode) == ("fail", 1), proc.stdout[-3000:]
    assert "GO-022" in proc.stdout                         # the failure names the rule it breaks


FIXED_BASELINE = """\
version: 1
entries:
  - id: pretend-list-bug
    implementation: qemu-nbd
    versions: ">=1"
    case: "server.list.test_list"
    reference: "none: a made-up entry, so that a case that passes has a baseline entry"
"""


def test_a_baseline_entry_that_now_passes_is_reported_fixed(tmp_path: Path) -> None:
    if shutil.which("qemu-nbd") is None:
        pytest.skip("harness test needs the host's qemu-nbd (./run installs qemu-utils)")
    baseline = tmp_path / "baseline.yaml"
    baseline.write_text(FIXED_BASELINE)
    proc, data = inner(ROOT, "suites/server/test_list.py", "--peer-id", "qemu-nbd-7.2@host",
                       f"--baseline={baseline}", results=tmp_path / "r.json")
    r = only(data, "server.list.test_list")
    assert r["verdict"] == "fixed" and "pretend-list-bug" in r["baseline"], r
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "fixed" in proc.stdout and "pretend-list-bug" in proc.stdout     # said at the end of the run


SHOULD_TESTS = """\
def test_breaks_a_should(server_peer, verdict):
    verdict.fail("BSZ-003", expected="NBD_INFO_BLOCK_SIZE in the reply", observed="none sent")
"""
MATRIX = "version: 1\nsuites: {}\npeers:\n  - {implementation: nbdref, role: server, launcher: in-process, persona: nbdref}\n"


@pytest.mark.parametrize(("strict", "rc"), [(False, 0), (True, 1)])
def test_strict_should_fails_non_strict(tmp_path: Path, strict: bool, rc: int) -> None:
    (tmp_path / "conftest.py").write_text('pytest_plugins = ["fixtures.plugin"]\n')
    (tmp_path / "pytest.ini").write_text("[pytest]\naddopts = -p no:hypothesispytest\n")
    (tmp_path / "matrix.yaml").write_text(MATRIX)
    (tmp_path / "test_should.py").write_text(SHOULD_TESTS)
    args = ["--matrix=matrix.yaml", "test_should.py", *(["--strict-should"] if strict else [])]
    proc, data = inner(tmp_path, *args, results=tmp_path / "r.json")
    assert data["results"] and {r["verdict"] for r in data["results"]} == {"non-strict"}   # the record stays
    assert proc.returncode == rc, proc.stdout[-3000:]
    if strict:
        assert "failed by --strict-should" in proc.stdout and "BSZ-003" in proc.stdout
