"""--shard K/N and `python -m reports merge`: the shards of a run, merged, give the index.json results of
one run; the deal is by peer, deterministic, balanced, and puts peerless tests in shard 1."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from fixtures.shards import deal, parse_shard
from reports.__main__ import main

ROOT = Path(__file__).resolve().parents[2]
SUITE = ("suites/server/test_info_go.py", "suites/server/test_list.py",
         "--peer-id", "nbdref-server[[]nbdref]", "--peer-id", "nbdref-server[[]qemu-2.6]",
         "--peer-id", "nbdref-server[[]qemu-2.10]")
VOLATILE = ("duration", "worker")          # differ between any two runs


def test_deal_is_by_peer_balanced_and_deterministic() -> None:
    counts = {"a": 10, "b": 10, "c": 5, "d": 5, None: 3}
    dealt = deal(counts, 2)
    assert dealt[None] == 1
    assert deal(dict(reversed(list(counts.items()))), 2) == dealt          # order of collection: no matter
    load = {s: sum(n for k, n in counts.items() if dealt[k] == s) for s in (1, 2)}
    assert abs(load[1] - load[2]) <= 3
    assert set(deal(counts, 9).values()) <= set(range(1, 10))
    assert deal({"a": 1}, 3) == {"a": 1}                                    # more shards than peers


@pytest.mark.parametrize("text", ["0/2", "3/2", "1", "a/b", "1/0"])
def test_bad_shard_is_a_usage_error(text: str) -> None:
    with pytest.raises(pytest.UsageError, match="K/N"):
        parse_shard(text)


def _run(tmp: Path, *args: str, workers: str = "0") -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if k not in ("NBD_HARNESS_RUN_ID", "PYTEST_XDIST_WORKER",
                                                             "PYTEST_ADDOPTS", "PYTEST_CURRENT_TEST", "CI")}
    results = tmp / "results.json"
    proc = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-n", workers,
                           *SUITE, *args, f"--nbd-results={results}"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:]
    return json.loads(results.read_text())


def _index(results: Path, out: Path) -> dict[str, Any]:
    assert main(["build", "--results", str(results), "--out", str(out)]) == 0
    return json.loads((out / "index.json").read_text())


def _comparable(index: dict[str, Any]) -> list[dict[str, Any]]:
    """index.json's results without timing, and evidence by file name (each run has its own directory)."""
    return [{**{k: v for k, v in r.items() if k not in VOLATILE},
             "evidence": ["/".join(e.split("/")[-2:]) for e in r["evidence"]]} for r in index["results"]]


def test_two_shards_merged_are_one_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    one = _run(tmp_path / "one")
    first = _run(tmp_path / "s1", "--shard", "1/2", workers="2")      # xdist workers deal alike
    second = _run(tmp_path / "s2", "--shard", "2/2")
    peers = [{r["server"]["id"] for r in shard["results"]} for shard in (first, second)]
    assert peers[0] and peers[1] and not peers[0] & peers[1]           # by peer, disjoint, none empty
    assert len(first["results"]) + len(second["results"]) == len(one["results"])

    merged = tmp_path / "merged" / "results.json"
    assert main(["merge", str(tmp_path / "s1" / "results.json"), str(tmp_path / "s2" / "results.json"),
                 "--out", str(merged)]) == 0
    a = _index(tmp_path / "one" / "results.json", tmp_path / "one-out")
    b = _index(merged, tmp_path / "merged-out")
    assert _comparable(a) == _comparable(b)
    assert a["counts"] == b["counts"] and a["by_section"] == b["by_section"] and a["peers"] == b["peers"]
    # the merged evidence paths lead to the shards' files, from the merged document's directory
    for r in b["results"]:
        for e in r["evidence"]:
            assert (tmp_path / "merged-out" / e).is_file(), e

    capsys.readouterr()
    again = tmp_path / "again.json"
    assert main(["merge", str(tmp_path / "s1" / "results.json"), str(tmp_path / "s1" / "results.json"),
                 "--out", str(again)]) == 2
    err = capsys.readouterr().err
    assert "shards overlap" in err and err.count("\n") == 1 and not again.exists()
