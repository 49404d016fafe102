"""Data integrity across clients: what one client writes, every other reads back identical.

All clients meet on one reference server (per test process) whose export ends in a tail that is not
4 KiB-aligned (size = 4 MiB + 1536).  In each case the harness's reference client writes random bytes
over that tail, the client peer must read them back identical (it reads what another client wrote);
the client then writes its own bytes over the tail and over a range that straddles a 4 KiB boundary
at an odd offset, which the reference client must read back identical (another client reads what it
wrote); finally the client copies the whole export and its SHA-256 must equal the server's disk.
Since every client is compared with the same server, what each writes every other reads identical.
The server's core checks every request, e.g. none may reach past the end of the export (BSZ-033).
"""

from __future__ import annotations

import hashlib
import os
import zlib
from collections.abc import Iterator
from typing import Any

import pytest

from fixtures.drivers import driver_for
from fixtures.exports import ExportRequest
from fixtures.judging import HarnessError, ServerWatch
from fixtures.launch import export_workdir
from fixtures.launchers.inprocess import start_reference

SECTION = "Baseline"
MiB = 1 << 20
EXPORT = ExportRequest(name="exp", size=4 * MiB + 1536, content="pattern")
TAIL = 1536                                # the last bytes, after the last 4 KiB boundary
STRADDLE = (2 * MiB - 700, 1400)           # odd offset and length, across a 4 KiB boundary


@pytest.fixture(scope="session")
def integrity_server() -> Iterator[Any]:
    """The reference server the integrity cases share (one per test process)."""
    server = start_reference(EXPORT, workdir=export_workdir("integrity"))
    try:
        yield server
    finally:
        server.stop()


def _ref(server: Any, watch: ServerWatch, fn: Any) -> Any:
    """Run `fn(client)` on the harness's own reference client (not judged as the peer's traffic)."""
    from nbdref.client import Client, ClientError
    with watch.harness_connections():
        try:
            with Client(timeout=10) as c:
                c.connect_uri(server.uri)
                return fn(c)
        except (ClientError, OSError) as e:
            raise HarnessError(f"the harness's reference client failed: {type(e).__name__}: {e}") from e


def _disk(server: Any) -> bytes:
    return bytes(server.handle.exports[0].backend.pread(0, EXPORT.size))


@pytest.mark.req("BSZ-033", "WR-002", "INTEROP-010", "INTEROP-011")
def test_what_one_client_writes_others_read(request: pytest.FixtureRequest, client_peer: Any, integrity_server: Any,
                                  peer_workdir: Any, verdict: Any, evidence: Any) -> None:
    """Reads what another client wrote at the unaligned tail; writes what another client reads back;
    its copy of the whole export has the server's checksum."""
    runner = None if client_peer.launcher == "in-process" else request.getfixturevalue("client_runner")
    driver = driver_for(client_peer, runner, peer_workdir)
    for action in ("read", "write"):
        why = driver.can(action)
        if why:
            verdict.not_applicable(why)
    server = integrity_server
    watch = ServerWatch(server.handle)
    verdict.watch(watch)
    evidence.add("integrity server transcript", lambda: watch.transcript)
    tail = EXPORT.size - TAIL

    theirs = os.urandom(TAIL)
    _ref(server, watch, lambda c: c.pwrite(theirs, tail))
    got = driver.do("read", server, tail, TAIL)
    verdict.expect(got.ok and got.value == theirs, "INTEROP-010", expected=f"the {TAIL} tail bytes another client "
                   "wrote", observed=f"read ok={got.ok}, {len(got.value or b'')} bytes, "
                   f"{'identical' if got.value == theirs else 'different'}; {got.why() if not got.ok else ''}")

    value = 1 + zlib.crc32(client_peer.id.encode()) % 254      # one byte value per client (qemu-io -P)
    for offset, length in ((tail, TAIL), STRADDLE):
        mine = bytes([value]) * length
        put = driver.do("write", server, offset, mine)
        back = _ref(server, watch, lambda c, o=offset, n=length: bytes(c.pread(n, o)))
        verdict.expect(put.ok and back == mine, "INTEROP-011", "WR-002", expected=f"another client reads the {length} bytes "
                       f"written at {offset}", observed=f"write ok={put.ok}; read back "
                       f"{'identical' if back == mine else 'different'}; {put.why() if not put.ok else ''}")

    why = driver.can("copy")
    if why:
        verdict.info(f"no whole-export copy: {why}")
        return
    copy = driver.do("copy", server)
    disk = _disk(server)
    mine_sum = hashlib.sha256(copy.value).hexdigest() if copy.ok else None
    verdict.expect(copy.ok and mine_sum == hashlib.sha256(disk).hexdigest(), "INTEROP-010",
                   expected=f"a copy of all {EXPORT.size} bytes with the server's SHA-256",
                   observed=f"copy ok={copy.ok}, {len(copy.value or b'')} bytes, sha256 {mine_sum}; "
                            f"{copy.why() if not copy.ok else ''}")
    verdict.info(f"copy of {EXPORT.size} bytes in {copy.seconds:.2f} s, sha256 {mine_sum}")
