"""Reference servers of a test's own, and one client run that visits several of them.

Why: the client-bound rules need the reference server in configurations the shared one has not got
(no NO_ZEROES, no NBD_OPT_GO, nothing optional, block size constraints, a fault, the IANA port, no TLS
for a TLS client); and a Docker client run costs ~0.5 s, so a test makes ONE run of the client peer
in which a shell loop visits every server it needs (`run_steps`).  Each server's records are judged
by the test (`Own.watch` is a ServerWatch: the server's core checks every client-bound rule).

Client kinds: ``qemu`` (qemu-io, qemu-img), ``libnbd`` (nbdinfo, nbdsh, nbdcopy), ``nbdref`` (the
reference client, run in this process); a custom client row has no known command line for these cases.
"""

from __future__ import annotations

import contextlib
import shlex
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nbdref._errors import ProtocolError
from nbdref.client import ClientError, UsageError

from fixtures.judging import HarnessError, ServerWatch
from fixtures.matrix import client_tools
from fixtures.peers.libnbd_clients import NBDSH_CLOSE

MiB = 1 << 20
STEP_TIMEOUT = 20                   # seconds for one client command inside a batch
MARK = "@@nbd-harness-step"


_BASE = bytes((i * 13) & 0xFF for i in range(4096))
_SHIFT = [bytes((b + k) & 0xFF for b in range(256)) for k in range(256)]


def pattern(offset: int, length: int) -> bytes:
    """The content of every export here: byte i is (i * 13 + i // 4096) mod 256 — it differs per
    sector and per 4 KiB block, so a misplaced read is seen."""
    first, last = offset >> 12, (offset + length + 4095) >> 12
    blocks = b"".join(_BASE.translate(_SHIFT[k & 0xFF]) for k in range(first, last))
    start = offset - (first << 12)
    return blocks[start:start + length]


def client_kind(peer: Any, verdict: Any) -> str:
    """``qemu``, ``libnbd`` or ``nbdref``, decided from the peer's package; else not-applicable."""
    if peer.implementation == "nbdref":
        return "nbdref"
    tools = client_tools(peer)
    if "qemu-io" in tools:
        return "qemu"
    if "nbdinfo" in tools:
        return "libnbd"
    verdict.not_applicable(f"{peer.id}: these cases drive qemu-io, libnbd's tools or the reference client "
                           f"(tools: {', '.join(tools) or 'none'})")
    raise AssertionError("unreachable")


@dataclass
class Own:
    """One reference server of the test: its nbdref Server, URI and the watch of its connections."""

    name: str
    server: Any
    export_name: str
    size: int
    socket: Path | None = None
    host: str | None = None
    port: int | None = None
    watch: ServerWatch = field(init=False)

    def __post_init__(self) -> None:
        self.watch = ServerWatch(self.server, since=0)

    def uri(self, export: str | None = None, *, scheme: str | None = None, query: str = "") -> str:
        """``nbd+unix:///EXPORT?socket=...`` or ``nbd://HOST:PORT/EXPORT`` (export already URI-encoded)."""
        import urllib.parse
        path = urllib.parse.quote(self.export_name if export is None else export, safe="")
        if self.socket is not None:
            q = f"socket={self.socket}" + (f"&{query}" if query else "")
            return f"{scheme or 'nbd+unix'}:///{path}?{q}"
        host = f"[{self.host}]" if ":" in str(self.host) else self.host
        return f"{scheme or 'nbd'}://{host}:{self.port}/{path}" + (f"?{query}" if query else "")

    def records(self) -> list[Any]:
        return self.watch.records()


@contextlib.contextmanager
def own_server(workdir: Path, name: str, *, transport: str = "unix", export: str = "exp", size: int = 4 * MiB,
               host: str = "127.0.0.1", port: int = 0, read_only: bool = False,
               block_size: tuple[int, int, int] | None = None, **server_kw: Any) -> Iterator[Own]:
    """An in-process nbdref Server of one export (memory, `pattern` content) on a Unix socket under
    ``workdir`` (client containers mount it) or on TCP ``host:port``; stopped on the way out.
    ``server_kw`` go to nbdref.server.Server (persona, fault, tls, oldstyle, mask_handshake...)."""
    from nbdref.server import Export, Server
    exp = Export.memory(export, size, read_only=read_only, block_size=block_size)
    exp.backend.pwrite(0, pattern(0, size))
    where: dict[str, Any]
    sock_path = None
    if transport == "unix":
        sock_path = Path(workdir) / f"{name}.sock"
        where = {"unix": str(sock_path)}
    else:
        where = {"host": host, "port": port}
    srv = Server([exp], handshake_timeout=30, **where, **server_kw)
    srv.start()
    try:
        if transport == "unix":
            yield Own(name, srv, export, size, socket=sock_path)
        else:
            yield Own(name, srv, export, size, host=host, port=int(srv.address[1]))
    finally:
        srv.stop(timeout=5)


def free_loopback(port: int) -> str:
    """A 127.x.y.z address on which ``port`` is free (e.g. the IANA port 10809, which other agents'
    servers may hold on 127.0.0.1): every 127/8 address is this host's loopback."""
    import random
    for _ in range(20):
        host = f"127.{random.randint(1, 254)}.{random.randint(1, 254)}.{random.randint(2, 254)}"
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
        return host
    raise HarnessError(f"no loopback address with port {port} free")


# --------------------------------------------------------------------------------------------------
# One client run, several steps


@dataclass
class Step:
    """One command of a batch: ``argv`` for a command-line client, ``call`` for the reference client
    (returns what it printed; an exception is a failure)."""

    name: str
    argv: Sequence[str] = ()
    call: Callable[[], str] | None = None


@dataclass
class StepResult:
    rc: int | None
    out: str

    @property
    def ok(self) -> bool:
        return self.rc == 0


def run_steps(runner: Any, steps: Sequence[Step], *, timeout: float = STEP_TIMEOUT) -> dict[str, StepResult]:
    """Run every step in ONE client run (a shell loop in the container, or in-process calls); each
    step's stdout+stderr and exit status.  A run that cannot even start is a harness error."""
    results: dict[str, StepResult] = {}
    inproc = [s for s in steps if s.call is not None]
    for s in inproc:
        try:
            results[s.name] = StepResult(0, s.call())  # type: ignore[misc]
        except UsageError:
            raise                # the step misused the client: ours, a harness error
        except (ClientError, ProtocolError, OSError, ValueError) as e:  # the reference client's answer
            results[s.name] = StepResult(1, f"{type(e).__name__}: {e}")
    shell = [s for s in steps if s.call is None]
    if not shell:
        return results
    lines = []
    for s in shell:
        cmd = " ".join(shlex.quote(a) for a in s.argv)
        lines.append(f"echo {shlex.quote(MARK + ' ' + s.name)}; timeout -s KILL {int(timeout)} {cmd} 2>&1 "
                     f"</dev/null; echo \"{MARK}-rc $?\"")
    script = "\n".join(lines)
    result = runner.run(["sh", "-c", script], timeout * len(shell) + 30)
    if result.timed_out or result.rc in (126, 127):
        raise HarnessError(f"the batch of {len(shell)} client commands did not run (exit {result.rc}, timed out "
                           f"{result.timed_out}): {result.stdout[-500:]} {result.stderr[-500:]}")
    current, buf = None, []
    for line in result.stdout.splitlines():
        if line.startswith(MARK + " "):
            current, buf = line[len(MARK) + 1:], []
        elif line.startswith(MARK + "-rc ") and current is not None:
            rc = int(line.split()[-1])
            results[current] = StepResult(None if rc in (124, 137) else rc, "\n".join(buf))
            current = None
        else:
            buf.append(line)
    missing = [s.name for s in shell if s.name not in results]
    if missing:
        raise HarnessError(f"client batch output lacks steps {missing}: {result.stdout[-800:]}")
    return results


# --------------------------------------------------------------------------------------------------
# Common steps per client kind


def read_step(kind: str, name: str, uri: str, offset: int, length: int, *, tool: str | None = None) -> Step:
    """Connect to ``uri`` and read ``length`` bytes at ``offset`` (the tool's output has them in hex)."""
    if kind == "qemu":
        return Step(name, ["qemu-io", "-f", "raw", "-r", "-c", f"read -v {offset} {length}", uri])
    if kind == "libnbd":
        return Step(name, ["nbdsh", "-u", uri, "-c", f"print('DATA', h.pread({length}, {offset}).hex())",
                           "-c", NBDSH_CLOSE])

    def call() -> str:
        from nbdref.client import Client
        with Client(timeout=15) as c:
            c.connect_uri(uri)
            data = bytes(c.pread(length, offset))
            c.shutdown()
        return "DATA " + data.hex()
    return Step(name, call=call)


def parse_read(kind: str, out: str) -> bytes | None:
    """The bytes a read step printed, None when it printed none."""
    if kind == "qemu":
        from fixtures.peers.qemu_clients import parse_read_dump
        data = parse_read_dump(out)
        return data if data or "read " in out else None
    for line in out.splitlines():
        if line.startswith("DATA "):
            return bytes.fromhex(line.split(" ", 1)[1].strip())
    return None


def size_step(kind: str, name: str, uri: str) -> Step:
    """Connect to ``uri`` and print the export's size (nbdinfo --size / qemu-img info)."""
    if kind == "qemu":
        return Step(name, ["qemu-img", "info", "--output=json", uri])
    if kind == "libnbd":
        return Step(name, ["nbdinfo", "--size", uri])

    def call() -> str:
        from nbdref.client import Client
        from nbdref.uri import parse_uri
        notes = "".join(f"warning: {w}\n" for w in parse_uri(uri).warnings)  # what its parser diagnosed
        with Client(timeout=15) as c:
            c.connect_uri(uri)
            size = c.get_size()
            c.shutdown()
        return f'{notes}"virtual-size": {size}'
    return Step(name, call=call)


def parse_size(out: str) -> int | None:
    import re
    m = re.search(r'"virtual-size":\s*(\d+)', out) or re.fullmatch(r"\s*(\d+)\s*", out.strip().splitlines()[-1]
                                                                     if out.strip() else "")
    return int(m.group(1)) if m else None


# --------------------------------------------------------------------------------------------------
# What the server saw


def client_events(record: Any) -> list[Any]:
    """The events the client sent on one connection, in order."""
    if record.transcript is None:
        return []
    return [e.event for e in record.transcript if e.direction == "C"]


def server_events(record: Any) -> list[Any]:
    if record.transcript is None:
        return []
    return [e.event for e in record.transcript if e.direction == "S"]


def options_sent(record: Any) -> list[int]:
    """The option codes the client sent, in order."""
    from nbdref import events as ev
    return [e.option for e in client_events(record) if isinstance(e, ev.Option)]


def requests_sent(record: Any) -> list[Any]:
    from nbdref import events as ev
    return [e for e in client_events(record) if isinstance(e, ev.Request)]


def opt_name(code: int) -> str:
    from nbdref._constants import Opt
    try:
        return Opt(code).name
    except ValueError:
        return str(code)


def describe(records: Sequence[Any]) -> str:
    """One line per connection: options sent and how it ended (for `observed=`)."""
    return "; ".join(f"#{r.id}: options {[opt_name(o) for o in options_sent(r)]}, {len(requests_sent(r))} "
                     f"request(s), ended: {r.reason}" for r in records) or "no connection"


def settle(seconds: float = 0.2) -> None:
    """Give the server's connection threads a moment to record a client's last bytes."""
    time.sleep(seconds)


def runner_for(request: Any, kind: str) -> Any:
    """The client peer's runner (docker exec / local), None for the in-process reference client."""
    return None if kind == "nbdref" else request.getfixturevalue("client_runner")


def read_once(request: Any, kind: str, workdir: Path, verdict: Any, evidence: Any, name: str, offset: int,
              length: int, **server: Any) -> tuple[StepResult, list[Any]]:
    """One read by the client under test from a reference server of its own (``server``: own_server's
    settings), its connections watched: (the read's result, what the server recorded)."""
    runner = runner_for(request, kind)
    with own_server(workdir, name, **server) as own:
        watch_all(verdict, evidence, [own])
        res = run_steps(runner, [read_step(kind, "read", own.uri(), offset, length)])["read"]
        records = own.records()
    return res, records


def watch_all(verdict: Any, evidence: Any, owns: Sequence[Own]) -> None:
    """Judge every connection each server recorded (its core's violations), transcripts as evidence."""
    for own in owns:
        verdict.watch(own.watch)
        evidence.add(f"reference server '{own.name}' transcript", lambda o=own: o.watch.transcript)


def metadata_order(records: Sequence[Any]) -> list[str]:
    """Breaches of the metadata order on these connections: BLOCK_STATUS without an earlier
    SET_META_CONTEXT (BS-001), SET_META_CONTEXT before structured replies or extended headers were
    acknowledged (BS-006 / EXT-009).  Empty when the order was right."""
    from nbdref import events as ev
    from nbdref._constants import Cmd, Opt
    bad: list[str] = []
    for r in records:
        replies = meta_set = False
        pending: int | None = None
        for entry in r.transcript or []:
            e = entry.event
            if entry.direction == "C" and isinstance(e, ev.Option):
                pending = e.option
                if e.option == Opt.SET_META_CONTEXT:
                    meta_set = True
                    if not replies:
                        bad.append(f"#{r.id}: SET_META_CONTEXT before structured replies / extended headers")
            elif entry.direction == "S" and isinstance(e, ev.RepAck) and pending in (Opt.STRUCTURED_REPLY,
                                                                                    Opt.EXTENDED_HEADERS):
                replies = True
            elif entry.direction == "C" and isinstance(e, ev.Request) and e.command == Cmd.BLOCK_STATUS \
                    and not meta_set:
                bad.append(f"#{r.id}: BLOCK_STATUS without SET_META_CONTEXT")
    return bad


def judge_write_payload_len(verdict: Any, watch: Any) -> None:
    """With extended headers every NBD_CMD_WRITE carries NBD_CMD_FLAG_PAYLOAD_LEN (EXT-002, restated as
    EXT-042); judged on each connection that agreed to them."""
    from nbdref import events as ev
    from nbdref._constants import Cmd, CmdFlag, Opt
    for r in watch.records():
        agreed = any(isinstance(e.event, ev.RepAck) and e.event.option == Opt.EXTENDED_HEADERS
                     for e in r.transcript or [] if e.direction == "S")
        writes = [q for q in requests_sent(r) if q.command == Cmd.WRITE]
        if not agreed or not writes:
            continue
        bare = [f"{q.offset}+{q.length}" for q in writes if not q.flags & CmdFlag.PAYLOAD_LEN]
        verdict.expect(not bare, "EXT-002", "EXT-042", expected="NBD_CMD_FLAG_PAYLOAD_LEN on every extended WRITE",
                       observed=f"{len(bare)} of {len(writes)} WRITEs without it: {', '.join(bare[:4])}"
                       if bare else f"all {len(writes)} WRITEs carry it")


def flush_before_write_replies(records: Sequence[Any]) -> list[str]:
    """FLUSHes that arrived (on any connection) while a WRITE that arrived earlier (on any connection)
    still had no reply: what MC-001 forbids a multi-connection client.  From the server's timelines."""
    from nbdref._constants import Cmd
    writes: list[tuple[int, int | None, int]] = []   # (arrived, replied, connection)
    flushes: list[tuple[int, int]] = []
    for r in records:
        arrived: dict[int, int] = {}
        for t, way, cmd, cookie in getattr(r, "timeline", ()):
            if way == "C" and cmd == Cmd.WRITE:
                arrived[cookie] = t
            elif way == "C" and cmd == Cmd.FLUSH:
                flushes.append((t, r.id))
            elif way == "S" and cmd == Cmd.WRITE and cookie in arrived:
                writes.append((arrived.pop(cookie), t, r.id))
        writes.extend((t, None, r.id) for t in arrived.values())
    bad = []
    for t_flush, where in flushes:
        unanswered = [w for w in writes if w[0] < t_flush and (w[1] is None or w[1] > t_flush)]
        if unanswered:
            bad.append(f"FLUSH on #{where} with {len(unanswered)} earlier WRITE(s) unanswered "
                       f"(e.g. on #{unanswered[0][2]})")
    return bad


def overlapping_connections(records: Sequence[Any]) -> list[str]:
    """Pairs of connections whose data requests overlapped in time (commands spread over connections)."""
    spans = []
    for r in records:
        times = [t for t, way, cmd, _ in getattr(r, "timeline", ()) if way == "C" and cmd != 2]  # not DISC
        if times:
            spans.append((min(times), max(times), r.id))
    spans.sort()
    out, last = [], None            # last: the span that reaches furthest so far
    for span in spans:
        if last is not None and span[0] < last[1]:
            out.append(f"#{last[2]} and #{span[2]}")
        if last is None or span[1] > last[1]:
            last = span
    return out
