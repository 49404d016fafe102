"""The harness still detects what it claims: each known-bad peer behaviour of suites/baseline.yaml comes
out `known` (never `pass`), a custom client that does nothing fails, and an empty selection fails the
run.  Each drives the real suites in an inner pytest run and reads its results file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fixtures.images import docker_available

ROOT = Path(__file__).resolve().parents[2]


def inner(tmp_path: Path, *args: str, timeout: float = 600) -> tuple[subprocess.CompletedProcess[str], dict]:
    results = tmp_path / "results.json"
    env = {k: v for k, v in os.environ.items() if k not in ("NBD_HARNESS_RUN_ID", "PYTEST_XDIST_WORKER",
                                                             "PYTEST_ADDOPTS", "PYTEST_CURRENT_TEST")}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-n", "2",
                           f"--nbd-results={results}", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)
    data = json.loads(results.read_text()) if results.exists() else {"results": []}
    return proc, data


def verdicts(data: dict) -> dict[tuple[str, str], tuple[str, str | None]]:
    """(case, peer under test) -> (verdict, baseline reference)."""
    out = {}
    for r in data["results"]:
        peer = (r["server"] if r["subject"] == "server" else r["client"])["id"]
        out[(r["case"], peer)] = (r["verdict"], r["baseline"])
    return out


def needs_docker() -> None:
    ok, why = docker_available()
    if not ok:
        pytest.skip(f"harness test needs the Docker peers: {why}")


def test_known_server_bugs_are_detected(tmp_path: Path) -> None:
    needs_docker()
    proc, data = inner(tmp_path, "suites/server", "--peer-id", "nbd-server-3.26@trixie", "--peer-id",
                       "nbdkit-1.24@bullseye", "--peer-id", "nbdref-server[[]nbd-server-3.24]", "-k",
                       "test_info_then_go or test_read_df or test_plaintext_options_in_sequence or "
                       "test_plaintext_export_name_ends_session")
    seen = verdicts(data)
    want = {
        ("server.info_go.test_info_then_go", "nbd-server-3.26@trixie"): "nbd-server-info-size-zero",
        ("server.info_go.test_info_then_go", "nbdref-server[nbd-server-3.24]"): "nbd-server-info-size-zero",
        ("server.structured_replies.test_read_df", "nbd-server-3.26@trixie"): "nbd-server-df-simple-einval",
        ("server.tls.test_plaintext_options_in_sequence[x509]", "nbdkit-1.24@bullseye"):
            "nbdkit-tls-option-data-not-skipped",
        ("server.tls.test_plaintext_export_name_ends_session[psk]", "nbdkit-1.24@bullseye"):
            "nbdkit-tls-export-name-reply",
    }
    for key, entry in want.items():
        assert key in seen, f"{key} did not run: {proc.stdout[-2000:]}"
        verdict, reference = seen[key]
        assert verdict == "known" and entry in (reference or ""), (key, verdict, reference)
    assert proc.returncode == 0, proc.stdout[-3000:]       # known failures do not fail the run


def test_known_client_bugs_are_detected(tmp_path: Path) -> None:
    needs_docker()
    proc, data = inner(tmp_path, "suites/client", "--peer-id", "qemu-io-11.1@sid", "--peer-id",
                       "nbdinfo-1.14@bookworm", "--peer-id", "nbdinfo-1.24@sid", "-k",
                       "test_qemu_write or test_client_rejects_untrusted_server")
    seen = verdicts(data)
    assert seen[("client.qemu.test_qemu_write", "qemu-io-11.1@sid")][0] == "known"
    # SECURITY (CVE-2024-7383): libnbd 1.14 over a Unix socket reads from an untrusted server: known, not
    # passed; 1.24 refuses and passes; over TCP both refuse.
    verdict, reference = seen[("client.tls.test_client_rejects_untrusted_server[unix]", "nbdinfo-1.14@bookworm")]
    assert verdict == "known" and "CVE-2024-7383" in (reference or "")
    assert seen[("client.tls.test_client_rejects_untrusted_server[unix]", "nbdinfo-1.24@sid")][0] == "pass"
    assert seen[("client.tls.test_client_rejects_untrusted_server[tcp]", "nbdinfo-1.14@bookworm")][0] == "pass"
    assert proc.returncode == 0, proc.stdout[-3000:]


def test_a_selection_of_no_peer_fails_the_run(tmp_path: Path) -> None:
    proc, _ = inner(tmp_path, "suites/server/test_smoke.py", "--peer-id", "nothing*", timeout=120)
    assert proc.returncode != 0
    assert "picks no peer" in proc.stdout, proc.stdout[-2000:]


CUSTOM = """\
version: 1
suites: {{}}
peers:
  - {{id: my-client, implementation: custom, role: client, launcher: local, version: "0.1", command: {command}}}
  - {{id: my-server, implementation: custom, role: server, launcher: local, version: "7.2", timeline: qemu,
     command: ["qemu-nbd", "--persistent", "--shared=16", "-f", "raw", "-x", "{{export}}", "-k", "{{socket}}",
               "{{read_only?--read-only}}", "{{disk}}"]}}
"""


def test_a_custom_client_that_does_nothing_fails(tmp_path: Path) -> None:
    matrix = tmp_path / "m.yaml"
    matrix.write_text(CUSTOM.format(command='["/bin/false", "{uri}"]'))
    proc, data = inner(tmp_path, f"--matrix={matrix}", "suites/client/test_actions.py", "--peer-id", "my-*",
                       timeout=120)
    assert proc.returncode == 1, proc.stdout[-2000:]
    mine = {r["case"]: r["verdict"] for r in data["results"] if r["client"]["id"] == "my-client"}
    assert set(mine) == {f"client.actions.test_{a}" for a in ("size", "read", "write", "list", "map")}
    assert set(mine.values()) == {"fail"}


def test_a_custom_server_template_is_judged_on_conformance(tmp_path: Path) -> None:
    if not any((Path(d) / "qemu-nbd").exists() for d in os.environ.get("PATH", "").split(os.pathsep)):
        pytest.skip("harness test needs the host's qemu-nbd (./run installs qemu-utils)")
    matrix = tmp_path / "m.yaml"
    matrix.write_text(CUSTOM.format(command='["/bin/true"]'))
    proc, data = inner(tmp_path, f"--matrix={matrix}", "suites/server", "--peer-id", "my-server", timeout=300)
    mine = [r for r in data["results"] if r["server"]["id"] == "my-server"]
    assert len(mine) > 40
    assert not [r for r in mine if r["verdict"] == "harness-error"], proc.stdout[-3000:]
    # The row wraps the host's qemu-nbd, so it is judged like qemu-nbd, but the baseline (which names
    # implementations) does not excuse a custom row: its failures are exactly cases a qemu-nbd entry
    # of the baseline describes, now reported as plain failures of "my-server".
    from fixtures import baseline
    qemu_entries = [e for e in baseline.load() if "qemu-nbd" in e.implementations]
    failed = [r["case"] for r in mine if r["verdict"] in ("fail", "missing")]
    unexplained = [c for c in failed if not any(e.matches_case(c) for e in qemu_entries)]
    assert not unexplained, proc.stdout[-3000:]
    assert not [r for r in mine if r["verdict"] == "known"]          # no entry names "custom"
    smoke = next(r for r in mine if r["case"] == "server.smoke.test_reference_client_reads_size_and_data")
    assert smoke["verdict"] == "pass"
    assert any("reports no version" in j["observed"] for j in smoke["judgements"])  # taken at the row's word
    assert proc.returncode == (1 if failed else 0), proc.stdout[-3000:]


def test_every_marker_id_of_a_passing_reference_test_was_observed(tmp_path: Path) -> None:
    """A req marker claims no more than the test saw: a suite test that passes against the reference
    server's default persona or with the reference client observed every id on its marker on the wire
    (the reference peers implement the whole spec, so a passing test reaches every check it names)."""
    from fixtures.verdicts import Result
    from reports.coverage import coverage
    proc, data = inner(tmp_path, "--matrix", "matrix.yaml", "--peer-id", "nbdref-server[nbdref]",
                       "--peer-id", "nbdref-client", "suites/server", "suites/client")
    results = [Result.from_json(r) for r in data["results"]]
    assert results, proc.stdout[-3000:] + proc.stderr[-3000:]
    listing = coverage(results)
    claims = sorted(f"{rid}: {', '.join(e['claimed_not_observed'])}"
                    for side in listing["sides"].values() for rid, e in side["requirements"].items()
                    if e["claimed_not_observed"])
    assert not claims, "markers claim ids the test did not observe:\n" + "\n".join(claims)
