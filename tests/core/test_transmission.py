"""Transmission phase: every command and flag, simple / structured / extended replies, zero copy."""

from __future__ import annotations

import pytest
from nbdref import NEED_DATA, Cmd, CmdFlag, Err, LocalProtocolError, State, StateFlag, TxFlag
from nbdref import _wire as w
from nbdref import events as ev

from .helpers import ConnectionPair

ALL_FLAGS = (
    TxFlag.HAS_FLAGS
    | TxFlag.SEND_FLUSH
    | TxFlag.SEND_FUA
    | TxFlag.SEND_TRIM
    | TxFlag.SEND_WRITE_ZEROES
    | TxFlag.SEND_DF
    | TxFlag.SEND_CACHE
    | TxFlag.SEND_FAST_ZERO
)


def pair(**kw) -> ConnectionPair:
    kw.setdefault("tx_flags", ALL_FLAGS)
    p = ConnectionPair()
    p.handshake(**kw)
    assert p.client.state is p.server.state is State.TRANSMISSION
    return p


def complete(events, cookie, error=0):
    assert events[-1] == ev.ReplyComplete(cookie=cookie, command=events[-1].command, error=error)


COMMANDS = [
    (Cmd.READ, CmdFlag.DF, 0, 512, None),
    (Cmd.WRITE, CmdFlag.FUA, 512, 4, b"data"),
    (Cmd.FLUSH, 0, 0, 0, None),
    (Cmd.TRIM, CmdFlag.FUA, 0, 4096, None),
    (Cmd.CACHE, 0, 0, 4096, None),
    (Cmd.WRITE_ZEROES, CmdFlag.NO_HOLE | CmdFlag.FUA, 0, 4096, None),
    (Cmd.WRITE_ZEROES, CmdFlag.FAST_ZERO, 0, 4096, None),
    (Cmd.BLOCK_STATUS, CmdFlag.REQ_ONE, 0, 4096, None),
]


@pytest.mark.parametrize(("cmd", "flags", "offset", "length", "payload"), COMMANDS)
def test_every_command_round_trips(cmd, flags, offset, length, payload):
    p = pair(contexts=("base:allocation",))
    req = ev.Request(cookie=11, command=cmd, flags=flags, offset=offset, length=length, payload=payload)
    assert p.send(p.client, req) == [req]
    assert p.server.in_flight[11] == req
    if cmd == Cmd.READ:
        replies = [ev.OffsetData(cookie=11, offset=0, data=b"x" * 512, length=512)]
    elif cmd == Cmd.BLOCK_STATUS:
        replies = [ev.BlockStatus(cookie=11, context_id=1, extents=((4096, StateFlag.HOLE),), extended=False)]
    else:
        replies = [ev.SimpleReply(cookie=11)]
    events = []
    for r in replies:
        events += p.send(p.server, r)
    complete(events, 11)
    assert p.client.in_flight == p.server.in_flight == {}
    assert p.client.violations == p.server.violations == []


def test_disc_has_no_reply_and_moves_to_disconnecting():
    p = pair()
    p.send(p.client, ev.Request(cookie=1, command=Cmd.DISC))
    assert p.client.state is p.server.state is State.DISCONNECTING
    with pytest.raises(LocalProtocolError):
        p.client.send(ev.Request(cookie=2, command=Cmd.FLUSH))
    assert p.deliver(p.client, b"") == [ev.ConnectionClosed()]
    assert p.client.violations == []


def test_simple_read_reply_with_data():
    p = pair(structured=False, tx_flags=TxFlag.HAS_FLAGS)
    p.send(p.client, ev.Request(cookie=1, command=Cmd.READ, offset=0, length=5))
    events = p.send(p.server, ev.SimpleReply(cookie=1, data=b"hello"))
    assert events[0] == ev.SimpleReply(cookie=1, data=b"hello")
    complete(events, 1)


def test_simple_read_error_has_no_payload():
    p = pair(structured=False, tx_flags=TxFlag.HAS_FLAGS)
    p.send(p.client, ev.Request(cookie=1, command=Cmd.READ, offset=0, length=5))
    events = p.send(p.server, ev.SimpleReply(cookie=1, error=Err.EIO))
    assert events == [ev.SimpleReply(cookie=1, error=Err.EIO), ev.ReplyComplete(cookie=1, command=Cmd.READ, error=5)]


def test_structured_read_in_several_chunks_without_read_buffer():
    p = pair()
    p.send(p.client, ev.Request(cookie=3, command=Cmd.READ, offset=4096, length=8192))
    e1 = p.send(p.server, ev.OffsetHole(cookie=3, done=False, offset=8192, length=4096))
    e2 = p.send(p.server, ev.OffsetData(cookie=3, done=True, offset=4096, data=b"\1" * 4096))
    assert e1 == [ev.OffsetHole(cookie=3, done=False, offset=8192, length=4096)]
    assert bytes(e2[0].data) == b"\1" * 4096 and e2[0].offset == 4096 and not e2[0].in_place
    complete(e2, 3)


def test_error_chunks():
    p = pair()
    p.send(p.client, ev.Request(cookie=3, command=Cmd.READ, offset=0, length=8192))
    p.send(p.server, ev.OffsetData(cookie=3, done=False, offset=0, data=b"a" * 4096))
    e = p.send(p.server, ev.ErrorChunk(cookie=3, done=False, error=Err.EIO, message="bad sector", offset=4096))
    assert e == [ev.ErrorChunk(cookie=3, done=False, error=Err.EIO, message="bad sector", offset=4096)]
    e = p.send(p.server, ev.NoneChunk(cookie=3))
    complete(e, 3, error=Err.EIO)
    p.send(p.client, ev.Request(cookie=4, command=Cmd.WRITE, offset=0, length=1, payload=b"x"))
    e = p.send(p.server, ev.ErrorChunk(cookie=4, error=Err.ENOSPC, message="full"))
    complete(e, 4, error=Err.ENOSPC)
    assert p.client.violations == []


def test_structured_simple_reply_to_non_read_is_fine():
    p = pair()
    p.send(p.client, ev.Request(cookie=1, command=Cmd.FLUSH))
    complete(p.send(p.server, ev.SimpleReply(cookie=1, error=Err.EPERM)), 1, error=Err.EPERM)
    assert p.client.violations == []


def test_out_of_order_replies():
    p = pair()
    for c in (1, 2, 3):
        p.send(p.client, ev.Request(cookie=c, command=Cmd.FLUSH))
    for c in (3, 1, 2):
        complete(p.send(p.server, ev.SimpleReply(cookie=c)), c)
    assert p.client.in_flight == {}


def test_unknown_error_chunk_fails_the_reply_but_not_the_session():
    p = pair()
    p.send(p.client, ev.Request(cookie=1, command=Cmd.FLUSH))
    e = p.send(p.server, ev.UnknownChunk(cookie=1, reply_type=0x8077, data=b"\0\0\0\x05\0\0"))
    assert e[-1].error != 0
    assert p.client.state is State.TRANSMISSION


# ---------------------------------------------------------------- extended headers


def test_extended_headers_requests_and_replies():
    p = pair(extended=True, structured=False, contexts=("base:allocation",))
    wreq = ev.Request(cookie=1, command=Cmd.WRITE, flags=CmdFlag.PAYLOAD_LEN, offset=0, length=3, payload=b"abc")
    data = p.client.send(wreq)
    assert len(data) == 32 + 3 and w.EXTENDED_REQUEST.unpack_from(data)[0] == 0x21E41C71
    assert p.deliver(p.server, data) == [wreq]
    reply = p.server.send(ev.NoneChunk(cookie=1))
    assert len(reply) == 32
    complete(p.deliver(p.client, reply), 1)
    # Effect lengths are 64-bit.
    big = ev.Request(cookie=2, command=Cmd.TRIM, offset=0, length=1 << 20)
    assert p.send(p.client, big) == [big]
    complete(p.send(p.server, ev.NoneChunk(cookie=2)), 2)
    # BLOCK_STATUS replies use BLOCK_STATUS_EXT with 64-bit extents.
    p.send(p.client, ev.Request(cookie=3, command=Cmd.BLOCK_STATUS, offset=0, length=4096))
    e = p.send(p.server, ev.BlockStatus(cookie=3, context_id=1, extents=((4096, 0),)))
    assert e[0] == ev.BlockStatus(cookie=3, context_id=1, extents=((4096, 0),), extended=True)
    # The header's offset field carries the request offset, even for OFFSET_DATA (EXT-007).
    buf = bytearray(8)
    p.send(p.client, ev.Request(cookie=4, command=Cmd.READ, offset=8, length=8, read_buffer=buf))
    chunk = p.server.send(ev.OffsetData(cookie=4, offset=12, data=b"WXYZ", done=False))
    assert w.EXTENDED_CHUNK.unpack_from(chunk)[4] == 8
    p.deliver(p.client, chunk)
    complete(p.send(p.server, ev.OffsetData(cookie=4, offset=8, data=b"abcd")), 4)
    assert buf == b"abcdWXYZ"
    assert p.client.violations == p.server.violations == []


def test_extended_block_status_payload():
    p = pair(extended=True, contexts=("base:allocation",), tx_flags=ALL_FLAGS | TxFlag.BLOCK_STATUS_PAYLOAD)
    payload = w.encode_block_status_payload(4096, (1,))
    req = ev.Request(cookie=1, command=Cmd.BLOCK_STATUS, flags=CmdFlag.PAYLOAD_LEN, length=len(payload), payload=payload)
    assert p.send(p.client, req) == [req]
    assert p.server.violations == []


# ---------------------------------------------------------------- zero copy


def test_zero_copy_simple_read_lands_in_read_buffer():
    p = pair(structured=False, tx_flags=TxFlag.HAS_FLAGS)
    buf = bytearray(1 << 16)
    p.send(p.client, ev.Request(cookie=9, command=Cmd.READ, offset=0, length=len(buf), read_buffer=buf))
    header = p.server.send_iov(ev.SimpleReply(cookie=9, data=memoryview(bytes(range(256)) * 256)))
    assert len(header) == 2 and isinstance(header[1], memoryview)  # payload not copied by send_iov
    c = p.client
    c.receive_data(header[0])
    assert c.next_event() is NEED_DATA
    payload = header[1]
    pos = 0
    while pos < len(payload):
        view = c.get_buffer()
        # The view handed out *is* the caller's buffer: the data lands in place.
        assert view.obj is buf
        n = min(len(view), 7000, len(payload) - pos)
        view[:n] = payload[pos : pos + n]
        c.buffer_updated(n)
        pos += n
    assert c.next_event() == ev.SimpleReply(cookie=9, data=None, in_place=True)
    assert c.next_event() == ev.ReplyComplete(cookie=9, command=Cmd.READ)
    assert buf == bytes(range(256)) * 256


def test_zero_copy_offset_data_with_header_and_data_in_one_packet():
    p = pair()
    buf = bytearray(8192)
    p.send(p.client, ev.Request(cookie=1, command=Cmd.READ, offset=1 << 19, length=8192, read_buffer=buf))
    wire = p.server.send(ev.OffsetData(cookie=1, offset=(1 << 19) + 4096, data=b"B" * 4096, done=False))
    wire += p.server.send(ev.OffsetData(cookie=1, offset=1 << 19, data=b"A" * 4096, done=True))
    events = p.deliver(p.client, wire)
    assert [type(e) for e in events] == [ev.OffsetData, ev.OffsetData, ev.ReplyComplete]
    assert events[0].in_place and events[0].data is None and events[0].length == 4096
    assert buf == b"A" * 4096 + b"B" * 4096


def test_get_buffer_reserves_what_the_parser_waits_for():
    p = pair(structured=False, tx_flags=TxFlag.HAS_FLAGS)
    p.send(p.client, ev.Request(cookie=1, command=Cmd.READ, offset=0, length=300_000))
    p.client.receive_data(w.encode_simple_reply_header(1, 0))
    assert p.client.next_event() is NEED_DATA
    assert len(p.client.get_buffer()) >= 300_000


def test_read_buffer_too_small_is_refused():
    p = pair()
    with pytest.raises(LocalProtocolError, match="read_buffer"):
        p.client.send(ev.Request(cookie=1, command=Cmd.READ, length=10, read_buffer=bytearray(5)))


def test_next_cookie_skips_cookies_in_flight():
    p = pair()
    c1 = p.client.next_cookie()
    p.send(p.client, ev.Request(cookie=c1 + 1, command=Cmd.FLUSH))
    assert p.client.next_cookie() not in (c1, c1 + 1)


def test_transcript_can_be_capped_and_disabled():
    from nbdref import Transcript

    t = Transcript(max_entries=4)
    for i in range(10):
        t.note("C", "x", f"line {i}")
    assert t.lines() == ["C: line 0", "C: line 1", "... 6 omitted", "C: line 8", "C: line 9"]
    off = Transcript(enabled=False)
    off.note("C", "x", "nothing")
    assert len(off) == 0


def test_oldstyle_transmission():
    p = ConnectionPair()
    p.send(p.server, ev.OldstyleGreeting(export_size=4096, transmission_flags=TxFlag.HAS_FLAGS | TxFlag.SEND_FLUSH))
    buf = bytearray(512)
    p.send(p.client, ev.Request(cookie=5, command=Cmd.READ, offset=512, length=512, read_buffer=buf))
    events = p.send(p.server, ev.SimpleReply(cookie=5, data=b"o" * 512))
    assert events[0] == ev.SimpleReply(cookie=5, in_place=True) and buf == b"o" * 512
    complete(events, 5)
    complete(p.send(p.client, ev.Request(cookie=6, command=Cmd.FLUSH)) and p.send(p.server, ev.SimpleReply(cookie=6)), 6)
    assert p.client.violations == p.server.violations == []


def test_received_requests_use_the_enums():
    p = pair()
    (req,) = p.send(p.client, ev.Request(cookie=1, command=Cmd.FLUSH, flags=CmdFlag.FUA))
    assert req.command is Cmd.FLUSH and isinstance(req.flags, CmdFlag)
    (unknown,) = p.deliver(p.server, w.encode_request(ev.Request(cookie=2, command=0x77)))
    assert unknown.command == 0x77


def test_large_write_payload_is_received_in_place():
    p = pair()
    data = bytes(range(256)) * 1024  # 256 KiB
    parts = p.client.send_iov(ev.Request(cookie=1, command=Cmd.WRITE, offset=0, length=len(data), payload=data))
    assert parts[1] is data  # send_iov does not copy the payload
    s = p.server
    s.receive_data(parts[0] + data[:1000])
    assert s.next_event() is NEED_DATA
    view = s.get_buffer()
    assert len(view) == len(data) - 1000  # exactly the rest of the payload, in the payload's own buffer
    view[:] = data[1000:]
    s.buffer_updated(len(view))
    (req,) = [s.next_event()]
    assert req.payload == data and req.length == len(data)
    assert s.next_event() is NEED_DATA


def test_refuse_makes_a_should_level_breach_of_ours_a_refusal():
    # "The client SHOULD NOT send a zero-length READ" (RD-008): by default sent and noted in the transcript;
    # with its id in Strictness.refuse, refused like a MUST (nothing sent, the state does not move).
    from nbdref import Strictness

    p = pair()
    p.send(p.client, ev.Request(cookie=1, command=Cmd.READ, length=0))
    assert "sent anyway: RD-008" in str(p.client.transcript) and 1 in p.client.in_flight
    p = ConnectionPair(client=Strictness(refuse=frozenset({"RD-008"})))
    p.handshake(tx_flags=ALL_FLAGS)
    with pytest.raises(LocalProtocolError, match="RD-008") as info:
        p.client.send(ev.Request(cookie=1, command=Cmd.READ, length=0))
    assert info.value.violation is not None and info.value.violation.level == "SHOULD NOT"
    assert p.client.in_flight == {}
    # check_local=False still sends everything; a disabled id is not checked at all.
    for strictness in (Strictness(refuse=frozenset({"RD-008"}), check_local=False),
                       Strictness(refuse=frozenset({"RD-008"}), disabled=frozenset({"RD-008"}))):
        p = ConnectionPair(client=strictness)
        p.handshake(tx_flags=ALL_FLAGS)
        p.send(p.client, ev.Request(cookie=1, command=Cmd.READ, length=0))
        assert 1 in p.client.in_flight
