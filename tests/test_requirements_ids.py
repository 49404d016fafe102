"""Every requirement id used in impl/ and suites/ exists in the catalogue; the copy is up to date."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from nbdref import requirements

ROOT = Path(__file__).resolve().parents[1]
AREAS = "GEN|HS|OLD|OPT|DISC|SR|CMD|FLUSH|FUA|MC|TLS|BSZ|BS|RD|WR|GO|TRIM|CACHE|WZ|ERR|INTEROP|EXT|URI"
ID = re.compile(rf"\b(?:{AREAS})-\d{{3}}\b")


def _ids_in_code() -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for top in ("impl", "suites"):
        for path in sorted((ROOT / top).rglob("*.py")):
            for lineno, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
                for m in ID.findall(line):
                    found.setdefault(m, []).append(f"{path.relative_to(ROOT)}:{lineno}")
    return found


def test_catalogue_loads():
    cat = requirements.catalogue()
    assert len(cat) == 576
    r = requirements.get("SR-006")
    assert (r.level, r.binds) == ("MUST NOT", "server")
    assert requirements.level("GEN-003") == "MUST" and requirements.binds("HS-016") == "client"
    assert "4096" in requirements.text("GEN-003")
    with pytest.raises(KeyError, match="XX-999"):
        requirements.get("XX-999")


def test_ids_used_in_code_exist():
    found = _ids_in_code()
    assert found, "the id pattern found nothing: the scan itself is broken"
    unknown = {i: where[:3] for i, where in found.items() if not requirements.exists(i)}
    assert not unknown, f"ids not in requirements.yaml: {unknown}"
