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


VALID = _valid_session()


@st.composite
def mutated(draw) -> bytes:
    data = bytearray(VALID)
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


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=mutated())
def test_mutated_sessions(fuzz_server, data):
    _feed(fuzz_server, data)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=300))
def test_random_bytes(fuzz_server, data):
    _feed(fuzz_server, struct.pack(">I", 3) + data)


def test_server_still_serves_after_fuzzing(fuzz_server):
    c = rc.pair(fuzz_server)
    rc.handshake(c)
    c.sendall(rc.request(0, 0, 8, cookie=7))
    assert rc.simple_reply(c) == (0, 7)
    c.close()
