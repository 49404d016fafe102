"""The vendored catalogues are the copies they claim to be: checked against recorded digests, never
skipped, and with no file outside the repository read (a clone needs nothing beside it)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DIGESTS = ROOT / "fixtures" / "data" / "vendored.sha256"
TIMELINE_MARKER = "# ---- verbatim copy of the spec's timeline.yaml starts here (digest: fixtures/data/vendored.sha256) ----\n"


def recorded() -> dict[str, str]:
    out = {}
    for line in DIGESTS.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            digest, path = line.split(None, 1)
            out[path.strip()] = digest
    return out


def vendored_bytes(path: str) -> bytes:
    data = (ROOT / path).read_bytes()
    if path.endswith("timeline.yaml"):        # our mapping on top, the verbatim copy below the marker
        text = data.decode("utf-8")
        assert TIMELINE_MARKER in text, "the timeline lost its 'verbatim copy' marker"
        data = text.split(TIMELINE_MARKER, 1)[1].encode("utf-8")
    return data


def test_every_catalogue_is_recorded() -> None:
    assert set(recorded()) == {"impl/nbdref/data/requirements.yaml", "impl/nbdref/data/constants.yaml",
                               "fixtures/data/timeline.yaml", "fixtures/data/qemu-nbd-interop.txt"}


@pytest.mark.parametrize("path", sorted(recorded()))
def test_vendored_copy_matches_its_recorded_digest(path: str) -> None:
    assert hashlib.sha256(vendored_bytes(path)).hexdigest() == recorded()[path], \
        f"{path} changed since it was vendored: re-copy it from the spec and record its digest"
