"""Real-peer interop: every Docker peer of matrix.yaml against nbdref (client or server).

Peers come from ``load_matrix("matrix.yaml")`` (Docker rows only: the host's binaries are covered by
tests/client and tests/server).  Each server peer is started once per module and worker (module-scoped
fixtures, tests ordered by peer); each test opens its own connection.  What was observed per peer and
feature is attached to the test report (``user_properties``) and printed as one table at the end.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fixtures.matrix import load_matrix
from fixtures.peerspec import PeerSpec
from fixtures.runs import ProcId, cleanup_run, current_run, sweep_stale
from fixtures.timeline import Finding, FindingKind, expected, judge

ROOT = Path(__file__).resolve().parents[2]
MATRIX = load_matrix(ROOT / "matrix.yaml")
DOCKER_SERVERS: tuple[PeerSpec, ...] = tuple(p for p in MATRIX.servers() if p.launcher == "docker")
DOCKER_CLIENTS: tuple[PeerSpec, ...] = tuple(p for p in MATRIX.clients() if p.launcher == "docker")
FATAL = ("MUST", "MUST NOT")
_OBSERVED = "interop-observed"
_TABLE: list[tuple[str, str, str]] = []


# ---------------------------------------------------------------------------------------------- peers

_DOCKER: list[tuple[bool, str]] = []


def docker_ok() -> tuple[bool, str]:
    """Asked once per process: a dead engine costs a 10 s timeout."""
    if not _DOCKER:
        from fixtures.images import docker_available

        _DOCKER.append(docker_available())
    return _DOCKER[0]


def require_docker(spec: PeerSpec) -> None:
    ok, why = docker_ok()
    if not ok:
        pytest.skip(f"{spec.id}: Docker is not available: {why}")
    from fixtures.images import ensure_image

    assert spec.suite is not None
    ensure_image(spec.suite, progress=lambda _m: None)      # cached; built once per suite otherwise


def peer_params(config: pytest.Config, peers: tuple[PeerSpec, ...]) -> list[Any]:
    """One param per peer, marked docker and (under xdist) grouped by peer for ``--dist loadgroup``."""
    grouped = config.pluginmanager.hasplugin("xdist")
    return [pytest.param(p, id=p.id, marks=[pytest.mark.docker,
                                            *([pytest.mark.xdist_group(p.id)] if grouped else [])])
            for p in peers]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Parametrize ``docker_server_spec`` / ``docker_client_spec`` over the matrix's Docker peers, module
    scope, so a module runs every test of one peer before starting the next peer."""
    for name, peers in (("docker_server_spec", DOCKER_SERVERS), ("docker_client_spec", DOCKER_CLIENTS)):
        if name in metafunc.fixturenames:
            metafunc.parametrize(name, peer_params(metafunc.config, peers), scope="module")


@pytest.fixture(scope="session", autouse=True)
def _interop_run() -> Iterator[None]:
    """Sweep what a killed earlier run left, and remove this process's containers at the end."""
    sweep_stale()
    run = current_run()
    yield
    cleanup_run(run, mine_only=run.owner != ProcId.me())


# ---------------------------------------------------------------------------------------------- verdicts

def split_violations(violations: list[Any]) -> tuple[list[str], list[str]]:
    """(MUST-level breaches, the rest) as strings."""
    fatal = [str(v) for v in violations if v.level in FATAL]
    other = [str(v) for v in violations if v.level not in FATAL]
    return fatal, other


def assert_clean(who: str, violations: list[Any], *, allowed: frozenset[str] = frozenset()) -> None:
    """No breach of a MUST; weaker breaches are reported as warnings (STYLE.md: non-strict, not failed).

    ``allowed`` names requirement ids a test has judged separately (it asserts them itself).
    """
    kept = [v for v in violations if v.req_id not in allowed]
    fatal, other = split_violations(kept)
    for text in other:
        warnings.warn(f"{who}: non-strict: {text}", stacklevel=2)
    assert not fatal, f"{who} broke the spec: {fatal}"


class Observer:
    """Records what a peer did, for the peer x feature table (and judges it against the timeline)."""

    def __init__(self, node: pytest.Item, peer: PeerSpec) -> None:
        self.node, self.peer = node, peer

    def __call__(self, feature: str, observed: object) -> None:
        self.node.user_properties.append((_OBSERVED, (self.peer.id, feature, str(observed))))

    def judge(self, feature: str, observed: bool, *, as_peer: PeerSpec | None = None) -> Finding:
        """Compare with fixtures/data/timeline.yaml: MISSING fails, EARLY (a backport) only warns."""
        finding = judge(expected(feature, as_peer or self.peer), observed)
        self(feature, f"{'yes' if observed else 'no'} [{finding.kind.name}]")
        if finding.kind is FindingKind.EARLY:
            warnings.warn(f"{self.peer.id}: {finding}", stacklevel=2)
        assert not finding.failed, f"{self.peer.id}: {finding}"
        return finding


def observer_for(request: pytest.FixtureRequest, peer: PeerSpec) -> Observer:
    return Observer(request.node, peer)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.when != "call":
        return
    for key, value in report.user_properties:
        if key == _OBSERVED:
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
