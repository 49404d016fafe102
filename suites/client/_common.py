"""What the client suites share: tool selection, the reference server's view, tool results."""

from __future__ import annotations

from typing import Any

import pytest

from fixtures.judging import ServerWatch
from fixtures.matrix import client_tools

REGION = 64 * 1024                     # each writing test claims regions of its own (reference_region)
TOOL_TIMEOUT = 60


def tool_fixture(tool: str) -> Any:
    """A fixture `tool` that makes a test not-applicable for client peers without `tool`: decided from
    the peer's package (fixtures.matrix.client_tools), never by trying."""
    @pytest.fixture
    def _tool(client_peer: Any, verdict: Any) -> str:
        if tool not in client_tools(client_peer):
            verdict.not_applicable(f"{client_peer.id} has no {tool} (tools: {', '.join(client_tools(client_peer)) or 'none'})")
        return tool
    return _tool


def extended_headers(watch: ServerWatch) -> bool:
    """Did any connection of this test agree to extended headers (the server ACKed the option)?"""
    from nbdref import events as ev
    from nbdref._constants import Opt
    return any(isinstance(e.event, ev.RepAck) and e.event.option == Opt.EXTENDED_HEADERS
               for r in watch.records() for e in r.transcript if e.direction == "S")


def server_bytes(server: Any, offset: int, length: int, watch: ServerWatch) -> bytes:
    """What the reference server now holds, read through a fresh strict reference client: the
    harness's own connection, left out of `watch` (it is not the client peer's); a failure here is ours."""
    from nbdref.client import Client, ClientError

    from fixtures.judging import HarnessError
    with watch.harness_connections():
        try:
            with Client(timeout=10) as c:
                c.connect_uri(server.uri)
                return bytes(c.pread(length, offset))
        except (ClientError, OSError) as e:
            raise HarnessError(f"reading back from the reference server failed: {type(e).__name__}: {e}") from e


def ok(result: Any) -> Any:
    """`result` if the tool succeeded; else fail with its output."""
    if not result.ok:
        pytest.fail(f"{result.argv} failed ({result.rc}): {result.stdout[-1000:]} {result.stderr[-1000:]}")
    return result
