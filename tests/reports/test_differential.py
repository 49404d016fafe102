"""reports/differential.py: the differential table from index.json's result objects -- one row per case
of suites/differential, the answer of each server (the observed answer, or the verdict when the case
failed), disagreements first, each row citing the requirement texts; other suites' results are left out."""

from __future__ import annotations

import json
from typing import Any

from nbdref import requirements as catalogue

from reports.differential import DIFFERENTIAL_SCHEMA, answer_of, document, table, write


def result(case: str, server: str | None, verdict: str, observed: str, requirements: tuple[str, ...] = (),
           title: str = "") -> dict[str, Any]:
    """An index.json result object (reports/index.py `_result`), only the fields the table reads real."""
    module, name = case.split(".")[1:3]
    return {"case": case, "nodeid": f"suites/differential/test_{module}.py::{name.split('[')[0]}[{server}]",
            "title": title or name, "section": "Differential: Request types", "feature": None,
            "requirements": list(requirements), "subject": "server", "client": "nbdref-client",
            "server": server, "verdict": verdict, "expected": "", "observed": observed, "evidence": [],
            "baseline": None}


ZERO = "differential.requests.test_zero_length_read"
PAST = "differential.requests.test_write_past_end"
FLAG = "differential.handshake.test_unknown_client_flag"
RESULTS = [
    # agree: every server says the same
    result(ZERO, "qemu-nbd-7.2@host", "info", "ok, 0 bytes", ("RD-009",), "What does a zero-length READ get?"),
    result(ZERO, "nbdkit-1.32@host", "info", "ok, 0 bytes", ("RD-009",)),
    result(ZERO, "nbdref-server[qemu-2.10]", "not-applicable", "cannot be asked here"),
    # disagree: two allowed answers (a spec tension), a core violation appended to one observed
    result(PAST, "qemu-nbd-7.2@host", "spec-tension", "NBD_EINVAL", ("ERR-001", "BSZ-034")),
    result(PAST, "nbdkit-1.32@host", "spec-tension", "NBD_ENOSPC", ("ERR-001", "BSZ-034")),
    result(PAST, "nbd-server-3.24@host", "non-strict",
           "NBD_EIO; ERR-001 (SHOULD, server): error NBD_EIO where NBD_ENOSPC is expected", ("ERR-001",)),
    # a failure shows its verdict, and disagrees with the answer of the others
    result(FLAG, "nbd-server-3.24@host", "known", "NBD_OPT_LIST answered with NBD_REP_ACK", ("HS-017",)),
    result(FLAG, "qemu-nbd-7.2@host", "info", "hard disconnect", ("HS-017",)),
    # not the battery's: left out
    result("server.commands.test_advertised_command[TRIM]", "qemu-nbd-7.2@host", "pass", "held"),
    {**result(ZERO, None, "info", "x"), "server": None},            # no server: no cell
]
RESULTS[-2]["nodeid"] = "suites/server/test_commands.py::test_advertised_command[qemu-nbd-7.2@host-TRIM]"


def test_one_row_per_differential_case_disagreements_first() -> None:
    rows = table(RESULTS)
    assert [r["case"] for r in rows] == [FLAG, PAST, ZERO]
    assert [r["disagree"] for r in rows] == [True, True, False]


def test_answers_are_the_observed_answer_or_the_failed_verdict() -> None:
    rows = {r["case"]: r for r in table(RESULTS)}
    assert rows[PAST]["answers"] == {"nbd-server-3.24@host": "NBD_EIO", "nbdkit-1.32@host": "NBD_ENOSPC",
                                     "qemu-nbd-7.2@host": "NBD_EINVAL"}
    assert rows[FLAG]["answers"] == {"nbd-server-3.24@host": "known", "qemu-nbd-7.2@host": "hard disconnect"}
    assert rows[PAST]["verdicts"]["nbd-server-3.24@host"] == "non-strict"
    assert answer_of(result(ZERO, "s", "fail", "DISC-024 (MUST NOT, both): EOF")) == "fail"
    assert answer_of(result(ZERO, "s", "info", "")) == "info"


def test_not_applicable_is_shown_but_no_disagreement() -> None:
    row = next(r for r in table(RESULTS) if r["case"] == ZERO)
    assert row["answers"]["nbdref-server[qemu-2.10]"] == "not-applicable"
    assert row["disagree"] is False
    assert row["title"] == "What does a zero-length READ get?"


def test_rows_cite_the_requirement_texts() -> None:
    row = next(r for r in table(RESULTS) if r["case"] == PAST)
    assert row["requirements"] == ["ERR-001", "BSZ-034"]
    assert row["spec"]["ERR-001"]["text"] == catalogue.text("ERR-001")
    assert row["spec"]["BSZ-034"]["level"] == catalogue.level("BSZ-034")
    unknown = table([result(ZERO, "s", "info", "ok", ("NO-SUCH-999",))])[0]
    assert unknown["spec"]["NO-SUCH-999"] == {"level": None, "text": None, "section": None}


def test_document_counts_and_is_written(tmp_path) -> None:
    doc = document(RESULTS)
    assert doc["schema"] == DIFFERENTIAL_SCHEMA
    assert (doc["cases"], doc["disagreements"]) == (3, 2)
    assert doc["servers"] == ["nbd-server-3.24@host", "nbdkit-1.32@host", "nbdref-server[qemu-2.10]",
                              "qemu-nbd-7.2@host"]
    path = write(tmp_path / "differential.json", RESULTS)
    assert json.loads(path.read_text()) == doc
    assert not list(tmp_path.glob("*.tmp"))
