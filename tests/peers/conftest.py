"""The peer tests start real peers: they all join the run of fixtures.plugin's `harness_run`, whose
creation sweeps stale runs; the plugin removes what this process started at the end of the session
(pytest_sessionfinish), as for the suites."""

from __future__ import annotations

from typing import Any

import pytest


@pytest.fixture(scope="session", autouse=True)
def _peer_run(harness_run: Any) -> Any:
    return harness_run
