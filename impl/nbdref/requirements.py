"""Lookup in the requirement catalogue (``data/requirements.yaml``).

Loaded once, lazily: importing nbdref must stay cheap for drivers that never ask.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from pathlib import Path

CATALOGUE = Path(__file__).with_name("data") / "requirements.yaml"


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
