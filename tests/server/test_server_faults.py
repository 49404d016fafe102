"""Fault injection: the server breaks the protocol exactly as the named fault says, and real clients
(libnbd, and the reference client with requirement ids) notice."""

from __future__ import annotations

import shutil
import struct

import pytest
from nbdref.server import Export

from . import rawclient as rc
from .conftest import NBDSH, run

MiB = 1 << 20
needs_nbdsh = pytest.mark.skipif(not shutil.which("nbdsh"), reason="libnbd-bin not installed")


def _server(serve, fault: str):
    return serve([Export.memory("exp", MiB)], fault=fault, io_timeout=5)


def test_wrong_greeting_magic(serve):
    c = rc.pair(_server(serve, "wrong-greeting-magic"))
    greeting = rc.recv_exact(c, 18)
    assert greeting[:8] != b"NBDMAGIC" and greeting[8:16] == b"IHAVEOPT"
    c.close()


@pytest.mark.parametrize("n", [0, 5, 17, 30])
def test_disconnect_at_byte_n_of_handshake(serve, n):
    s = _server(serve, f"disconnect-handshake:{n}")
    c = rc.pair(s)
    got = b""
    if n >= 18:  # past the greeting: ask for an export so that option replies follow
        c.sendall(struct.pack(">I", 3) + rc.option(7, struct.pack(">I", 3) + b"exp" + struct.pack(">H", 0)))
    while chunk := c.recv(4096):
        got += chunk
    assert len(got) == n  # exactly n bytes of handshake, then EOF
    assert s.records[0].ended.wait(5) and "cut after" in s.records[0].reason
    c.close()


def test_disconnect_at_byte_n_of_reply(serve):
    s = _server(serve, "disconnect-reply:10")
    c = rc.pair(s)
    rc.handshake(c)
    c.sendall(rc.request(0, 0, 4096, cookie=3))
    got = b""
    while chunk := c.recv(4096):
        got += chunk
    assert len(got) == 10 and got[:4] == struct.pack(">I", 0x67446698)
    c.close()
    assert s.records[0].ended.wait(5) and "cut after 10 reply bytes" in s.records[0].reason


def test_stall_reply_never_answers(serve):
    s = _server(serve, "stall-reply:30")
    c = rc.pair(s, timeout=0.5)
    rc.handshake(c)
    c.sendall(rc.request(1, 0, 4, cookie=1) + b"abcd")  # not a READ: answered
    assert rc.simple_reply(c) == (0, 1)
    c.sendall(rc.request(0, 0, 512, cookie=2))
    with pytest.raises(TimeoutError):
        c.recv(1)
    c.close()  # stop() ends the stall promptly (checked by the fixture's teardown not hanging)


def test_unknown_cookie_simple(serve):
    c = rc.pair(_server(serve, "unknown-cookie"))
    rc.handshake(c)
    c.sendall(rc.request(0, 0, 16, cookie=42))
    err, cookie = rc.simple_reply(c)
    assert err == 0 and cookie != 42
    c.close()


def test_structured_reply_without_negotiation(serve):
    c = rc.pair(_server(serve, "structured-unnegotiated"))
    rc.handshake(c, structured=False)
    c.sendall(rc.request(0, 0, 16, cookie=1))
    magic, _flags, rtype, cookie, length = struct.unpack(">IHHQI", rc.recv_exact(c, 20))
    assert magic == 0x668E33EF and rtype == 1 and cookie == 1 and length == 24
    c.close()


@needs_nbdsh
@pytest.mark.parametrize(
    "fault",
    ["chunk-outside-range", "overlapping-chunks", "error-chunk-bad-message-length", "oversize-length",
     "wrong-reply-magic", "unknown-cookie"],
)
def test_libnbd_rejects_broken_read_replies(serve, fault):
    s = _server(serve, fault)
    script = """
import nbd
try:
    h.pread(4096, 0)
except nbd.Error as e:
    print("refused:", e)
else:
    print("accepted")
"""
    out = run([*NBDSH, "-u", s.uri, "-c", script], check=False, timeout=30)
    assert "accepted" not in out.stdout, (fault, out.stdout, out.stderr)


def test_reference_client_names_the_broken_rule(serve):
    from nbdref.client import Client

    s = _server(serve, "chunk-outside-range")
    c = Client()
    c.set_timeout(5)
    c.connect_uri(s.uri)
    with pytest.raises(Exception):  # noqa: B017 - ClientError or RemoteProtocolError, both fine
        c.pread(4096, 0)
    ids = {v.req_id for v in c.violations}
    c.close()
    assert ids, "the reference client recorded no violation"
    assert any(i.startswith(("SR-", "RD-")) for i in ids), ids


def test_wrong_option_reply_magic(serve):
    c = rc.pair(_server(serve, "wrong-option-reply-magic"))
    rc.recv_exact(c, 18)
    c.sendall(struct.pack(">I", 3) + rc.option(3))  # NBD_OPT_LIST
    magic = struct.unpack(">Q", rc.recv_exact(c, 8))[0]
    assert magic != rc.OPT_REPLY_MAGIC
    c.close()


@pytest.mark.parametrize(("fault", "rtype", "done"), [("missing-done", 1, 0), ("error-chunk-zero-error", 0x8001, 1)])
def test_structured_chunk_faults(serve, fault, rtype, done):
    c = rc.pair(_server(serve, fault))
    rc.handshake(c, structured=True)
    c.sendall(rc.request(0, 0, 512, cookie=4))
    magic, flags, got_type, cookie, length = struct.unpack(">IHHQI", rc.recv_exact(c, 20))
    payload = rc.recv_exact(c, length)
    assert (magic, got_type, cookie, flags & 1) == (0x668E33EF, rtype, 4, done)
    if fault == "error-chunk-zero-error":
        assert struct.unpack(">I", payload[:4])[0] == 0
    c.close()
