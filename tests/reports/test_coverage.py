"""The coverage listing: traced by markers, observed on the wire, on whom, and listed with a reason."""

from __future__ import annotations

from pathlib import Path

import pytest
from nbdref import requirements as catalogue

from fixtures.verdicts import PeerRef, Result, Verdict
from reports.coverage import CoverageError, coverage, load_untestable, summary_lines, target_ids

NBDKIT = PeerRef(id="nbdkit-1.32@host", implementation="nbdkit", role="server", launcher="local", version="1.32")
PERSONA = PeerRef(id="nbdref-server[qemu-2.10]", implementation="nbdref", role="server", launcher="in-process",
                  version="0.1.0")
CLIENT = PeerRef(id="nbdref-client", implementation="nbdref", role="client", launcher="in-process", version="0.1.0")
QEMU_IO = PeerRef(id="qemu-io-7.2@host", implementation="qemu-io", role="client", launcher="local", version="7.2")


def result(case: str, server: PeerRef, reqs: tuple[str, ...], observed: tuple[str, ...],
           verdict: Verdict = Verdict.PASS, *, client: PeerRef = CLIENT, subject: str = "server") -> Result:
    return Result(case=case, nodeid=f"suites/x.py::{case}", title=case, section=None, requirements=reqs,
                  feature=None, client=client, server=server, subject=subject, verdict=verdict,
                  observed_requirements=observed)


def test_the_target_is_the_black_box_must_and_should_rules_of_each_side() -> None:
    targets = target_ids()
    assert len(targets["server"]) == 284 and len(targets["client"]) == 157
    for side, ids in targets.items():
        for rid in ids:
            r = catalogue.get(rid)
            assert r.binds in (side, "both") and r.testable.startswith("black-box")
            assert r.level in ("MUST", "MUST NOT", "SHOULD", "SHOULD NOT")
    both = [r.id for r in catalogue.catalogue().values() if r.binds == "both" and r.id in targets["server"]]
    assert both and set(both) <= set(targets["client"])


def test_traced_observed_third_party_and_claims() -> None:
    results = [
        result("a", NBDKIT, ("HS-010", "GO-012"), ("HS-010", "GO-012")),
        result("a", PERSONA, ("HS-010", "GO-012"), ("HS-010",)),              # a pass that did not see GO-012
        result("b", PERSONA, ("SR-029",), (), Verdict.UNSUPPORTED_OK),        # not a claim: nothing to see
        result("c", NBDKIT, (), ("CMD-009",)),                                # observed, traced by no marker
        # a client-suite result counts for the client side only
        result("d", PERSONA, ("HS-016",), ("HS-016",), client=QEMU_IO, subject="client"),
    ]
    listing = coverage(results, {"server": {"DISC-002": "reason"}, "client": {}})
    server, client = listing["sides"]["server"]["requirements"], listing["sides"]["client"]["requirements"]
    assert server["HS-010"]["status"] == "traced"
    assert server["HS-010"]["observed_against"] == [NBDKIT.id, PERSONA.id]
    assert server["HS-010"]["third_party"] == [NBDKIT.id]
    assert server["GO-012"]["claimed_not_observed"] == ["a"]
    assert server["SR-029"]["status"] == "traced" and server["SR-029"]["claimed_not_observed"] == []
    assert server["CMD-009"]["status"] == "untraced" and server["CMD-009"]["observed_against"] == [NBDKIT.id]
    assert server["DISC-002"]["status"] == "listed" and server["DISC-002"]["reason"] == "reason"
    assert "HS-016" not in server and client["HS-016"]["third_party"] == [QEMU_IO.id]
    s = listing["sides"]["server"]
    assert (s["traced"], s["listed"], s["observed"], s["observed_third_party"]) == (3, 1, 3, 3)
    assert "CMD-009" in s["untraced"]
    assert summary_lines(listing)[0].startswith("server-bound ids: 284: 3 traced by tests, 1 listed untestable")


@pytest.mark.parametrize("text, message", [
    ("server: {XX-999: why}\n", "no such requirement id"),
    ("server: {HS-016: why}\n", "not a black-box MUST/SHOULD rule binding the server"),   # binds the client
    ("client: {HS-016: ''}\n", "the reason is empty"),
    ("servers: {}\n", "top level must be a mapping"),
])
def test_a_bad_untestable_entry_is_named(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "untestable.yaml"
    path.write_text(text)
    with pytest.raises(CoverageError, match=message):
        load_untestable(path)


def test_the_suites_untestable_file_is_valid_and_short() -> None:
    listed = load_untestable()
    assert len(listed.get("server", {})) <= 20, "issue 9: at most 20 server-bound ids listed"
    assert len(listed.get("client", {})) <= 15, "issue 10: at most 15 client-bound ids listed"


def test_a_pair_credits_each_side_with_what_was_seen_of_it_and_a_failure_is_no_claim() -> None:
    """A pair's record keeps its two sides apart: a "both" rule (GEN-001) seen on the client's bytes
    counts for the client, not for the server; a failing test that did not see its marker's id is a
    failure, not an overstated marker."""
    pair = Result(case="p", nodeid="suites/interop/x.py::p", title="p", section=None, requirements=("GEN-001",),
                  feature=None, client=QEMU_IO, server=NBDKIT, subject="pair", verdict=Verdict.PASS,
                  observed_requirements=("GEN-001", "CMD-009"),
                  observed_by_peer={QEMU_IO.id: ("GEN-001",), NBDKIT.id: ("CMD-009",)})
    failed = result("f", NBDKIT, ("HS-010",), (), Verdict.FAIL)
    listing = coverage([pair, failed], {"server": {}, "client": {}})
    server, client = listing["sides"]["server"]["requirements"], listing["sides"]["client"]["requirements"]
    assert client["GEN-001"]["observed_against"] == [QEMU_IO.id]
    assert server["GEN-001"]["observed_against"] == [] and server["GEN-001"]["claimed_not_observed"] == ["p"]
    assert server["CMD-009"]["observed_against"] == [NBDKIT.id]
    assert server["HS-010"]["status"] == "traced" and server["HS-010"]["claimed_not_observed"] == []
