"""reports/: index.json and requirements.json are built from a results file, match their schemas, count
right, list each peer once and give each requirement the gravest verdict per peer; bad input is one line
and exit 2.  A hand-made results file covers every verdict, a pair and a persona; an inner run of the
smoke suite covers what the harness really writes."""

from __future__ import annotations

import dataclasses
import json
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from fixtures.verdicts import Judgement, PeerRef, Result, Verdict
from reports import INDEX_SCHEMA, REQUIREMENTS_SCHEMA, build_index, build_requirements, write_reports
from reports.__main__ import main
from reports.index import SCHEMA_DIR

ROOT = Path(__file__).resolve().parents[2]
MATRIX = ROOT / "matrix.yaml"

CLIENT = PeerRef(id="nbdref-client", implementation="nbdref", role="client", launcher="in-process",
                 version="0.1.0", runs="0.1.0")
QEMU = PeerRef(id="qemu-nbd-7.2@host", implementation="qemu-nbd", role="server", launcher="local",
               version="7.2", runs="1:7.2+dfsg-7")
PERSONA = PeerRef(id="nbdref-server[qemu-2.10]", implementation="nbdref", role="server",
                  launcher="in-process", version="0.1.0", runs="2.10")
QEMU_IO = PeerRef(id="qemu-io-7.2@host", implementation="qemu-io", role="client", launcher="local",
                  version="7.2", runs="1:7.2+dfsg-7")
NOT_IN_MATRIX = PeerRef(id="my-server", implementation="custom", role="server", launcher="local",
                        version="0.1")


def validator(name: str) -> jsonschema.Draft202012Validator:
    schema = json.loads((SCHEMA_DIR / f"{name}.schema.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def assert_valid(name: str, doc: dict[str, Any]) -> None:
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator(name).iter_errors(doc)]
    assert not errors, errors[:5]


def result(case: str, verdict: Verdict, server: PeerRef | None = QEMU, *, client: PeerRef = CLIENT,
           subject: str = "server", reqs: tuple[str, ...] = ("GEN-001",), section: str | None = "Conventions",
           judgements: list[Judgement] | None = None, **kw: Any) -> Result:
    nodeid = f"suites/x.py::{case}[{(server or client).id}]"
    return Result(case=case, nodeid=nodeid, title=f"{case} title", section=section, requirements=reqs,
                  feature=None, client=client, server=server, subject=subject, verdict=verdict,
                  judgements=judgements or [Judgement(verdict=verdict, requirements=reqs)], **kw)


def hand_made() -> list[Result]:
    """Every verdict once on qemu-nbd, plus a persona, a pair (qemu-io against qemu-nbd, the client under
    test), a peer the matrix lacks and an id only a judgement names."""
    out = [result(f"t.{v.name.lower()}", v, expected="e", observed="o") for v in Verdict]
    out[0].evidence = ["reference client 1 transcript"]
    out += [
        result("t.persona", Verdict.PASS, PERSONA),
        # a test skipped before its peer started: no version seen
        result("t.persona_na", Verdict.NOT_APPLICABLE, dataclasses.replace(PERSONA, runs=None), section=None),
        result("client.t.pair", Verdict.NON_STRICT, QEMU, client=QEMU_IO, subject="client", reqs=("GEN-002",)),
        result("t.custom", Verdict.KNOWN, NOT_IN_MATRIX, baseline="bug 1",
               judgements=[Judgement(verdict=Verdict.KNOWN, requirements=("GEN-001", "DISC-003"),
                                     reference="bug 1")]),
    ]
    return out


def write_results(path: Path, results: list[Result]) -> Path:
    counts: dict[str, int] = {}
    for r in results:
        counts[str(r.verdict)] = counts.get(str(r.verdict), 0) + 1
    path.write_text(json.dumps({
        "schema": 1,
        "harness": {"version": "0.1.0", "matrix": "matrix.yaml", "matrix_sha256": "0" * 64,
                    "started": 1_700_000_000.5, "duration": 12.5},
        "counts": counts, "shared_servers_started": [], "results": [r.to_json() for r in results]}))
    return path


@pytest.fixture
def results_file(tmp_path: Path) -> Path:
    return write_results(tmp_path / "results.json", hand_made())


# --------------------------------------------------------------------------------------------------


def test_verdict_enums_of_both_schemas_are_the_verdicts() -> None:
    values = [str(v) for v in Verdict]
    for name in ("index", "requirements"):
        schema = json.loads((SCHEMA_DIR / f"{name}.schema.json").read_text())
        assert schema["$defs"]["verdict"]["enum"] == values, name
    counts = json.loads((SCHEMA_DIR / "index.schema.json").read_text())["$defs"]["counts"]
    assert counts["required"] == values
    assert list(counts["properties"]) == values


def test_both_schemas_agree_on_the_harness_header() -> None:
    index, reqs = (json.loads((SCHEMA_DIR / f"{n}.schema.json").read_text())["$defs"]["harness"]
                   for n in ("index", "requirements"))
    assert index["required"] == reqs["required"]
    assert set(index["properties"]) == set(reqs["properties"])


def test_hand_made_index(results_file: Path) -> None:
    index = build_index(results_file, MATRIX)
    assert_valid("index", index)
    assert index["schema"] == INDEX_SCHEMA
    assert index["harness"]["started_utc"] == "2023-11-14T22:13:20Z"
    # counts: every verdict, zeros included; by section, "(none)" for a result without one
    assert index["counts"] == {**{str(v): 1 for v in Verdict}, "pass": 2, "not-applicable": 2,
                               "non-strict": 2, "known": 2}
    assert sum(index["counts"].values()) == len(index["results"]) == len(hand_made())
    assert index["by_section"]["(none)"] == {**{str(v): 0 for v in Verdict}, "not-applicable": 1}
    assert sum(sum(c.values()) for c in index["by_section"].values()) == len(index["results"])
    # peers: once each, runs from whichever record saw it running, matrix entry when the matrix has it
    peers = {p["id"]: p for p in index["peers"]}
    assert [p["id"] for p in index["peers"]] == sorted(peers)
    assert set(peers) == {CLIENT.id, QEMU.id, PERSONA.id, QEMU_IO.id, NOT_IN_MATRIX.id}
    assert peers[PERSONA.id]["runs"] == "2.10"
    assert peers[PERSONA.id]["matrix"]["persona"] == "qemu-2.10"
    assert peers[PERSONA.id]["matrix"]["binary"] is None
    assert peers[QEMU.id]["matrix"]["binary"] == "qemu-nbd"
    assert peers[QEMU.id]["version"] == "7.2" and peers[QEMU.id]["runs"] == "1:7.2+dfsg-7"
    assert peers[QEMU_IO.id]["matrix"]["binary"] == "qemu-io"
    assert peers[NOT_IN_MATRIX.id]["matrix"] is None
    assert index["matrix"]["path"] == str(MATRIX) and index["matrix"]["same_as_run"] is False
    # results: sorted, peers by id, the ids judgements name appended
    cases = [r["case"] for r in index["results"]]
    assert cases == sorted(cases)
    pair = next(r for r in index["results"] if r["case"] == "client.t.pair")
    assert (pair["client"], pair["server"], pair["subject"]) == (QEMU_IO.id, QEMU.id, "client")
    custom = next(r for r in index["results"] if r["case"] == "t.custom")
    assert custom["requirements"] == ["GEN-001", "DISC-003"] and custom["baseline"] == "bug 1"
    assert next(r for r in index["results"] if r["case"] == "t.pass")["evidence"] == \
        ["reference client 1 transcript"]


def test_without_a_matrix_peers_have_no_matrix_entry(results_file: Path) -> None:
    index = build_index(results_file)
    assert_valid("index", index)
    assert index["matrix"] is None
    assert all(p["matrix"] is None for p in index["peers"])


def test_index_does_not_depend_on_the_order_workers_finished(tmp_path: Path) -> None:
    records = hand_made()
    a = build_index(write_results(tmp_path / "a.json", records))
    random.Random(7).shuffle(records)
    assert build_index(write_results(tmp_path / "b.json", records)) == a


def test_hand_made_requirements(results_file: Path) -> None:
    doc = build_requirements(results_file)
    assert_valid("requirements", doc)
    assert doc["schema"] == REQUIREMENTS_SCHEMA
    reqs = doc["requirements"]
    assert set(reqs) == {"GEN-001", "GEN-002", "DISC-003"}
    gen1 = reqs["GEN-001"]
    assert (gen1["level"], gen1["binds"]) == ("MUST NOT", "both") and gen1["text"].startswith("Protocol strings")
    assert "t.fail" in gen1["tests"] and "t.persona" in gen1["tests"] and "client.t.pair" not in gen1["tests"]
    # the gravest verdict of each peer under test: harness-error outranks fail on qemu-nbd
    assert gen1["verdicts"] == {QEMU.id: "harness-error", PERSONA.id: "pass", NOT_IN_MATRIX.id: "known"}
    # the pair's verdict is the client's (the peer under test), not the server's
    assert reqs["GEN-002"]["verdicts"] == {QEMU_IO.id: "non-strict"}
    # an id only a judgement names counts too
    assert reqs["DISC-003"]["tests"] == ["t.custom"]


def test_an_id_the_catalogue_lacks_is_listed_with_nulls(tmp_path: Path) -> None:
    path = write_results(tmp_path / "r.json", [result("t.x", Verdict.FAIL, reqs=("NOPE-999",))])
    doc = build_requirements(path)
    assert_valid("requirements", doc)
    assert doc["requirements"]["NOPE-999"] == {"level": None, "text": None, "binds": None, "tests": ["t.x"],
                                               "verdicts": {QEMU.id: "fail"}}


def test_write_reports_writes_both(results_file: Path, tmp_path: Path) -> None:
    index_path, req_path = write_reports(results_file, tmp_path / "out", MATRIX)
    assert json.loads(index_path.read_text()) == build_index(results_file, MATRIX)
    assert json.loads(req_path.read_text()) == build_requirements(results_file)


@pytest.mark.parametrize(("content", "says"), [
    (None, "cannot read the results file"),
    ('{"schema": 1, "results": [', "not JSON"),
    ("[]", "not a results file"),
    ('{"schema": 2, "harness": {}, "results": []}', "results schema 2"),
    ('{"schema": 1, "harness": {"version": "0"}, "results": []}', "harness.matrix is missing"),
    ('{"schema": 1, "harness": {"version": "0", "matrix": "m", "started": 1, "duration": 1},'
     ' "results": [{"case": "x"}]}', "results[0]: malformed record"),
])
def test_cli_bad_results_file_is_one_line_and_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                    content: str | None, says: str) -> None:
    path = tmp_path / "results.json"
    if content is not None:
        path.write_text(content)
    assert main(["build", "--results", str(path), "--out", str(tmp_path / "out")]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith(f"reports: {path}") and says in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


def test_cli_bad_matrix_is_one_line_and_exit_2(results_file: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "matrix.yaml"
    bad.write_text("version: 1\npeers: [{implementation: qemu-nbd, role: server, launcher: dokcer}]\n")
    assert main(["build", "--results", str(results_file), "--out", str(tmp_path / "out"),
                 "--matrix", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"reports: {bad}:") and err.count("\n") == 1, err


def test_real_run_of_the_smoke_suite(tmp_path: Path) -> None:
    """What the harness really writes (an inner pytest run), built by the CLI as ./run matrix calls it."""
    results = tmp_path / "results.json"
    env = {k: v for k, v in os.environ.items() if k not in ("NBD_HARNESS_RUN_ID", "PYTEST_XDIST_WORKER",
                                                             "PYTEST_ADDOPTS", "PYTEST_CURRENT_TEST")}
    inner = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-n", "0",
                            "suites/server/test_smoke.py", "--peer-id", "nbdref-server*",
                            f"--nbd-results={results}"], cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=300)
    assert inner.returncode == 0, inner.stdout[-3000:] + inner.stderr[-3000:]
    out = tmp_path / "out"
    cli = subprocess.run([sys.executable, "-m", "reports", "build", "--results", str(results), "--out",
                          str(out), "--matrix", "matrix.yaml"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=120)
    assert cli.returncode == 0, cli.stderr
    assert str(out / "index.json") in cli.stdout and str(out / "requirements.json") in cli.stdout
    assert cli.stderr == ""                      # the matrix is the run's: no digest warning

    raw = json.loads(results.read_text())
    index = json.loads((out / "index.json").read_text())
    reqs = json.loads((out / "requirements.json").read_text())
    assert_valid("index", index)
    assert_valid("requirements", reqs)
    assert index["matrix"]["same_as_run"] is True
    assert {k: v for k, v in index["counts"].items() if v} == raw["counts"]
    assert len(index["results"]) == len(raw["results"])
    peers = {p["id"]: p for p in index["peers"]}
    assert len(peers) == len(index["peers"])
    assert {r["server"]["id"] for r in raw["results"]} | {"nbdref-client"} == set(peers)
    assert all(peers[r["server"]]["matrix"]["persona"] for r in index["results"])
    named = {i for r in raw["results"] for i in r["requirements"]}
    assert named <= set(reqs["requirements"])
    for rid in named:
        assert reqs["requirements"][rid]["level"]
        assert set(reqs["requirements"][rid]["verdicts"]) <= set(peers) - {"nbdref-client"}
