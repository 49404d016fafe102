"""Structured reply chunks: an overlap is caught before data is delivered, error chunks may carry bytes
after their message, unknown error chunk types fail the reply with their error value."""

from __future__ import annotations

import pytest
from nbdref import Cmd, Err, RemoteProtocolError, Strictness
from nbdref import _wire as w
from nbdref import events as ev

from .helpers import ConnectionPair, ids

NO_FATAL = Strictness(fatal_levels=frozenset())


# ---------------------------------------------------------------- overlap checked before delivery
# "MUST NOT overlap with any earlier content or error chunk" (SR-033): like the range check (SR-032), it
# runs before the data of a received OFFSET_DATA is written into the read_buffer.


@pytest.mark.parametrize("strictness", [None, NO_FATAL])
def test_overlapping_offset_data_does_not_overwrite_earlier_data(strictness):
    p = ConnectionPair(client=strictness, server=Strictness(check_local=False))
    p.handshake()
    buf = bytearray(16)
    p.send(p.client, ev.Request(cookie=1, command=Cmd.READ, length=16, read_buffer=buf))
    p.send(p.server, ev.OffsetData(cookie=1, done=False, offset=0, data=b"A" * 8))
    data = p.server.send(ev.OffsetData(cookie=1, done=False, offset=4, data=b"B" * 12))
    if strictness is None:
        with pytest.raises(RemoteProtocolError, match="SR-033"):
            p.deliver(p.client, data)
    else:
        p.deliver(p.client, data)
    assert buf[:8] == b"A" * 8
    assert ids(p.client) == ["SR-033"]


# ---------------------------------------------------------------- bytes after an error message
# NBD_REPLY_TYPE_ERROR: "16 bits: message length (no more than header *length* - 6)"; ERROR_OFFSET: "(no
# more than header *length* - 14)", the offset following the message: a shorter message is no breach.


def test_error_chunk_with_bytes_after_the_message_is_accepted():
    import struct

    from nbdref import ReplyType

    data = struct.pack(">IH", 5, 2) + b"hi" + b"\0\0\0"
    e = w.decode_chunk(1, 1, ReplyType.ERROR, data)
    assert isinstance(e, ev.ErrorChunk) and e.error == 5 and e.message == "hi" and e.offset is None
    data = struct.pack(">IH", 5, 2) + b"hi" + struct.pack(">Q", 4096) + b"\0"
    e = w.decode_chunk(1, 1, ReplyType.ERROR_OFFSET, data)
    assert isinstance(e, ev.ErrorChunk) and e.offset == 4096 and e.message == "hi"
    # A message longer than the chunk is still refused.
    with pytest.raises(w.WireError, match="inconsistent"):
        w.decode_chunk(1, 1, ReplyType.ERROR, struct.pack(">IH", 5, 9) + b"hi")
    with pytest.raises(w.WireError, match="inconsistent"):
        w.decode_chunk(1, 1, ReplyType.ERROR_OFFSET, struct.pack(">IH", 5, 2) + b"hi" + bytes(7))


# ---------------------------------------------------------------- unknown error chunk types
# "All error chunk types have bit 15 set, and begin with the same *error*, *message length*, and optional
# *message* fields as NBD_REPLY_TYPE_ERROR": the reply fails with that error.


def test_unknown_error_chunk_type_reports_its_error_value():
    import struct

    p = ConnectionPair()
    p.handshake()
    p.send(p.client, ev.Request(cookie=1, command=Cmd.READ, length=512))
    data = struct.pack(">IH", Err.EIO, 0)
    out = p.send(p.server, ev.UnknownChunk(cookie=1, done=True, reply_type=0x8077, data=data))
    assert isinstance(out[-1], ev.ReplyComplete) and out[-1].error == Err.EIO
    # Too short to carry an error: the reply still fails.
    p.send(p.client, ev.Request(cookie=2, command=Cmd.READ, length=512))
    out = p.send(p.server, ev.UnknownChunk(cookie=2, done=True, reply_type=0x8077, data=b"\0\0"))
    assert isinstance(out[-1], ev.ReplyComplete) and out[-1].error != 0
