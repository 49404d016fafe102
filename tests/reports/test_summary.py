"""The end of a run on the terminal (fixtures/summary.py): the peers x feature groups table and one line
per failure, on the xdist controller too; a peer failure's traceback only with -v (JUnit keeps it
always); a harness error keeps its traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from fixtures.summary import failure_lines, table_lines
from fixtures.verdicts import Judgement, Verdict
from tests.reports.test_index import PERSONA, QEMU, QEMU_IO, result

ROOT = Path(__file__).resolve().parents[2]


def test_table_counts_per_peer_and_group() -> None:
    runs = [result("a", Verdict.PASS, section="Option haggling: NBD_OPT_GO"),
            result("b", Verdict.FAIL, section="Option haggling: NBD_OPT_LIST"),
            result("c", Verdict.KNOWN, section="Transmission: request types"),
            result("d", Verdict.PASS, PERSONA, section="Transmission: request types"),
            result("e", Verdict.NON_STRICT, QEMU, client=QEMU_IO, subject="client", section="TLS support")]
    lines = table_lines(runs)
    head, rows = lines[0], {line.split()[0]: line for line in lines[1:-1]}
    assert head.split() == ["Option", "hagg", "TLS", "support", "Transmissio"]    # groups, cut to a column
    assert list(rows) == [PERSONA.id, QEMU.id, QEMU_IO.id]            # servers first, then clients
    assert "1/2 F1" in rows[QEMU.id] and "0/1 K1" in rows[QEMU.id]
    assert "0/1 NS1" in rows[QEMU_IO.id]


def test_one_line_per_failure_with_rule_level_spec_and_expected_vs_observed() -> None:
    j = Judgement(verdict=Verdict.FAIL, requirements=("GO-022",), expected="the same size",
                  observed="INFO size 0, GO size 16 MiB", peer=QEMU.id)
    runs = [result("t.info", Verdict.FAIL, judgements=[j]), result("t.ok", Verdict.PASS),
            result("t.should", Verdict.NON_STRICT)]
    (line,) = failure_lines(runs)
    assert line.startswith(f"FAIL t.info [{QEMU.id}]: GO-022 MUST \"")
    assert line.endswith("— expected the same size — observed INFO size 0, GO size 16 MiB")
    assert len(failure_lines(runs, strict_should=True)) == 2


TESTS = """\
def test_peer_fails(server_peer, verdict):
    size = 0
    assert size == 16, "the peer reported size 0"

def test_harness_breaks(server_peer, verdict):
    raise RuntimeError("harness bug here")

def test_peer_passes(server_peer, verdict):
    pass
"""
MATRIX = "version: 1\nsuites: {}\npeers:\n  - {implementation: nbdref, role: server, launcher: in-process, persona: nbdref}\n"


def _inner(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "conftest.py").write_text('pytest_plugins = ["fixtures.plugin"]\n')
    (tmp_path / "pytest.ini").write_text("[pytest]\naddopts = -p no:hypothesispytest\n")
    (tmp_path / "matrix.yaml").write_text(MATRIX)
    (tmp_path / "test_demo.py").write_text(TESTS)
    env = {k: v for k, v in os.environ.items() if k not in ("NBD_HARNESS_RUN_ID", "PYTEST_XDIST_WORKER",
                                                             "PYTEST_ADDOPTS", "PYTEST_CURRENT_TEST", "CI")}
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-n", "2",
                           "--matrix=matrix.yaml", "test_demo.py", "--junitxml=junit.xml", *args],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)


def _block(failures: str, name: str) -> str:
    """One test's part of pytest's FAILURES section (the workers finish in any order)."""
    start = failures.index(f" {name}[")
    end = failures.find("\n____", start)
    return failures[start:] if end < 0 else failures[start:end]


def test_under_xdist_brief_by_default_tracebacks_with_v(tmp_path: Path) -> None:
    proc = _inner(tmp_path)
    out = proc.stdout
    assert proc.returncode == 1, out[-3000:]
    assert "nbd summary: peers x feature groups" in out and "nbdref-server[nbdref]" in out
    assert "1/3 H1 F1" in out                                      # the controller's table is full
    assert "FAIL demo.test_peer_fails [nbdref-server[nbdref]]" in out
    failures = out[out.index("= FAILURES ="):out.index("nbd verdicts")]
    peer = _block(failures, "test_peer_fails")
    assert "assert size == 16" not in peer                          # no traceback for the peer's failure
    assert "fail: demo.test_peer_fails" in peer
    assert "raise RuntimeError" in _block(failures, "test_harness_breaks")   # ours keeps its traceback
    assert "assert size == 16" in (tmp_path / "junit.xml").read_text()   # JUnit has it all

    verbose = _inner(tmp_path, "-v").stdout
    failures = verbose[verbose.index("= FAILURES ="):verbose.index("nbd verdicts")]
    assert "assert size == 16" in _block(failures, "test_peer_fails")
