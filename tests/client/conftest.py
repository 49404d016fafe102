"""Fixtures of the client tests: TLS material (session) and a scratch disk image per test."""

from __future__ import annotations

from pathlib import Path

import pytest

from fixtures.tls_material import tls_material  # noqa: F401  (re-exported fixture)


@pytest.fixture
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A short directory for sockets: AF_UNIX paths are limited to 108 bytes."""
    return tmp_path_factory.mktemp("c")


@pytest.fixture
def disk(workdir: Path) -> Path:
    """A 4 MiB raw image with a recognisable first and last sector."""
    path = workdir / "disk.img"
    with open(path, "wb") as f:
        f.truncate(4 << 20)
        f.write(b"\x01" * 512)
        f.seek((4 << 20) - 512)
        f.write(b"\x02" * 512)
    return path
