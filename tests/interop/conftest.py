"""Real-peer interop: every Docker peer of matrix.yaml against nbdref (client or server).

Peers come from ``load_matrix("matrix.yaml")`` (Docker rows only: the host's binaries are covered by
tests/client and tests/server).  Each server peer is started once per module and worker (module-scoped
fixtures, tests ordered by peer); each test opens its own connection.  What was observed per peer and
feature is attached to the test report (``user_properties``) and printed as one table at the end.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pytest

from fixtures.matrix import client_tools
from fixtures.runs import ProcId, cleanup_run, current_run, sweep_stale
from tests.interop.helpers import DOCKER_CLIENTS, DOCKER_SERVERS, OBSERVED, TOOL_ATTR, peer_params

_TABLE: list[tuple[str, str, str]] = []


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Parametrize ``docker_server_spec`` / ``docker_client_spec`` over the matrix's Docker peers, module
    scope, so a module runs every test of one peer before starting the next peer."""
    tool = getattr(metafunc.function, TOOL_ATTR, None)          # set by helpers.uses_tool
    clients = tuple(p for p in DOCKER_CLIENTS if tool is None or tool in client_tools(p))
    for name, peers in (("docker_server_spec", DOCKER_SERVERS), ("docker_client_spec", clients)):
        if name in metafunc.fixturenames:
            metafunc.parametrize(name, peer_params(metafunc.config, peers), scope="module")


@pytest.fixture(scope="session", autouse=True)
def _interop_run() -> Iterator[None]:
    """Sweep what a killed earlier run left, and remove this process's containers at the end."""
    sweep_stale()
    run = current_run()
    yield
    cleanup_run(run, mine_only=run.owner != ProcId.me())


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.when != "call":
        return
    for key, value in report.user_properties:
        if key == OBSERVED:
            _TABLE.append(tuple(value))  # type: ignore[arg-type]


def _peer_sort_key(peer: str) -> tuple[str, tuple[int, ...]]:
    impl = peer.partition("@")[0]
    version = tuple(int(x) for x in re.findall(r"\d+", impl.rsplit("-", 1)[-1]))
    return impl.rsplit("-", 1)[0], version


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """One line per peer: feature=observed, in the order the tests ran."""
    if not _TABLE:
        return
    rows: dict[str, dict[str, str]] = {}
    for peer, feature, observed in _TABLE:
        rows.setdefault(peer, {})[feature] = observed
    terminalreporter.section("interop: peer x feature -> observed")
    for peer in sorted(rows, key=_peer_sort_key):
        cells = ", ".join(f"{f}={o}" for f, o in sorted(rows[peer].items()))
        terminalreporter.write_line(f"{peer}: {cells}")
