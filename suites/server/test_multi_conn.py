"""Several requests in flight, and several connections to one export (NBD_FLAG_CAN_MULTI_CONN).

proto.md "Ordering of messages and writes": replies may come in any order and are matched by cookie;
with NBD_FLAG_CAN_MULTI_CONN "the effects of FLUSH and FUA must be visible on all connections by the
time the reply is sent" (MC-002).
"""

from __future__ import annotations

import hashlib

import pytest
from nbdref._constants import CmdFlag
from nbdref._errors import ProtocolError
from nbdref.client import ClientError

from fixtures.exports import expected_bytes

SECTION = "Transmission: ordering of messages and writes"


def pattern(tag: str, length: int) -> bytes:
    return (hashlib.sha256(tag.encode()).digest() * (length // 32 + 1))[:length]


# Many READs and WRITEs in flight on one connection, answered in whatever order the server likes: "Every
# reply must carry the request's cookie unchanged" (CMD-003) -- a reply under the wrong cookie would put
# data into the wrong buffer, or complete a request not in flight (the core refuses such a reply).
@pytest.mark.req("CMD-003", "WR-005", "RD-027")
def test_mixed_requests_in_flight(server_peer, writable_server, writable_export, region, ref_client, verdict):
    """32 READs and WRITEs in flight at once all complete with the right data."""
    c = ref_client(writable_server)
    # 4 KiB each: the client sends everything before it reads a reply, so what the server answers in the
    # meantime must fit in the socket buffers (a 64 KiB READ each would fill them and stall both sides).
    size = 4096
    base = region(16 * size)
    writes = {base + i * size: pattern(f"w{i}", size) for i in range(16)}
    reads = {i * size: bytearray(size) for i in range(16)}        # the first MiB stays as made
    cookies = []
    for (w_off, data), (r_off, buf) in zip(writes.items(), reads.items(), strict=True):
        cookies.append(c.aio_pwrite(data, w_off))
        cookies.append(c.aio_pread(buf, r_off))
    order = []
    while c.aio_in_flight():
        c.poll()
        order.extend(k for k in cookies if k not in order and c.aio_command_completed(k))
    verdict.info(f"{len(cookies)} requests; completion order {'differs from' if order != cookies else 'is'} "
                 f"the sending order")
    for r_off, buf in reads.items():
        verdict.expect(bytes(buf) == expected_bytes(writable_export, r_off, size), "CMD-003", "RD-027",
                       expected=f"READ at {r_off}: the export's bytes", observed="other bytes (a cookie mix-up?)")
    for w_off, data in writes.items():
        verdict.expect(c.pread(size, w_off) == data, "CMD-003", "WR-005",
                       expected=f"WRITE at {w_off} reads back", observed="other bytes")


# NBD_FLAG_CAN_MULTI_CONN: a WRITE on connection A, a FLUSH on A, then a READ on B sees it; a FUA WRITE
# on A is visible on B without a FLUSH (MC-002).  Without the flag the server promises nothing: recorded.
@pytest.mark.req("MC-002")
@pytest.mark.feature("NBD_FLAG_CAN_MULTI_CONN-writable")
def test_multi_conn_consistency(server_peer, writable_server, writable_export, region, ref_client, verdict):
    """With CAN_MULTI_CONN, what A flushed (or wrote with FUA) B reads."""
    a = ref_client(writable_server, name="connection A")
    b = ref_client(writable_server, name="connection B")
    multi = a.can_multi_conn()
    verdict.timeline("NBD_FLAG_CAN_MULTI_CONN-writable", multi, export=writable_export)
    if not multi:
        return
    offset = region(2 * 65536)
    b.pread(65536, offset)              # B has the old data in whatever cache it may have
    data = pattern("flush", 65536)
    a.pwrite(data, offset)
    if a.can_flush():
        a.flush()
        verdict.expect(b.pread(65536, offset) == data, "MC-002", expected="B reads what A wrote and flushed",
                       observed="the old data on B")
    if a.can_fua():
        fua = pattern("fua", 65536)
        b.pread(65536, offset + 65536)
        a.pwrite(fua, offset + 65536, CmdFlag.FUA)
        verdict.expect(b.pread(65536, offset + 65536) == fua, "MC-002",
                       expected="B reads what A wrote with FUA", observed="the old data on B")


# NBD_CMD_DISC with WRITEs still in flight.  "The server MUST handle all outstanding requests" (DISC-025,
# judged by the disconnect suite's owner: the core's judgement of it is left out here) -- qemu-nbd answers
# none of them after DISC and closes; whether it wrote them is recorded.  Every acknowledged WRITE must be
# on the export when a new connection reads it (WR-005).
@pytest.mark.req("WR-005")
def test_disc_with_requests_in_flight(server_peer, writable_server, writable_export, region, ref_client, verdict):
    """DISC after eight WRITEs in flight: the acknowledged ones are on the export, the server serves on."""
    from nbdref import events as ev
    from nbdref._constants import Cmd

    c = ref_client(writable_server, name="writer", allow=("DISC-025",))
    base = region(8 * 4096)
    data = {base + i * 4096: pattern(f"disc{i}", 4096) for i in range(8)}
    cookies = [c.aio_pwrite(blob, off) for off, blob in data.items()]
    conn = c.connection
    c._sendall(conn.send(ev.Request(cookie=conn.next_cookie(), command=Cmd.DISC)))
    acked = set()
    try:
        while c.aio_in_flight():
            c.poll()
    except (ClientError, ProtocolError, OSError) as e:   # the server may close after DISC without answering all
        verdict.info(f"after DISC: {type(e).__name__}: {e}")
    failed = set()
    for entry in c.transcript:
        e = entry.event
        if entry.direction != "S":
            continue
        if isinstance(e, ev.SimpleReply):
            (failed if e.error else acked).add(e.cookie)
        elif isinstance(e, ev.ErrorChunk):
            failed.add(e.cookie)
        elif isinstance(e, ev.Chunk):
            acked.add(e.cookie)
    acked -= failed                     # an error reply (NBD_ESHUTDOWN, say) acknowledges nothing
    verdict.info(f"after DISC: {len(acked)} of 8 WRITEs acknowledged, {len(failed)} failed")
    reader = ref_client(writable_server, name="reader")
    on_disk = sum(reader.pread(4096, off) == blob for off, blob in data.items())
    verdict.info(f"{on_disk} of 8 WRITEs on the export after DISC ({len(acked)} answered)")
    for i, (cookie, (off, blob)) in enumerate(zip(cookies, data.items(), strict=True)):
        if cookie in acked:
            verdict.expect(reader.pread(4096, off) == blob, "WR-005",
                           expected=f"acknowledged WRITE {i + 1} is on the export", observed="other bytes")
