"""Fixtures the client suites share."""

from __future__ import annotations

from typing import Any

import pytest

from suites.client._own import client_kind


@pytest.fixture
def kind(client_peer: Any, verdict: Any) -> str:
    """The client peer's kind (qemu, libnbd, nbdref); not-applicable for any other (suites/client/_own.py)."""
    return client_kind(client_peer, verdict)
