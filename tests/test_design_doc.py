"""docs/design.md lists every module of impl/, fixtures/, suites/ and reports/ that exists, and no module
that does not (its "Layout" block is the contract between modules)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TREES = {"impl/nbdref": "impl/nbdref/", "fixtures": "fixtures/", "suites": "suites/", "reports": "reports/"}


def listed() -> set[str]:
    """Module paths named in the block: nested names are relative to the last top-level folder."""
    text = (ROOT / "docs" / "design.md").read_text()
    block = text.split("<!-- modules -->", 1)[1].split("<!-- /modules -->", 1)[0]
    out, base = set(), ""
    for line in block.splitlines():
        m = re.match(r"^(\s*)(\S+\.py)\s", line + " ")
        top = re.match(r"^(\S+/)\s", line)
        if top:
            base = top.group(1)
        if m:
            out.add((base if m.group(1) else "") + m.group(2))
    return {name for name in out if name.startswith(tuple(TREES.values()))}


def existing() -> set[str]:
    found = set()
    for tree in TREES:
        for path in (ROOT / tree).rglob("*.py"):
            rel = path.relative_to(ROOT).as_posix()
            # package markers are not modules to describe (nbdref's own __init__ is: the public API)
            if "__pycache__" in rel or (path.name == "__init__.py" and path.parent != ROOT / "impl/nbdref"):
                continue
            found.add(rel)
    return found


def test_every_module_is_listed_and_every_listed_module_exists() -> None:
    names, real = listed(), existing()
    assert not real - names, f"modules missing from docs/design.md: {sorted(real - names)}"
    assert not names - real, f"docs/design.md names modules that do not exist: {sorted(names - real)}"
