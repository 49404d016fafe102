"""Fixtures of the client tests: TLS material (session) and a short work dir per test."""

from __future__ import annotations

from pathlib import Path

import pytest

from fixtures.tls_material import tls_material  # noqa: F401  (re-exported fixture)


@pytest.fixture
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A short directory for sockets: AF_UNIX paths are limited to 108 bytes."""
    return tmp_path_factory.mktemp("c")

