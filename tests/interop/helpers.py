"""Shared by the interop modules: the Docker peers of matrix.yaml, verdicts on violations, and the observer
that fills the peer x feature table (printed by conftest.py at the end of the run)."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest

from fixtures.matrix import load_matrix
from fixtures.peerspec import PeerSpec
from fixtures.timeline import Finding, FindingKind, expected, judge

ROOT = Path(__file__).resolve().parents[2]
MATRIX = load_matrix(ROOT / "matrix.yaml")
DOCKER_SERVERS: tuple[PeerSpec, ...] = tuple(p for p in MATRIX.servers() if p.launcher == "docker")
DOCKER_CLIENTS: tuple[PeerSpec, ...] = tuple(p for p in MATRIX.clients() if p.launcher == "docker")
FATAL = ("MUST", "MUST NOT")
OBSERVED = "interop-observed"          # user_properties key of one table cell


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


TOOL_ATTR = "_interop_tool"


def uses_tool(tool: str) -> Any:
    """Decorator: run this client test only for client peers that ship ``tool`` (matrix.client_tools)."""
    def mark(func: Any) -> Any:
        setattr(func, TOOL_ATTR, tool)
        return func
    return mark


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
        self.node.user_properties.append((OBSERVED, (self.peer.id, feature, str(observed))))

    def judge(self, feature: str, observed: bool, *, as_peer: PeerSpec | None = None) -> Finding:
        """Compare with fixtures/data/timeline.yaml: MISSING fails, EARLY (a backport) only warns."""
        finding = judge(expected(feature, as_peer or self.peer), observed)
        self(feature, f"{'yes' if observed else 'no'} [{finding.kind.name}]")
        if finding.kind is FindingKind.EARLY:
            warnings.warn(f"{self.peer.id}: {finding}", stacklevel=2)
        assert not finding.failed, f"{self.peer.id}: {finding}"
        return finding


def flag_names(flags: int) -> str:
    """HAS_FLAGS|SEND_FLUSH|... for a transmission flags value (the table stays readable)."""
    from nbdref._constants import TxFlag

    return "|".join(f.name or "?" for f in TxFlag if f & flags) or "0"


def observer_for(request: pytest.FixtureRequest, peer: PeerSpec) -> Observer:
    return Observer(request.node, peer)


