"""Lookup in the requirement catalogue (``data/requirements.yaml``).

Loaded once, lazily: importing nbdref must stay cheap for drivers that never ask.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path

CATALOGUE = Path(__file__).with_name("data") / "requirements.yaml"

MANDATORY_LEVELS = frozenset({"MUST", "MUST NOT"})
"""The catalogue levels of mandatory requirements (RFC 2119 MUST / MUST NOT; proto.md "Conventions").

A breach of one lets the peer hard-disconnect (DISC-003 / DISC-017), and by default it is fatal
(``Strictness.fatal_levels``); every other level (SHOULD, SHOULD NOT, MAY) is only recorded.
"""


@dataclass(frozen=True, slots=True)
class Requirement:
    """One catalogue entry (only the fields the harness uses)."""

    id: str
    level: str
    binds: str
    text: str
    section: str = ""
    feature: str = ""
    source: str = "proto"
    testable: str = ""      # "black-box: how a peer observes it" or "no: why not"


@cache
def catalogue() -> dict[str, Requirement]:
    """All requirements by id (parsed on first use)."""
    import yaml

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    with CATALOGUE.open("rb") as f:
        doc = yaml.load(f, Loader=loader)
    out: dict[str, Requirement] = {}
    for r in doc["requirements"]:
        out[r["id"]] = Requirement(
            id=r["id"],
            level=r["level"],
            binds=r["binds"],
            text=r["text"],
            section=r.get("section", ""),
            feature=r.get("feature", ""),
            source=r.get("source", "proto"),
            testable=r.get("testable", ""),
        )
    return out


def get(req_id: str) -> Requirement:
    """The entry for ``req_id``; KeyError names the unknown id."""
    try:
        return catalogue()[req_id]
    except KeyError:
        raise KeyError(f"unknown requirement id {req_id!r}") from None


def exists(req_id: str) -> bool:
    return req_id in catalogue()


def level(req_id: str) -> str:
    return get(req_id).level


def binds(req_id: str) -> str:
    return get(req_id).binds


def text(req_id: str) -> str:
    return get(req_id).text


# The core modules whose checks name requirement ids (see _checker._check).
_CORE_MODULES = ("_checker", "_negotiation", "_transmission", "_parse", "_connection", "_wire", "_outcome")


@cache
def checked_by_core() -> frozenset[str]:
    """Ids the sans-I/O core checks on the wire (read from its sources, so it cannot go stale)."""
    here = Path(__file__).parent
    found: set[str] = set()
    for name in _CORE_MODULES:
        found.update(re.findall(r'"([A-Z]+-\d{3})"', (here / f"{name}.py").read_text()))
    return frozenset(found)
