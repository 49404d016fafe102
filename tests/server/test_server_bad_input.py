"""Bad client input: a spec reply or a clean disconnect with a reason, never a crash, hang or spin,
and never an effect on other connections."""

from __future__ import annotations

import struct
import time

import pytest
from nbdref.server import Export

from . import rawclient as rc

MiB = 1 << 20
EINVAL, EPERM, ENOSPC = 22, 1, 28


@pytest.fixture
def server(serve):
    return serve([Export.memory("exp", MiB), Export.memory("ro", MiB, read_only=True)], io_timeout=5)


def _still_serves(server) -> None:
    c = rc.pair(server)
    rc.handshake(c)
    c.sendall(rc.request(0, 0, 512, cookie=9))
    assert rc.simple_reply(c) == (0, 9)
    rc.recv_exact(c, 512)
    c.sendall(rc.request(2))
    assert rc.closed(c)
    c.close()


def _ended(server, index: int = -1, timeout: float = 5):
    rec = server.records[index]
    assert rec.ended.wait(timeout), "connection did not end"
    return rec


@pytest.mark.parametrize("flags", [0xFFFFFFFF, 0x100])
def test_unknown_client_flags_disconnect(server, flags):
    c = rc.pair(server)
    rc.recv_exact(c, 18)
    c.sendall(struct.pack(">I", flags))
    assert rc.closed(c)
    assert "client flags" in _ended(server).reason or _ended(server).violations
    _still_serves(server)


def test_bad_option_magic(server):
    c = rc.pair(server)
    rc.recv_exact(c, 18)
    c.sendall(struct.pack(">I", 3) + b"GARBAGE!" + bytes(8))
    assert rc.closed(c)
    assert _ended(server).reason
    _still_serves(server)


def test_truncated_option_then_eof(server):
    c = rc.pair(server)
    rc.recv_exact(c, 18)
    c.sendall(struct.pack(">I", 3) + rc.option(7, b"\0\0", length=100))
    c.shutdown(1)
    assert rc.closed(c)
    assert "closed" in _ended(server).reason
    _still_serves(server)


def test_option_length_4gib_is_refused_without_allocating(server):
    c = rc.pair(server)
    rc.recv_exact(c, 18)
    t0 = time.monotonic()
    c.sendall(struct.pack(">I", 3) + rc.option(3, length=0xFFFFFFFF))
    assert rc.closed(c)
    rec = _ended(server)
    assert time.monotonic() - t0 < 3 and rec.reason
    _still_serves(server)


def test_list_with_data_gets_err_invalid(server):
    c = rc.pair(server)
    rc.recv_exact(c, 18)
    c.sendall(struct.pack(">I", 3) + rc.option(3, b"junk"))
    assert rc.read_option_reply(c)[1] == 0x80000003  # NBD_REP_ERR_INVALID
    c.sendall(rc.option(2))  # NBD_OPT_ABORT
    assert rc.read_option_reply(c)[1] == 1
    assert rc.closed(c)


def test_unknown_export_and_unknown_option(server):
    c = rc.pair(server)
    rc.recv_exact(c, 18)
    c.sendall(struct.pack(">I", 3) + rc.option(7, struct.pack(">I", 4) + b"nope" + struct.pack(">H", 0)))
    assert rc.read_option_reply(c)[1] == 0x80000006  # NBD_REP_ERR_UNKNOWN
    c.sendall(rc.option(0x1234))
    assert rc.read_option_reply(c)[1] == 0x80000001  # NBD_REP_ERR_UNSUP
    c.sendall(rc.option(1, b"nope"))  # EXPORT_NAME of an unknown export: "MUST terminate"
    assert rc.closed(c)
    assert "unknown export" in _ended(server).reason


@pytest.mark.parametrize(
    ("req", "error"),
    [
        (rc.request(0, 0, 0xFFFFFFFF), EINVAL),               # 4 GiB read with simple replies
        (rc.request(0, 0xFFFFFFFFFFFFFFFF, 4096), EINVAL),    # offset + length overflows 64 bits
        (rc.request(0, MiB - 10, 4096), EINVAL),              # read past the end
        (rc.request(99, 0, 4096), EINVAL),                    # unknown command
        (rc.request(0, 0, 4096, flags=0x8000), EINVAL),       # unknown command flag
        (rc.request(7, 0, 4096), EINVAL),                     # block status without contexts
        (rc.request(4, MiB - 10, 4096), EINVAL),              # trim past the end
        (rc.request(6, MiB - 10, 4096), ENOSPC),              # write zeroes past the end
    ],
    ids=["4gib-read", "offset-overflow", "read-past-end", "unknown-cmd", "unknown-flag", "bs-no-context",
         "trim-past-end", "zero-past-end"],
)
def test_bad_requests_get_spec_errors(server, req, error):
    c = rc.pair(server)
    rc.handshake(c)
    c.sendall(req)
    assert rc.simple_reply(c) == (error, 1)
    _still_serves(server)  # a second connection works while this one is still open
    c.sendall(rc.request(0, 0, 16, cookie=2))
    assert rc.simple_reply(c) == (0, 2)
    rc.recv_exact(c, 16)
    c.close()


def test_write_to_read_only_export_is_eperm(server):
    c = rc.pair(server)
    rc.handshake(c, "ro")
    c.sendall(rc.request(1, 0, 4, cookie=5) + b"abcd")
    assert rc.simple_reply(c) == (EPERM, 5)
    c.close()


def test_huge_write_disconnects_cleanly(server):
    c = rc.pair(server)
    rc.handshake(c)
    c.sendall(rc.request(1, 0, 0xFFFFFFFF))  # 4 GiB payload announced: a denial of service
    assert rc.closed(c)
    assert _ended(server).reason
    _still_serves(server)


def test_garbage_after_disc(server):
    c = rc.pair(server)
    rc.handshake(c)
    c.sendall(rc.request(2) + b"trailing garbage" * 10)
    assert rc.closed(c)
    rec = _ended(server)
    assert "NBD_CMD_DISC" in rec.reason
    _still_serves(server)


def test_silent_client_hits_handshake_limit(serve):
    s = serve(handshake_timeout=0.5)
    c = rc.pair(s)
    rc.recv_exact(c, 18)
    assert rc.closed(c)
    assert "handshake not finished" in _ended(s).reason
    c.close()


def test_handshake_limit_can_be_switched_off(serve):
    s = serve(handshake_timeout=None, io_timeout=0.3)
    c = rc.pair(s)
    rc.recv_exact(c, 18)
    time.sleep(1.0)
    assert not s.records[0].ended.is_set()
    c.sendall(struct.pack(">I", 3) + rc.option(2))
    assert rc.read_option_reply(c)[1] == 1
    c.close()


def test_oversize_structured_read_is_eoverflow(serve):
    s = serve([Export.memory("exp", 128 * MiB)])
    c = rc.pair(s)
    rc.handshake(c, structured=True)
    c.sendall(rc.request(0, 0, 64 * MiB, cookie=3))
    magic, flags, rtype, cookie, length = struct.unpack(">IHHQI", rc.recv_exact(c, 20))
    err, _msglen = struct.unpack(">IH", rc.recv_exact(c, 6))
    rc.recv_exact(c, length - 6)
    assert (magic, rtype, cookie, flags & 1, err) == (0x668E33EF, 0x8001, 3, 1, 75)  # NBD_EOVERFLOW
    c.close()


def test_each_violation_and_disconnect_is_logged(server, caplog):
    caplog.set_level("INFO", logger="nbdref.server")
    c = rc.pair(server)
    rc.handshake(c)
    c.sendall(rc.request(3, 4096, 4096, cookie=1))  # FLUSH with offset/length: FLUSH-004
    assert rc.simple_reply(c)[1] == 1
    c.close()
    rec = _ended(server)
    ids = [v.req_id for v in rec.violations]
    assert "FLUSH-004" in ids
    lines = [r.getMessage() for r in caplog.records]
    assert any("FLUSH-004" in line for line in lines), lines
    assert any(f"connection {rec.id} " in line and "closed:" in line for line in lines), lines
