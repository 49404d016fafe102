"""Faults are the server's breach, never the client's: a correct client that gives up on a broken server
is not charged with a violation, and a stalled connection ends when the client leaves."""

from __future__ import annotations

import threading
import time

import pytest
from nbdref import faults
from nbdref._constants import Cmd
from nbdref.client import Client
from nbdref.server import Export

from . import rawclient as rc

MiB = 1 << 20

# Stalls get a parameter the test would notice (the client times out after 1 s).
_SPECS = [f"{name}:30" if name.startswith("stall-") else name for name in faults.FAULTS]


@pytest.mark.parametrize("structured", [True, False], ids=["sr", "simple"])
@pytest.mark.parametrize("spec", _SPECS)
def test_correct_client_is_not_blamed_for_a_fault(serve, spec, structured):
    s = serve([Export.memory("exp", MiB)], fault=spec, io_timeout=5)
    c = Client(timeout=1)
    c.set_request_structured_replies(structured)
    c.set_request_extended_headers(False)
    try:
        c.connect_uri(s.uri)
        c.pread(4096, 0)
        c.shutdown()  # the fault did not apply to this negotiation: a clean NBD_CMD_DISC
    except Exception as e:  # the client gives up however it likes: that is the point
        print(f"{spec}: client gave up: {e!r}")
    finally:
        c.close()
    assert s.wait_closed(8), f"{spec}: the connection did not end after the client left"
    got = [(r.reason, [str(v) for v in r.violations]) for r in s.records if r.violations]
    assert not got, f"{spec}: client blamed: {got}"


@pytest.mark.parametrize("spec", ["stall-handshake", "stall-reply"])
def test_stall_ends_when_the_client_leaves(serve, spec):
    s = serve([Export.memory("exp", MiB)], fault=spec, io_timeout=5)  # default: stall for 3600 s
    c = Client(timeout=1)
    with pytest.raises(Exception):  # noqa: B017 - a timeout, however the client reports it
        c.connect_uri(s.uri)
        c.pread(512, 0)
    c.close()
    t0 = time.monotonic()
    (rec,) = s.wait_for_connections(1)
    assert rec.ended.wait(5), f"{spec}: record still open {time.monotonic() - t0:.1f} s after the client left"
    assert rec.reason, rec
    assert not rec.violations, [str(v) for v in rec.violations]


def test_fault_is_applied_once_under_concurrency(serve, monkeypatch):
    """Four READs on four workers race for the one fault use: exactly one wins."""
    calls: list[int] = []
    lock = threading.Lock()

    def builder(ctx: faults.ReplyContext) -> bytes | None:
        with lock:
            calls.append(ctx.cookie)
        return None  # then the normal reply goes out

    real_applies = faults.Fault.applies

    def slow_applies(self, command: int, structured: bool) -> bool:
        time.sleep(0.2)  # widen the window between "not used yet" and "used"
        return real_applies(self, command, structured)

    monkeypatch.setattr(faults.Fault, "applies", slow_applies)
    fault = faults.Fault(name="count", description="counts its uses", builder=builder)
    s = serve([Export.memory("exp", MiB)], fault=fault, workers=4, io_timeout=5)
    c = rc.pair(s)
    rc.handshake(c)
    c.sendall(b"".join(rc.request(Cmd.READ, 0, 512, cookie=i) for i in range(1, 5)))
    for _ in range(4):
        err, _cookie = rc.simple_reply(c)
        assert err == 0
        rc.recv_exact(c, 512)
    c.close()
    assert len(calls) == 1, calls


def test_structured_unnegotiated_only_without_structured_replies():
    f = faults.get("structured-unnegotiated")
    assert f is not None
    assert f.applies(Cmd.READ, structured=False)
    assert not f.applies(Cmd.READ, structured=True)
    assert faults.get("wrong-reply-magic").applies(Cmd.READ, structured=True)  # type: ignore[union-attr]


def test_fast_zero_on_tmpfs_file_export_is_refused(serve):
    """WRITE_ZEROES with FAST_ZERO|NO_HOLE on tmpfs (no FALLOC_FL_ZERO_RANGE): NBD_ENOTSUP, data intact."""
    import os
    import shutil
    import tempfile

    from nbdref._constants import CmdFlag, Err
    from nbdref.client import ClientError

    if not os.path.isdir("/dev/shm") or not os.access("/dev/shm", os.W_OK):
        pytest.skip("no writable /dev/shm")
    d = tempfile.mkdtemp(prefix="nbdref-fz-", dir="/dev/shm")
    try:
        s = serve([Export.file("exp", os.path.join(d, "disk.img"), size=MiB)])
        with Client(timeout=5) as c:
            c.connect_uri(s.uri)
            assert c.can_fast_zero()
            c.pwrite(b"a" * 8192, 0)
            for _ in range(2):  # the first refusal comes from zero(), later ones from fast_zero_possible
                with pytest.raises(ClientError) as info:
                    c.zero(8192, 0, CmdFlag.FAST_ZERO | CmdFlag.NO_HOLE)
                assert info.value.errno == Err.ENOTSUP
                assert c.pread(8192, 0) == b"a" * 8192
            c.zero(8192, 0, CmdFlag.NO_HOLE)  # without FAST_ZERO the server writes the zeroes
            assert c.pread(8192, 0) == bytes(8192)
            c.shutdown()
        assert s.wait_closed(5) and not s.violations
    finally:
        shutil.rmtree(d, ignore_errors=True)
