"""Every Docker client peer of matrix.yaml (qemu-io/qemu-img, nbdinfo/nbdcopy/nbdsh x 4 suites) against the
in-process reference server, which checks every client-bound rule on the wire.

The server listens on a Unix socket under the run dir, which client containers mount at the same path.
Each test runs real tools, checks what they report against the export's known content, and then asserts
that the server recorded no MUST-level breach by the client on any connection the test made.  Whether the
client asked for extended headers (libnbd >= 1.18, qemu >= 8.2 request them) is read from the server's
transcript and judged against the timeline.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from nbdref import events as ev
from nbdref._constants import Opt
from nbdref.client import Client
from nbdref.server import Export, Server

from fixtures.exports import ExportRequest, expected_bytes, materialize
from fixtures.launch import ClientRunner, client_runner, export_workdir
from fixtures.launchers.base import RunningServer
from fixtures.peers.libnbd_clients import NBDSH_CLOSE
from fixtures.peerspec import PeerSpec
from fixtures.timeline import parse_version
from tests.interop.helpers import DOCKER_CLIENTS, Observer, observer_for, require_docker, uses_tool

MiB = 1 << 20
EXPORT = ExportRequest(name="exp", size=4 * MiB, content="pattern", description="nbdref interop export")
REGION = 64 * 1024                      # each writing test owns a region of its own, per client peer
TOOL_TIMEOUT = 60


@dataclass
class Reference:
    """The in-process server and a RunningServer view of it (what ClientRunner.tool_argv aims at)."""

    server: Server
    running: RunningServer


@pytest.fixture(scope="module")
def reference() -> Iterator[Reference]:
    workdir = export_workdir("ref-interop")
    disk = materialize(EXPORT, workdir)
    sock = workdir / "nbd.sock"
    export = Export.file(EXPORT.name, disk, description=EXPORT.description or "", bitmaps=("b0",))
    server = Server([export], persona="nbdref", unix=str(sock))
    server.start()
    running = RunningServer(spec=None, export=EXPORT, uri=f"nbd+unix:///{EXPORT.name}?socket={sock}",
                            export_name=EXPORT.name, transport="unix", socket=sock, host=None, port=None,
                            log_path=workdir / "server.log", workdir=workdir, disk=disk)
    try:
        yield Reference(server, running)
    finally:
        server.stop(timeout=5)


@pytest.fixture(scope="module")
def runner(docker_client_spec: PeerSpec) -> Iterator[ClientRunner]:
    require_docker(docker_client_spec)
    with client_runner(docker_client_spec, workdir=export_workdir(f"cl-{docker_client_spec.implementation}")) as r:
        yield r


@pytest.fixture
def observe(request: pytest.FixtureRequest, docker_client_spec: PeerSpec) -> Observer:
    return observer_for(request, docker_client_spec)


class Session:
    """The reference server's connections made during one test, judged when the test is done."""

    def __init__(self, ref: Reference, peer: PeerSpec) -> None:
        self.ref, self.peer = ref, peer
        self.first = len(ref.server.records)

    def records(self) -> list[Any]:
        records = list(self.ref.server.records)[self.first:]
        for record in records:
            assert record.wait(15), f"{self.peer.id}: a connection did not end: {record.reason}"
        return records

    def extended_headers(self) -> bool | None:
        """Did any connection agree to extended headers (the server ACKed NBD_OPT_EXTENDED_HEADERS)?
        None when no connection got as far as the option phase."""
        records = self.records()
        if not records:
            return None
        return any(isinstance(e.event, ev.RepAck) and e.event.option == Opt.EXTENDED_HEADERS
                   for r in records for e in r.transcript if e.direction == "S")

    def judge(self) -> None:
        """The reference server recorded no violation at all (any level) on this test's connections."""
        records = self.records()
        assert records, f"{self.peer.id}: no connection reached the reference server"
        seen = [f"connection {r.id}: {v}" for r in records for v in r.violations]
        assert not seen, f"{self.peer.id} broke the spec against the reference server: {seen}"


@pytest.fixture
def session(reference: Reference, docker_client_spec: PeerSpec) -> Session:
    return Session(reference, docker_client_spec)


def region_of(spec: PeerSpec, index: int) -> int:
    """A region no other test and no other client peer writes: peers are numbered in matrix order."""
    return (4 * DOCKER_CLIENTS.index(spec) + index) * REGION + 16 * REGION


def server_bytes(ref: Reference, offset: int, length: int) -> bytes:
    """What the reference server now holds, read through a fresh strict reference client."""
    with Client(timeout=10) as c:
        c.connect_uri(ref.running.uri)
        return c.pread(length, offset)


def ok(result: Any, session: Session | None = None) -> Any:
    """``result`` if the tool succeeded; else fail with its output and why the server's connections ended."""
    if not result.ok:
        why = [f"{r.reason} {[str(v) for v in r.violations]}" for r in session.records()] if session else []
        pytest.fail(f"{result.argv} failed ({result.rc}): {result.stdout[-1000:]} {result.stderr[-1000:]}; "
                    f"server: {why}")
    return result


# ---------------------------------------------------------------------------------------------- qemu

def _qemu_dump(stdout: str) -> bytes:
    """Bytes of qemu-io's ``read -v`` dump ("00000000:  6e 62 64 ...  nbd...")."""
    out = []
    for line in stdout.splitlines():
        if re.match(r"^[0-9a-f]{8}:", line):
            out += [b for b in line.split(":", 1)[1].split("  ")[1].split() if re.fullmatch(r"[0-9a-f]{2}", b)]
    return bytes.fromhex("".join(out))


# "Every implementation MUST support NOTLS mode" (INTEROP-002); the handshake and every READ are checked
# by the server's core against the client-bound rules.
@pytest.mark.req("INTEROP-002", "RD-008", "BSZ-005")
@uses_tool("qemu-io")
def test_qemu_read(runner: ClientRunner, reference: Reference, session: Session, observe: Observer,
                   docker_client_spec: PeerSpec) -> None:
    argv = runner.tool_argv("qemu-img", reference.running, "info", "--output=json")
    info = json.loads(ok(runner.run(argv, TOOL_TIMEOUT), session).stdout)
    assert info["virtual-size"] == EXPORT.size
    offset = 3 * MiB + 512
    argv = runner.tool_argv("qemu-io", reference.running, "-c", f"read -v {offset} 1024")
    read = ok(runner.run(argv, TOOL_TIMEOUT), session)
    assert _qemu_dump(read.stdout) == expected_bytes(EXPORT, offset, 1024)
    session.judge()
    observe.judge("NBD_OPT_EXTENDED_HEADERS", bool(session.extended_headers()))


# Zeroes, discards and flushes as qemu sends them: FLUSH "offset and length are reserved and must be zero"
# (FLUSH-004), no FAST_ZERO/TRIM unless advertised (WZ-004, TRIM-006): the server checks each request.
@pytest.mark.req("FLUSH-004", "WZ-004", "TRIM-006", "FUA-003")
@uses_tool("qemu-io")
def test_qemu_zero_discard_flush(runner: ClientRunner, reference: Reference, session: Session,
                                 docker_client_spec: PeerSpec) -> None:
    z, d = (region_of(docker_client_spec, i) for i in (1, 2))
    cmds = [f"write -z {z} 64k", f"discard {d} 64k", "flush", f"write -z -f {z} 4k"]      # -f: FUA
    argv = runner.tool_argv("qemu-io", reference.running, *(a for c in cmds for a in ("-c", c)), read_only=False)
    result = ok(runner.run(argv, TOOL_TIMEOUT), session)
    assert "failed" not in result.stdout, result.stdout
    assert server_bytes(reference, z, REGION) == bytes(REGION)
    session.judge()


# Client peers seen to send an extended WRITE without NBD_CMD_FLAG_PAYLOAD_LEN: implementation -> first
# version.  The ext-header draft (e6f3b94): "The command NBD_CMD_WRITE MUST use the flag
# NBD_CMD_FLAG_PAYLOAD_LEN in this mode" (EXT-002, binds the client).  qemu >= 8.2 (block/nbd.c) sends
# WRITE with flags 0 or FUA only; qemu-nbd 11.1 accepts such WRITEs and reads length bytes of data, as a
# write "always sends a payload of the length given".  The reference server does the same: it records
# EXT-002 (a MUST; its server runs with no fatal levels) and serves the write.
EXT002_BREAKERS: dict[str, tuple[int, ...]] = {"qemu-io": (8, 2)}


# "With extended headers, NBD_CMD_WRITE must carry NBD_CMD_FLAG_PAYLOAD_LEN" (EXT-002); without them,
# the WRITE header is followed by exactly length bytes (WR-002).
@pytest.mark.req("WR-002", "EXT-002")
@uses_tool("qemu-io")
def test_qemu_write(runner: ClientRunner, reference: Reference, session: Session, observe: Observer,
                    docker_client_spec: PeerSpec) -> None:
    w = region_of(docker_client_spec, 0)
    cmds = [f"write -P 0xa5 {w} 64k", f"write -f -P 0x3c {w + 4096} 4k"]
    argv = runner.tool_argv("qemu-io", reference.running, *(a for c in cmds for a in ("-c", c)), read_only=False)
    result = ok(runner.run(argv, TOOL_TIMEOUT), session)
    assert "failed" not in result.stdout, result.stdout
    assert server_bytes(reference, w, 4096) == b"\xa5" * 4096
    assert server_bytes(reference, w + 4096, 4096) == b"\x3c" * 4096
    first = EXT002_BREAKERS.get(docker_client_spec.implementation)
    if first is not None and parse_version(docker_client_spec.version) >= first and session.extended_headers():
        # The writes were served, and EXT-002 (one per WRITE) is all the server holds against qemu-io.
        ids = [v.req_id for r in session.records() for v in r.violations]
        observe("WRITE (extended)", f"served; recorded {sorted(set(ids))}")
        assert ids and set(ids) == {"EXT-002"}, \
            f"expected only EXT-002 (qemu now sets PAYLOAD_LEN? update EXT002_BREAKERS): saw {ids}"
        return
    observe("WRITE", "ok")
    session.judge()


# qemu-img map asks NBD_CMD_BLOCK_STATUS for base:allocation: "A client must not send
# NBD_CMD_BLOCK_STATUS unless it selected at least one context" (BS-003); the map covers the export.
@pytest.mark.req("BS-001", "BS-003", "BS-006", "EXT-009")
@uses_tool("qemu-io")
def test_qemu_img_map(runner: ClientRunner, reference: Reference, session: Session,
                      docker_client_spec: PeerSpec) -> None:
    argv = runner.tool_argv("qemu-img", reference.running, "map", "--output=json")
    result = ok(runner.run(argv, TOOL_TIMEOUT), session)
    extents = json.loads(result.stdout)
    assert sum(e["length"] for e in extents) == EXPORT.size
    assert extents[0]["start"] == 0
    session.judge()


# ---------------------------------------------------------------------------------------------- libnbd

# nbdinfo uses NBD_OPT_INFO (or GO) with NBD_INFO_* requests, NBD_OPT_LIST with --list, and
# base:allocation block status with --map; the server checks each option and request.
@pytest.mark.req("GO-011", "BSZ-001", "OPT-017", "BS-003")
@uses_tool("nbdinfo")
def test_nbdinfo(runner: ClientRunner, reference: Reference, session: Session, observe: Observer,
                 docker_client_spec: PeerSpec) -> None:
    info = json.loads(ok(runner.run(runner.tool_argv("nbdinfo", reference.running, "--json"), TOOL_TIMEOUT), session).stdout)
    export = info["exports"][0]
    assert export["export-size"] == EXPORT.size
    if "description" in export:
        assert export["description"] == EXPORT.description
    listing = ok(runner.run(runner.tool_argv("nbdinfo", reference.running, "--list"), TOOL_TIMEOUT), session).stdout
    assert "export=" in listing or EXPORT.name in listing
    mapped = ok(runner.run(runner.tool_argv("nbdinfo", reference.running, "--map"), TOOL_TIMEOUT), session).stdout
    rows = [line.split() for line in mapped.splitlines() if line.strip()]
    assert sum(int(r[1]) for r in rows) == EXPORT.size, mapped
    session.judge()
    observe.judge("NBD_OPT_EXTENDED_HEADERS", bool(session.extended_headers()))


NBDSH_SCRIPT = """
import json
out = {{"extended": h.get_extended_headers_negotiated() if hasattr(h, "get_extended_headers_negotiated") else None,
       "structured": h.get_structured_replies_negotiated()}}
h.pwrite(b"\\x77" * 65536, {w})
if h.can_fua():
    h.pwrite(b"\\x66" * 4096, {w} + 4096, nbd.CMD_FLAG_FUA)
if h.can_zero():
    h.zero(65536, {z})
if h.can_trim():
    h.trim(65536, {t})
if h.can_cache():
    h.cache(65536, {w})
if h.can_flush():
    h.flush()
seen = []
h.block_status(65536, {w}, lambda ctx, off, entries, err: seen.append((ctx, list(entries))))
out["block_status"] = seen
out["read"] = h.pread(16, {w}).hex()
print(json.dumps(out))
"""


# libnbd through its API: every command the reference server advertises, plus block status; with
# extended headers (libnbd >= 1.18) the WRITEs must carry PAYLOAD_LEN (EXT-002), and the server checks
# that no flag is used it did not advertise (FUA-003, WZ-004, TRIM-006, CACHE-006).
@pytest.mark.req("WR-002", "EXT-002", "FLUSH-004", "TRIM-006", "BS-003", "EXT-014")
@uses_tool("nbdinfo")
def test_nbdsh_commands(runner: ClientRunner, reference: Reference, session: Session, observe: Observer,
                        docker_client_spec: PeerSpec) -> None:
    w, z, t = (region_of(docker_client_spec, i) for i in range(3))
    script = NBDSH_SCRIPT.format(w=w, z=z, t=t)
    connect = f"h.add_meta_context('base:allocation'); h.connect_uri({reference.running.uri!r})"
    argv = ["nbdsh", "-c", connect, "-c", script, "-c", NBDSH_CLOSE]
    out = json.loads(ok(runner.run(argv, TOOL_TIMEOUT), session).stdout.strip().splitlines()[-1])
    assert out["read"] == (b"\x77" * 16).hex()
    assert [ctx for ctx, _ in out["block_status"]] == ["base:allocation"]
    assert server_bytes(reference, w + 4096, 16) == b"\x66" * 16
    assert server_bytes(reference, z, REGION) == bytes(REGION)
    session.judge()
    if out["extended"] is not None:
        assert bool(out["extended"]) == bool(session.extended_headers())
    observe("nbdsh", {"extended": out["extended"], "structured": out["structured"]})


# nbdcopy writes a whole image with many requests in flight (and several connections when the server
# offers NBD_FLAG_CAN_MULTI_CONN), then reads it back: every request is checked by the server.
@pytest.mark.req("WR-002", "MC-001", "MC-003", "RD-008")
@uses_tool("nbdinfo")
def test_nbdcopy_round_trip(runner: ClientRunner, reference: Reference, session: Session,
                            docker_client_spec: PeerSpec) -> None:
    src = Path(reference.running.workdir) / f"src-{docker_client_spec.suite}.raw"
    # The whole export is rewritten with its own content (pattern), so other tests' expectations hold
    # except in the regions they wrote; nbdcopy is told to copy exactly the export's size.
    src.write_bytes(server_bytes(reference, 0, EXPORT.size))
    ok(runner.run(runner.tool_argv("nbdcopy", reference.running, str(src), "{uri}"), TOOL_TIMEOUT), session)
    back = Path(reference.running.workdir) / f"back-{docker_client_spec.suite}.raw"
    ok(runner.run(runner.tool_argv("nbdcopy", reference.running, "{uri}", str(back)), TOOL_TIMEOUT), session)
    assert back.read_bytes() == src.read_bytes()
    session.judge()
