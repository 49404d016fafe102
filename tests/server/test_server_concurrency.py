"""Many connections at once, many requests in flight per connection, replies in any order."""

from __future__ import annotations

import os
import threading

from nbdref.client import Client
from nbdref.server import Export

from .conftest import clean

MiB = 1 << 20


def _worker(uri: str, region: int, errors: list) -> None:
    try:
        c = Client()
        c.set_timeout(10)
        c.connect_uri(uri)
        data = os.urandom(64 * 1024)
        for i in range(8):  # 8 writes in flight
            c.aio_pwrite(data, region + i * len(data))
        c.wait_all()
        bufs = [bytearray(len(data)) for _ in range(8)]
        cookies = [c.aio_pread(b, region + i * len(data)) for i, b in enumerate(bufs)]
        for ck in cookies:
            c.wait(ck)
        assert all(bytes(b) == data for b in bufs)
        c.shutdown()
    except Exception as e:  # collected and asserted in the main thread
        errors.append(repr(e))


def test_many_clients_many_requests(serve):
    s = serve([Export.memory("exp", 16 * MiB)], workers=4)
    errors: list[str] = []
    threads = [threading.Thread(target=_worker, args=(s.uri, i * MiB, errors)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    clean(s, 12)
    assert sum(r.requests for r in s.records) == 12 * 17  # 16 commands + DISC each


def test_replies_can_come_out_of_order(serve, tmp_path):
    """A FLUSH on a file export (fdatasync) takes longer than RAM-fast reads queued behind it."""
    path = tmp_path / "d.img"
    s = serve([Export.file("exp", path, size=64 * MiB)], workers=4)
    c = Client()
    c.set_timeout(10)
    c.connect_uri(s.uri)
    c.pwrite(os.urandom(32 * MiB), 0)
    for i in range(5):
        c.pwrite(os.urandom(4 * MiB), i * 4 * MiB)  # dirty page cache: the fdatasync has work to do
        flush = c.aio_command(3)  # NBD_CMD_FLUSH
        reads = [c.aio_pread(bytearray(512), i * 4096) for i in range(16)]
        c.wait_all()
        assert c.aio_command_completed(flush) and all(c.aio_command_completed(r) for r in reads)
    c.shutdown()
    clean(s)
    wire = [str(e) for e in s.records[0].transcript]
    order = [line.split("cookie=")[1].split()[0] for line in wire if line.startswith("S: ") and "cookie=" in line]
    sent = [line.split("cookie=")[1].split()[0] for line in wire if line.startswith("C: ") and "cookie=" in line]
    sent = [ck for ck in sent if ck in order]
    assert order != sent, "every reply came in request order"
