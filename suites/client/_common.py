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


class Wire:
    """What a client sent and was answered on the reference server's connections (their transcripts),
    in the terms the client suites judge: options, refusals, acknowledgements, requests."""

    def __init__(self, records: list[Any]) -> None:
        from nbdref import events as ev
        from nbdref._constants import Opt
        self.records = records
        self.events: list[tuple[str, Any]] = [(e.direction, e.event) for r in records
                                              for e in (r.transcript or ()) if getattr(e, "event", None) is not None]
        self.options = [e for d, e in self.events if d == "C" and isinstance(e, ev.Option)]
        self.requests = [e for d, e in self.events if d == "C" and isinstance(e, ev.Request)]
        self.acks = {e.option for d, e in self.events if d == "S" and isinstance(e, ev.RepAck)}
        self.refused = {e.option for d, e in self.events if d == "S" and isinstance(e, ev.RepError)}
        self.contexts = [e.name for d, e in self.events if d == "S" and isinstance(e, ev.RepMetaContext)
                         and e.option == Opt.SET_META_CONTEXT]
        flags = [e.transmission_flags for d, e in self.events if d == "S" and isinstance(
            e, ev.ExportNameReply | ev.RepInfoExport | ev.OldstyleGreeting)]
        self.tx_flags = int(flags[-1]) if flags else 0       # what the server advertised for transmission
        self.structured = bool({Opt.STRUCTURED_REPLY, Opt.EXTENDED_HEADERS} & self.acks)

    def sent(self, option: int) -> bool:
        return any(o.option == option for o in self.options)

    def commands(self, command: int) -> list[Any]:
        return [r for r in self.requests if r.command == command]

    def with_flag(self, flag: int) -> list[Any]:
        return [r for r in self.requests if int(r.flags) & int(flag)]

    def option_names(self) -> str:
        from nbdref._constants import Opt
        names = []
        for o in self.options:
            try:
                names.append(Opt(o.option).name)
            except ValueError:
                names.append(hex(o.option))
        return " ".join(names) or "(none)"


class RecordsView:
    """A judge-able view of some server connection records: `violations` and `checked`, optionally
    only those of `only` (ids) or without those of `skip` — so each test of a shared client run
    reports the breaches it is about, once."""

    def __init__(self, records: list[Any], *, only: frozenset[str] | None = None,
                 skip: frozenset[str] = frozenset()) -> None:
        self._records, self.only, self.skip = records, only, skip

    def _keep(self, rid: str) -> bool:
        return (self.only is None or rid in self.only) and rid not in self.skip

    @property
    def violations(self) -> list[Any]:
        return [v for r in self._records for v in r.violations if self._keep(v.req_id)]

    @property
    def checked(self) -> set[str]:
        return {rid for r in self._records for rid in getattr(r, "checked", ()) if self._keep(rid)}

    @property
    def transcript(self) -> str:
        return "\n\n".join(f"# connection {r.id} ({r.reason})\n{r.transcript}" for r in self._records)
