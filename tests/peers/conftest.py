"""The peer tests start real peers: sweep stale runs first, and remove this process's peers at the end."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from fixtures.runs import ProcId, cleanup_run, current_run, sweep_stale


@pytest.fixture(scope="session", autouse=True)
def _peer_run() -> Iterator[None]:
    sweep_stale()
    run = current_run()
    yield
    cleanup_run(run, mine_only=run.owner != ProcId.me())
