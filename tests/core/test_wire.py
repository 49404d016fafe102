"""Codec round trips and exact layouts of every message (no state involved)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nbdref import _wire as w
from nbdref import events as ev
from nbdref._constants import Cmd, CmdFlag, Info, Magic, Opt, Rep, ReplyType, TxFlag

OPTIONS = [
    ev.OptExportName(name="exp"),
    ev.OptAbort(),
    ev.OptList(),
    ev.OptStartTLS(),
    ev.OptInfo(name="exp", info=(Info.NAME, Info.BLOCK_SIZE)),
    ev.OptGo(name="", info=()),
    ev.OptStructuredReply(),
    ev.OptListMetaContext(name="exp", queries=("base:", "qemu:")),
    ev.OptSetMetaContext(name="exp", queries=("base:allocation",)),
    ev.OptExtendedHeaders(),
    ev.OptUnknown(option=4, data=b"peek"),
    ev.OptUnknown(option=0x1234, data=b""),
]


@pytest.mark.parametrize("opt", OPTIONS, ids=lambda o: type(o).__name__)
def test_option_round_trip(opt):
    raw = w.encode_option(opt)
    magic, code, length = w.OPTION_HEADER.unpack_from(raw)
    assert (magic, code, length) == (Magic.IHAVEOPT, opt.option, len(raw) - 16)
    assert w.decode_option(code, raw[16:]) == opt


def test_go_layout():
    raw = w.encode_option(ev.OptGo(name="ab", info=(Info.BLOCK_SIZE,)))
    assert raw[16:] == b"\0\0\0\x02ab\0\x01\0\x03"


@pytest.mark.parametrize(
    ("option", "data", "req_id"),
    [
        (Opt.GO, b"\0\0\0\x09ab\0\0", "GO-002"),  # name longer than the data
        (Opt.GO, b"\0\0\0\x02ab\0\x02\0\x03", "GO-002"),  # 2 info requests announced, 1 present
        (Opt.GO, b"\0\0", "GO-002"),
        (Opt.SET_META_CONTEXT, b"\0\0\0\0\0\0\0\x01\0\0\0\x09base:", "BS-028"),
        (Opt.LIST_META_CONTEXT, b"\0\0\0\0\xff\xff\xff\xff", "BS-028"),
        (Opt.SET_META_CONTEXT, b"\0\0\0\0\0\0\0\0junk", "BS-028"),
    ],
)
def test_malformed_option_data(option, data, req_id):
    with pytest.raises(w.WireError) as exc:
        w.decode_option(option, data)
    assert exc.value.req_id == req_id


REPLIES = [
    ev.RepAck(option=Opt.GO),
    ev.RepServer(option=Opt.LIST, name="exp", details="a disk"),
    ev.RepInfoExport(option=Opt.GO, export_size=1 << 40, transmission_flags=TxFlag.HAS_FLAGS | TxFlag.READ_ONLY),
    ev.RepInfoName(option=Opt.INFO, name="canonical"),
    ev.RepInfoDescription(option=Opt.INFO, description="desc"),
    ev.RepInfoBlockSize(option=Opt.GO, minimum=512, preferred=4096, maximum=1 << 25),
    ev.RepInfoUnknown(option=Opt.GO, info_type=99, data=b"xyz"),
    ev.RepMetaContext(option=Opt.SET_META_CONTEXT, context_id=7, name="base:allocation"),
    ev.RepError(option=Opt.GO, reply_type=Rep.ERR_UNKNOWN, message="no such export"),
    ev.RepError(option=Opt.GO, reply_type=Rep.ERR_EXT_HEADER_REQD),
    ev.RepUnknown(option=Opt.GO, reply_type=77, data=b"?"),
]


@pytest.mark.parametrize("rep", REPLIES, ids=lambda r: type(r).__name__)
def test_option_reply_round_trip(rep):
    raw = w.encode_option_reply(rep)
    magic, option, rtype, length = w.OPTION_REPLY_HEADER.unpack_from(raw)
    assert (magic, option, rtype, length) == (Magic.OPT_REPLY, rep.option, rep.reply_type, len(raw) - 20)
    assert w.decode_option_reply(option, rtype, raw[20:]) == rep


@pytest.mark.parametrize(
    ("rtype", "data", "req_id"),
    [
        (Rep.INFO, b"\0\0" + b"\0" * 11, "GO-031"),  # NBD_INFO_EXPORT of length 13
        (Rep.INFO, b"\0\x03" + b"\0" * 8, "GO-037"),
        (Rep.INFO, b"\0", "GO-034"),
        (Rep.SERVER, b"\0\0\0\x05ab", "OPT-019"),
        (Rep.META_CONTEXT, b"\0\0", "BS-040"),
    ],
)
def test_malformed_option_reply(rtype, data, req_id):
    with pytest.raises(w.WireError) as exc:
        w.decode_option_reply(Opt.GO, rtype, data)
    assert exc.value.req_id == req_id


def test_handshake_layouts():
    old = w.encode_oldstyle_greeting(ev.OldstyleGreeting(export_size=4096, transmission_flags=1))
    assert len(old) == 152 and old[:16] == b"NBDMAGIC\0\0\x42\x02\x81\x86\x12\x53"
    assert w.decode_oldstyle_rest(old[16:]) == ev.OldstyleGreeting(export_size=4096, transmission_flags=1)
    assert w.encode_newstyle_greeting(ev.NewstyleGreeting(flags=3)) == b"NBDMAGICIHAVEOPT\0\x03"
    assert w.encode_client_flags(ev.ClientFlags(flags=1)) == b"\0\0\0\x01"
    reply = ev.ExportNameReply(export_size=1, transmission_flags=1)
    assert len(w.encode_export_name_reply(reply, True)) == 134
    assert w.encode_export_name_reply(reply, False) == b"\0" * 7 + b"\x01\0\x01"


def test_request_layouts():
    r = ev.Request(cookie=0x1122334455667788, command=Cmd.WRITE, flags=CmdFlag.FUA, offset=512, length=3, payload=b"abc")
    raw = w.encode_request(r)
    assert len(raw) == 28 + 3
    assert w.REQUEST.unpack_from(raw) == (Magic.REQUEST, 1, 1, r.cookie, 512, 3)
    ext = w.encode_request(
        ev.Request(cookie=1, command=Cmd.TRIM, offset=0, length=1 << 40), extended=True
    )
    assert w.EXTENDED_REQUEST.unpack(ext) == (Magic.EXTENDED_REQUEST, 0, Cmd.TRIM, 1, 0, 1 << 40)
    assert w.encode_block_status_payload(4096, (1, 2)) == (4096).to_bytes(8, "big") + b"\0\0\0\x01\0\0\0\x02"


CHUNKS = [
    ev.NoneChunk(cookie=5),
    ev.OffsetHole(cookie=5, done=False, offset=4096, length=512),
    ev.BlockStatus(cookie=5, context_id=1, extents=((4096, 3), (512, 0)), extended=False),
    ev.BlockStatus(cookie=5, context_id=2, extents=((1 << 33, 1 << 40),), extended=True),
    ev.ErrorChunk(cookie=5, error=5, message="EIO here"),
    ev.ErrorChunk(cookie=5, error=22, message="", offset=1024),
    ev.UnknownChunk(cookie=5, reply_type=0x8123, data=b"\0\0\0\x05\0\0"),
    ev.UnknownChunk(cookie=5, reply_type=42, data=b""),
]


@pytest.mark.parametrize("chunk", CHUNKS, ids=lambda c: type(c).__name__)
@pytest.mark.parametrize("extended", [False, True])
def test_chunk_round_trip(chunk, extended):
    bs_ext = bool(getattr(chunk, "extended", False))
    payload = w.chunk_payload(chunk, bs_ext)
    rtype = w.chunk_type(chunk, bs_ext)
    head = w.encode_chunk_header(1 if chunk.done else 0, rtype, chunk.cookie, len(payload), extended, 99)
    layout = w.EXTENDED_CHUNK if extended else w.STRUCTURED_CHUNK
    fields = layout.unpack(head)
    assert fields[0] == (Magic.EXTENDED_REPLY if extended else Magic.STRUCTURED_REPLY)
    assert fields[-1] == len(payload)
    if extended:
        assert fields[4] == 99
    assert w.decode_chunk(chunk.cookie, fields[1], fields[2], payload) == chunk


@pytest.mark.parametrize(
    ("rtype", "data", "req_id"),
    [
        (ReplyType.NONE, b"x", "SR-029"),
        (ReplyType.OFFSET_HOLE, b"\0" * 11, "SR-035"),
        (ReplyType.BLOCK_STATUS, b"\0" * 4, "BS-055"),
        (ReplyType.BLOCK_STATUS, b"\0" * 13, "BS-055"),
        (ReplyType.BLOCK_STATUS_EXT, b"\0" * 8, "EXT-044"),
        (ReplyType.BLOCK_STATUS_EXT, b"\0\0\0\x01\0\0\0\x02" + b"\0" * 16, "EXT-046"),
        (ReplyType.ERROR, b"\0\0\0\x05\0", "SR-040"),
        (ReplyType.ERROR, b"\0\0\0\x05\0\x09abc", "SR-043"),
        (ReplyType.ERROR_OFFSET, b"\0\0\0\x05\0\0" + b"\0" * 7, "SR-045"),
    ],
)
def test_malformed_chunks(rtype, data, req_id):
    with pytest.raises(w.WireError) as exc:
        w.decode_chunk(1, 1, rtype, data)
    assert exc.value.req_id == req_id


def test_simple_reply_layout():
    assert w.encode_simple_reply_header(7, 22) == bytes.fromhex("67446698") + b"\0\0\0\x16" + (7).to_bytes(8, "big")


def test_strings_keep_invalid_utf8():
    s = w.dec_str(b"a\xffb")
    assert not w.is_valid_utf8(s)
    assert w.enc_str(s) == b"a\xffb"


# ---------------------------------------------------------------- property: decode(encode(x)) == x


NAMES = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)
U16S = st.integers(0, 0xFFFF)
U32S = st.integers(0, 0xFFFFFFFF)
U64S = st.integers(0, (1 << 64) - 1)
OPTION_EVENTS = st.one_of(
    st.builds(ev.OptExportName, name=NAMES),
    st.builds(ev.OptInfo, name=NAMES, info=st.lists(U16S, max_size=5).map(tuple)),
    st.builds(ev.OptGo, name=NAMES, info=st.lists(U16S, max_size=5).map(tuple)),
    st.builds(ev.OptListMetaContext, name=NAMES, queries=st.lists(NAMES, max_size=4).map(tuple)),
    st.builds(ev.OptSetMetaContext, name=NAMES, queries=st.lists(NAMES, max_size=4).map(tuple)),
    st.builds(ev.OptList, data=st.binary(max_size=8)),
    st.builds(ev.OptUnknown, option=st.integers(12, 0xFFFFFFFF), data=st.binary(max_size=8)),
)
REPLY_EVENTS = st.one_of(
    st.builds(ev.RepServer, option=U32S, name=NAMES, details=NAMES),
    st.builds(ev.RepInfoExport, option=U32S, export_size=U64S, transmission_flags=U16S),
    st.builds(ev.RepInfoBlockSize, option=U32S, minimum=U32S, preferred=U32S, maximum=U32S),
    st.builds(ev.RepInfoName, option=U32S, name=NAMES),
    st.builds(ev.RepMetaContext, option=U32S, context_id=U32S, name=NAMES),
    st.builds(ev.RepError, option=U32S, reply_type=st.integers(1 << 31, 0xFFFFFFFF), message=NAMES),
)
CHUNK_EVENTS = st.one_of(
    st.builds(ev.OffsetHole, cookie=U64S, done=st.booleans(), offset=U64S, length=U32S),
    st.builds(
        ev.BlockStatus,
        cookie=U64S,
        done=st.booleans(),
        context_id=U32S,
        extents=st.lists(st.tuples(U32S, U32S), min_size=1, max_size=6).map(tuple),
        extended=st.just(False),
    ),
    st.builds(
        ev.BlockStatus,
        cookie=U64S,
        done=st.booleans(),
        context_id=U32S,
        extents=st.lists(st.tuples(U64S, U64S), min_size=1, max_size=6).map(tuple),
        extended=st.just(True),
    ),
    st.builds(ev.ErrorChunk, cookie=U64S, done=st.booleans(), error=U32S, message=NAMES, offset=st.none() | U64S),
)


@settings(max_examples=300, deadline=None)
@given(OPTION_EVENTS)
def test_every_option_round_trips(opt):
    raw = w.encode_option(opt)
    _, code, length = w.OPTION_HEADER.unpack_from(raw)
    assert length == len(raw) - 16 and w.decode_option(code, raw[16:]) == opt


@settings(max_examples=300, deadline=None)
@given(REPLY_EVENTS)
def test_every_option_reply_round_trips(rep):
    raw = w.encode_option_reply(rep)
    _, option, rtype, _ = w.OPTION_REPLY_HEADER.unpack_from(raw)
    assert w.decode_option_reply(option, rtype, raw[20:]) == rep


@settings(max_examples=300, deadline=None)
@given(CHUNK_EVENTS)
def test_every_chunk_round_trips(chunk):
    ext = bool(getattr(chunk, "extended", False))
    payload = w.chunk_payload(chunk, ext)
    assert w.decode_chunk(chunk.cookie, int(chunk.done), w.chunk_type(chunk, ext), payload) == chunk
