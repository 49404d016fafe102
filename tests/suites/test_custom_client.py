"""A custom client row (a command template, as matrix.yaml's commented example) is run through every
action its template provides and judged: each action test passes for a client that does what it says,
fails for one whose `zero` does nothing, and an action it does not provide is not-applicable.  The grid,
fault and integrity suites run it too.  Drives the real suites in an inner pytest run."""

from __future__ import annotations

import sys
from pathlib import Path

from tests.suites.test_harness_detects import inner

SCRIPT = Path(__file__).with_name("custom_client.py")
PROVIDES = "size,read,write,list,map,zero,trim,flush,cache,copy"
MATRIX = """\
version: 1
suites: {{}}
peers:
  - {{id: my-client, implementation: custom, role: client, launcher: local, version: "0.1",
     options: {{actions: "{provides}"}},
     command: ["{python}", "{script}", {extra}"{{action}}", "{{uri}}", "{{offset}}", "{{length}}", "{{file}}"]}}
  - {{implementation: nbdref, role: server, launcher: in-process, persona: nbdref}}
  - {{implementation: nbdref, role: server, launcher: in-process, persona: qemu-2.6}}
"""


def matrix(tmp_path: Path, extra: str = "") -> Path:
    path = tmp_path / "m.yaml"
    path.write_text(MATRIX.format(provides=PROVIDES, python=sys.executable, script=SCRIPT, extra=extra))
    return path


def mine(data: dict) -> dict[str, str]:
    return {r["case"]: r["verdict"] for r in data["results"] if r["client"] and r["client"]["id"] == "my-client"}


def test_custom_client_row_runs_every_action_it_provides(tmp_path: Path) -> None:
    proc, data = inner(tmp_path, f"--matrix={matrix(tmp_path)}", "suites/client/test_actions.py",
                       "suites/client/test_commands.py", "suites/client/test_personas.py",
                       "suites/client/test_integrity.py", "--peer-id", "my-client", timeout=300)
    seen = mine(data)
    for action in ("size", "read", "write", "list", "map"):
        assert seen.get(f"client.actions.test_{action}") == "pass", (action, seen, proc.stdout[-2000:])
    for action in ("zero", "trim", "flush", "cache", "copy"):
        assert seen.get(f"client.commands.test_{action}") == "pass", (action, seen, proc.stdout[-2000:])
    # tls is not among the actions the template provides: not-applicable, decided from the row
    assert {seen.get(f"client.commands.test_tls_connect[{k}]") for k in ("x509", "x509-verify", "psk")} == \
        {"not-applicable"}
    assert seen.get("client.integrity.test_what_one_client_writes_others_read") == "pass", seen
    assert seen.get("client.personas.test_persona_moves_data") == "pass", seen
    assert proc.returncode == 0, proc.stdout[-3000:]


def test_custom_client_that_lies_about_zero_fails(tmp_path: Path) -> None:
    broken = matrix(tmp_path, extra='"--broken=zero", ')
    proc, data = inner(tmp_path, f"--matrix={broken}",
                       "suites/client/test_commands.py", "--peer-id", "my-client", "-k", "test_zero or test_trim",
                       timeout=120)
    seen = mine(data)
    assert seen.get("client.commands.test_zero") == "fail", seen
    assert seen.get("client.commands.test_trim") == "pass", seen
    assert proc.returncode == 1, proc.stdout[-2000:]
