"""Review findings on the sans-I/O core, each with the sentence that decides it."""

from __future__ import annotations

import pytest
from nbdref import Cmd, CmdFlag, Err, LocalProtocolError, RemoteProtocolError, Strictness, TxFlag
from nbdref import _wire as w
from nbdref import events as ev

from .helpers import ConnectionPair, ids, send_lenient

TX = TxFlag.HAS_FLAGS | TxFlag.SEND_FLUSH | TxFlag.SEND_FUA
BSP = TX | TxFlag.BLOCK_STATUS_PAYLOAD
SIZE = 1 << 20
NO_FATAL = Strictness(fatal_levels=frozenset())


def bs_request(effect: int, wanted: tuple[int, ...], *, offset: int = 0, cookie: int = 1) -> ev.Request:
    payload = w.encode_block_status_payload(effect, wanted)
    return ev.Request(cookie=cookie, command=Cmd.BLOCK_STATUS, flags=CmdFlag.PAYLOAD_LEN, offset=offset,
                      length=len(payload), payload=payload)


# ---------------------------------------------------------------- 1. payload-form BLOCK_STATUS effect length
# Ext-header draft: "C: 64 bits, effect length / C: n * 32 bits, list of metacontext ids to use"; the
# header's length is the payload's (12 bytes here), every length rule uses the effect length.


def test_payload_form_many_extents_are_not_capped_by_the_payload_length():
    p = ConnectionPair(client=NO_FATAL)
    p.handshake(extended=True, contexts=("base:allocation",), export_size=SIZE, tx_flags=BSP)
    p.send(p.client, bs_request(SIZE, (1,)))
    extents = tuple((SIZE // 64, i & 1) for i in range(64))
    out = p.send(p.server, ev.BlockStatus(cookie=1, context_id=1, extents=extents))
    assert ids(p.client) == []
    assert isinstance(out[-1], ev.ReplyComplete) and out[-1].error == 0


def test_payload_form_error_offset_judged_by_the_effect_length():
    # "The offset MUST lie within the request's offset and length" (SR-046)
    p = ConnectionPair(client=NO_FATAL)
    p.handshake(extended=True, contexts=("base:allocation",), export_size=SIZE, tx_flags=BSP)
    p.send(p.client, bs_request(8192, (1,), offset=4096))
    p.send(p.server, ev.ErrorChunk(cookie=1, done=True, error=Err.EIO, offset=4096 + 4000))
    assert ids(p.client) == []
    p.send(p.client, bs_request(8192, (1,), offset=4096, cookie=2))
    send_lenient(p, p.server, ev.ErrorChunk(cookie=2, done=True, error=Err.EIO, offset=4096 + 8192))
    assert ids(p.client) == ["SR-046"]


# ---------------------------------------------------------------- 2. DISC-021 binds the client only
# "A client that receives NBD_ESHUTDOWN MUST initiate a soft disconnect" (DISC-021): a request the client
# pipelined before the server's NBD_ESHUTDOWN reached it breaks nothing.


def test_request_pipelined_before_eshutdown_is_not_flagged_by_the_server():
    p = ConnectionPair()
    p.handshake(structured=False)
    c, s = p.client, p.server
    # Both requests leave the client before it sees the reply.
    data = c.send(ev.Request(cookie=1, command=Cmd.READ, length=512))
    late = c.send(ev.Request(cookie=2, command=Cmd.READ, length=512))
    p.deliver(s, data)
    reply = s.send(ev.SimpleReply(cookie=1, error=Err.ESHUTDOWN))
    out = p.deliver(s, late)
    assert [type(e) for e in out] == [ev.Request] and ids(s) == []
    p.deliver(c, reply)
    # The client has now seen it: another request breaks DISC-021 on its side.
    with pytest.raises(LocalProtocolError, match="DISC-021"):
        c.send(ev.Request(cookie=3, command=Cmd.READ, length=512))


# ---------------------------------------------------------------- 3. transcripts keep no payload buffers
MIB = 1 << 20


class _Buf(bytearray):
    """A bytearray that can be weakly referenced (plain bytes/bytearray cannot)."""


def test_transcript_keeps_a_summary_not_the_payload():
    import gc
    import weakref

    p = ConnectionPair()
    p.handshake(export_size=64 * MIB)
    refs = []
    for i in range(50):
        buf = _Buf(b"\xab" * MIB)
        refs.append(weakref.ref(buf))
        p.send(p.client, ev.Request(cookie=i, command=Cmd.WRITE, offset=i * MIB, length=MIB, payload=buf))
        p.send(p.server, ev.SimpleReply(cookie=i))
        del buf
    # Reads: the received OffsetData / the sent one carry a megabyte too.
    data = _Buf(b"\xcd" * MIB)
    refs.append(weakref.ref(data))
    p.send(p.client, ev.Request(cookie=99, command=Cmd.READ, length=MIB))
    p.send(p.server, ev.OffsetData(cookie=99, offset=0, data=data))
    del data
    gc.collect()
    assert [r for r in refs if r() is not None] == []
    # The lines still show the length and the first bytes.
    lines = p.client.transcript.lines() + p.server.transcript.lines()
    assert any(f"<{MIB} bytes {'ab' * 16}...>" in line and "NBD_CMD_WRITE" in line for line in lines)
    assert any(f"length={MIB} data=<{MIB} bytes {'cd' * 16}...>" in line for line in lines)
    for conn in (p.client, p.server):
        kept = 0
        for entry in conn.transcript:
            e = entry.event
            for name in ("payload", "data"):
                b = getattr(e, name, None)
                if b is not None:
                    kept += memoryview(b).nbytes
        assert kept < 64 * 1024


# ---------------------------------------------------------------- 5. overlap checked before delivery
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


# ---------------------------------------------------------------- 6. DISC-007 exemption: failed TLS only
# proto.md "Termination of the session during option haggling": "A party that is mandated by this
# document to terminate the session MUST initiate a hard disconnect if it is not possible to use a soft
# disconnect. Such circumstances include: ... where that party is the client following a failed TLS
# negotiation." / "unless a client's situation falls within the provisions of the previous paragraph ...
# it MUST NOT use a hard disconnect" (DISC-007).


def _options(p: ConnectionPair) -> None:
    from nbdref import ClientFlag, HandshakeFlag

    p.send(p.server, ev.NewstyleGreeting(flags=HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES))
    p.send(p.client, ev.ClientFlags(flags=ClientFlag.FIXED_NEWSTYLE | ClientFlag.NO_ZEROES))


@pytest.mark.parametrize(
    ("option", "reply_type", "expected"),
    [
        (ev.OptStartTLS(), "ERR_POLICY", []),  # STARTTLS refused: the failed TLS negotiation
        (ev.OptStartTLS(), "ERR_UNSUP", []),
        (ev.OptList(), "ERR_TLS_REQD", []),  # "TLS is unavailable and the user requires it" (TLS-031/040)
        (ev.OptInfo(name="x"), "ERR_UNKNOWN", ["DISC-007"]),  # an ordinary failed option
        (ev.OptList(), "ERR_POLICY", ["DISC-007"]),
    ],
)
def test_hard_disconnect_after_a_failed_option(option, reply_type, expected):
    from nbdref import Rep

    p = ConnectionPair(server=NO_FATAL)
    _options(p)
    p.send(p.client, option)
    p.send(p.server, ev.RepError(option=option.option, reply_type=getattr(Rep, reply_type)))
    p.deliver(p.server, b"")
    assert ids(p.server) == expected


# ---------------------------------------------------------------- 7. bytes after an error message
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


# ---------------------------------------------------------------- 10. unknown error chunk types
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


# ---------------------------------------------------------------- 11. no dead parameter
def test_encode_request_header_takes_no_payload_length():
    import inspect

    assert list(inspect.signature(w.encode_request_header).parameters) == ["e", "extended"]
    r = ev.Request(cookie=3, command=Cmd.WRITE, flags=CmdFlag.PAYLOAD_LEN, offset=8, length=4, payload=b"abcd")
    assert w.encode_request(r, extended=True) == w.encode_request_header(r, True) + b"abcd"


# ---------------------------------------------------------------- 13. one command-name helper
def test_one_command_name_helper():
    from nbdref import _checker, _outcome, _transmission, client
    from nbdref._constants import cmd_name

    assert cmd_name(Cmd.READ) == "NBD_CMD_READ" and cmd_name(0x77) == "command 119"
    assert not hasattr(_checker, "_cmd") and not hasattr(_outcome, "_name")
    assert not hasattr(client, "_cmd_name")
    assert _transmission._cmd is cmd_name and client.cmd_name is cmd_name
