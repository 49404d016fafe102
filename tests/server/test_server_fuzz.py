"""Property test: random and mutated client byte streams never crash, hang or spin the server.

Each example is one connection over a socketpair to a running in-process server; the client sends its
bytes, half-closes, and drains.  The connection must end with a recorded reason (never an internal
error) within a few seconds, and the server must still serve a well-behaved client afterwards.
"""

from __future__ import annotations

import socket
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nbdref.server import Export, Server

from . import rawclient as rc


def _valid_session() -> bytes:
    name = b"exp"
    out = struct.pack(">I", 3)
    out += rc.option(8)  # structured replies
    q = b"base:allocation"
    out += rc.option(10, struct.pack(">I", 3) + name + struct.pack(">II", 1, len(q)) + q)
    out += rc.option(7, struct.pack(">I", 3) + name + struct.pack(">HH", 1, 3))
    out += rc.request(1, 0, 8, cookie=1) + b"ABCDEFGH"
    out += rc.request(0, 0, 4096, cookie=2)
    out += rc.request(7, 0, 65536, cookie=3)
    out += rc.request(6, 4096, 4096, cookie=4, flags=2)
    out += rc.request(3, cookie=5)
    out += rc.request(2, cookie=6)
    return out


def _valid_extended_session() -> bytes:
    """Extended headers: 32-byte requests, WRITE with PAYLOAD_LEN, block status with a payload."""
    name, q = b"exp", b"base:allocation"
    out = struct.pack(">I", 3) + rc.option(11)
    out += rc.option(10, struct.pack(">I", 3) + name + struct.pack(">II", 1, len(q)) + q)
    out += rc.option(7, struct.pack(">I", 3) + name + struct.pack(">H", 0))

    def ext(cmd: int, cookie: int, offset: int = 0, length: int = 0, flags: int = 0) -> bytes:
        return struct.pack(">IHHQQQ", 0x21E41C71, flags, cmd, cookie, offset, length)

    out += ext(1, 1, 0, 8, flags=0x20) + b"ABCDEFGH"
    out += ext(0, 2, 0, 4096)
    out += ext(7, 3, 0, 12, flags=0x20) + struct.pack(">QI", 65536, 1)
    out += ext(4, 4, 8192, 8192)
    out += ext(2, 5)
    return out


VALID = _valid_session()
SEEDS = [VALID, _valid_extended_session()]


@st.composite
def mutated(draw) -> bytes:
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["flip", "cut", "insert", "dup"]))
        pos = draw(st.integers(0, max(0, len(data) - 1)))
        if kind == "flip" and data:
            data[pos] ^= draw(st.integers(1, 255))
        elif kind == "cut":
            del data[pos : pos + draw(st.integers(1, 40))]
        elif kind == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=40))
        else:
            data[pos:pos] = data[pos : pos + draw(st.integers(1, 40))]
    return bytes(data)


@pytest.fixture(scope="module")
def fuzz_server():
    import shutil
    import tempfile

    d = tempfile.mkdtemp(prefix="nbdfuzz-", dir="/tmp")
    s = Server([Export.memory("exp", 1 << 20)], unix=f"{d}/s.sock", handshake_timeout=5, io_timeout=5).start()
    yield s
    s.stop()
    shutil.rmtree(d, ignore_errors=True)


def _feed(server: Server, data: bytes) -> None:
    c = rc.pair(server, timeout=5)
    try:
        rc.recv_exact(c, 18)  # the greeting
        try:
            c.sendall(data)
            c.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the server already hung up: fine
        assert rc.closed(c), "server neither answered nor closed"
    finally:
        c.close()
    assert all(r.ended.wait(5) for r in server.records), "a connection did not end"
    bad = [r.reason for r in server.records if r.reason.startswith("internal error") or r.error or not r.reason]
    assert not bad, bad


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=mutated())
def test_mutated_sessions(fuzz_server, data):
    _feed(fuzz_server, data)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=300))
def test_random_bytes(fuzz_server, data):
    _feed(fuzz_server, struct.pack(">I", 3) + data)


@pytest.mark.parametrize("seed", range(len(SEEDS)))
def test_unmutated_seeds_are_clean(fuzz_server, seed):
    """The seeds are correct sessions, except that they pipeline NBD_CMD_DISC behind requests still in
    flight ("The client ... SHOULD wait until there are no inflight requests first": DISC-023)."""
    n = len(fuzz_server.records)
    _feed(fuzz_server, SEEDS[seed])
    rec = fuzz_server.records[n]
    assert rec.reason == "client sent NBD_CMD_DISC", rec.reason
    assert {v.req_id for v in rec.violations} <= {"DISC-023"}, rec.violations


def test_server_still_serves_after_fuzzing(fuzz_server):
    c = rc.pair(fuzz_server)
    rc.handshake(c)
    c.sendall(rc.request(0, 0, 8, cookie=7))
    assert rc.simple_reply(c) == (0, 7)
    c.close()
