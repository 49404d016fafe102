"""A length in a header is the peer's word, not data: the core allocates for payload bytes as they arrive.

Hardening: a 28-byte WRITE header declaring 64 MiB used to make the server's core allocate the whole
payload at once (24 such connections: 1.6 GiB).  Measured with tracemalloc, which sees every bytearray.
"""

from __future__ import annotations

import tracemalloc
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
from nbdref import NEED_DATA, Cmd, ServerConnection, State
from nbdref import _wire as w
from nbdref import events as ev
from nbdref._constants import ReplyType
from nbdref._parse import PAYLOAD_STEP

from .helpers import ConnectionPair

MiB = 1 << 20
BIG = 64 * MiB  # the core's default Strictness.max_payload: declared, never sent
SMALL_BOUND = 2 * MiB  # what a header alone may cost, with room to spare


def pair(**kw: object) -> ConnectionPair:
    p = ConnectionPair()
    p.handshake(export_size=1 << 30, **kw)  # type: ignore[arg-type]
    assert p.server.state is State.TRANSMISSION
    return p


@contextmanager
def traced() -> Iterator[Callable[[], tuple[int, int]]]:
    """(current, peak) bytes allocated since the block started."""
    tracemalloc.start()
    try:
        yield tracemalloc.get_traced_memory
    finally:
        tracemalloc.stop()


def pattern(n: int) -> bytes:
    """``n`` bytes that are not all alike (a misplaced piece shows)."""
    return (bytes(range(251)) * (n // 251 + 1))[:n]


def write_header(length: int, cookie: int = 1) -> bytes:
    return w.encode_request_header(ev.Request(cookie=cookie, command=Cmd.WRITE, length=length), False)


def drain(conn) -> list[ev.Event]:
    out = []
    while (e := conn.next_event()) is not NEED_DATA:
        out.append(e)
    return out


def test_write_header_alone_allocates_little() -> None:
    s = pair().server
    with traced() as mem:
        s.receive_data(write_header(BIG))
        assert s.next_event() is NEED_DATA
        view = s.get_buffer(64 * 1024)  # what a driver does next: it must not be the whole payload
        assert 0 < len(view) <= PAYLOAD_STEP
        del view
        _, peak = mem()
    assert peak < SMALL_BOUND, f"a 28-byte header cost {peak} bytes"
    assert s.payload_length == BIG and s.buffered_bytes == 0 and s.receiving


def test_payload_memory_follows_the_bytes_received() -> None:
    """Through get_buffer/buffer_updated (the server's zero-copy path), the buffer stays within one step
    (plus the allocator's slack) of what arrived, and the payload is delivered intact."""
    total = 16 * MiB
    data = pattern(total)
    s = pair().server
    got: list[ev.Event] = []
    with traced() as mem:
        s.receive_data(write_header(total))
        assert s.next_event() is NEED_DATA
        received = 0
        while received < total:
            view = s.get_buffer(256 * 1024)
            n = min(len(view), 300_000, total - received)  # a short read, as recv_into may do
            view[:n] = data[received : received + n]
            del view  # the session's driver keeps no view across get_buffer(): the buffer grows in place
            s.buffer_updated(n)
            received += n
            got += drain(s)
            current, _ = mem()
            if received < total:
                assert current <= received * 1.25 + SMALL_BOUND, (received, current)
                assert s.buffered_bytes == received
    (req,) = got
    assert isinstance(req, ev.Request) and req.length == total and len(req.payload) == total
    assert req.payload == data
    assert s.payload_length == 0 and s.buffered_bytes == 0 and not s.receiving


@pytest.mark.parametrize("piece", [4095, 65536, 300_001])
def test_payload_arrives_whole_through_receive_data(piece: int) -> None:
    total = 3 * MiB + 17
    data = pattern(total)
    p = pair()
    stream = write_header(total) + data + write_header(4, cookie=2) + b"tail"
    got: list[ev.Event] = []
    with traced() as mem:
        for i in range(0, len(stream), piece):
            p.server.receive_data(stream[i : i + piece])
            got += drain(p.server)
            if i == 0:
                current, _ = mem()
                assert current < SMALL_BOUND, f"{piece} bytes of a {total}-byte WRITE cost {current} bytes"
    assert [e.cookie for e in got] == [1, 2]
    assert got[0].payload == data and bytes(got[1].payload) == b"tail"


def test_payload_arrives_whole_when_the_driver_keeps_its_views() -> None:
    """A driver that keeps the last view alive stops the in-place resize: the bytes move (the old view
    stays valid), and nothing is lost."""
    total = 5 * MiB + 3
    data = pattern(total)
    s = pair().server
    kept = []
    with traced() as mem:
        s.receive_data(write_header(total) + data[:1000])
        assert s.next_event() is NEED_DATA
        received = 1000
        while received < total:
            view = s.get_buffer()
            n = min(len(view), total - received)
            view[:n] = data[received : received + n]
            kept.append(view)
            s.buffer_updated(n)
            received += n
            if received < total:
                # Copies double the buffer: at most twice what arrived, plus one step (and the old
                # buffers the kept views pin, which are the driver's).
                assert len(s._sink_grow) <= 2 * received + PAYLOAD_STEP
            if len(kept) == 1:
                current, _ = mem()
                assert current < SMALL_BOUND
    (req,) = drain(s)
    assert req.payload == data


def test_simple_reply_header_alone_reserves_little() -> None:
    """Client side: a READ without read_buffer waits for its data in the receive buffer, which grows
    with the bytes, not with the length (here the request's)."""
    p = pair(structured=False)
    c = p.client
    length = 32 * MiB
    p.deliver(p.server, c.send(ev.Request(cookie=7, command=Cmd.READ, offset=0, length=length)))
    with traced() as mem:
        c.receive_data(w.encode_simple_reply_header(7, 0))
        assert c.next_event() is NEED_DATA
        view = c.get_buffer()
        assert len(view) <= PAYLOAD_STEP + 64 * 1024
        del view
        _, peak = mem()
    assert peak < SMALL_BOUND


def test_offset_data_header_without_read_buffer_allocates_little() -> None:
    """Client side: OFFSET_DATA's length is the server's word; the data is collected as it arrives."""
    p = pair(structured=True)
    c, s = p.client, p.server
    n = 32 * MiB
    p.deliver(s, c.send(ev.Request(cookie=9, command=Cmd.READ, offset=0, length=n)))
    head = w.encode_chunk_header(1, int(ReplyType.OFFSET_DATA), 9, n + 8, False, 0) + w.OFFSET.pack(0)
    with traced() as mem:
        c.receive_data(head)
        assert c.next_event() is NEED_DATA
        assert len(c.get_buffer()) <= PAYLOAD_STEP
        _, peak = mem()
    assert peak < SMALL_BOUND, f"an OFFSET_DATA header cost {peak} bytes"
    assert c.payload_length == n
    data = b"\xab" * n
    c.receive_data(data)
    chunk, done = drain(c)
    assert isinstance(chunk, ev.OffsetData) and chunk.data == data and done.error == 0


def test_default_server_connection_starts_small() -> None:
    with traced() as mem:
        conn = ServerConnection()
        current, _ = mem()
    assert conn.buffered_bytes == 0
    assert current < 256 * 1024  # a connection that only says hello must stay cheap
