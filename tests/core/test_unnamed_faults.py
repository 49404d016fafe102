"""Faults that stop the byte stream: which catalogued rule names each, or which spec section does.

A garbage magic, a reply to an option nobody asked, an extended header nobody negotiated and lengths
over the caps of ``Strictness`` raise RemoteProtocolError. Where a requirement of the catalogue is
broken by the same bytes (an over-long NBD_OPT_LIST breaks OPT-017 ...) that requirement is the
violation; where none is, ``violation`` is None and the message names the proto.md section, so a
reader knows where to look.
"""

from __future__ import annotations

import pytest
from nbdref import Cmd, CmdFlag, Info, Opt, RemoteProtocolError, Rep, State, Strictness
from nbdref import _wire as w
from nbdref import events as ev
from nbdref._constants import Magic

from .helpers import ConnectionPair
from .test_violations import greet, opt, tx

R = ev.Request
SMALL = Strictness(max_payload=1 << 16, max_option_length=1 << 12)
NO_ID = None


def _read(p, length=512, **kw):
    tx(p, **kw)
    p.send(p.client, R(cookie=1, command=Cmd.READ, length=length))
    return p


def _bs(p, length=4, flags=0):
    tx(p, contexts=("base:allocation",))
    p.send(p.client, R(cookie=1, command=Cmd.BLOCK_STATUS, flags=flags, length=length))
    return p


def _flush(p):
    tx(p)
    p.send(p.client, R(cookie=1, command=Cmd.FLUSH))
    return p


def _chunk(rtype, length, cookie=1):
    return w.STRUCTURED_CHUNK.pack(Magic.STRUCTURED_REPLY, 1, rtype, cookie, length)


def _opt(option, length):
    return w.OPTION_HEADER.pack(Magic.IHAVEOPT, option, length)


def _write(length, flags=0, extended=False):
    layout = w.EXTENDED_REQUEST if extended else w.REQUEST
    magic = Magic.EXTENDED_REQUEST if extended else Magic.REQUEST
    return layout.pack(magic, flags, Cmd.WRITE, 1, 0, length)


# (id, receiving side, setup, bytes, expected requirement id or None, text the message must contain)
CLIENT_SIDE = [
    ("greeting-magic", lambda p: p, b"NOTMAGIC" + bytes(10), NO_ID, '"Newstyle negotiation"'),
    ("second-magic", lambda p: p, b"NBDMAGIC" + b"XXXXXXXX" + bytes(2), NO_ID, "Oldstyle negotiation"),
    (
        "data-before-client-flags",
        lambda p: p.send(p.server, ev.NewstyleGreeting()),
        b"x",
        NO_ID,
        '"Newstyle negotiation"',
    ),
    (
        "unasked-option-reply",
        greet,
        w.OPTION_REPLY_HEADER.pack(Magic.OPT_REPLY, 3, Rep.ACK, 0),
        NO_ID,
        '"Fixed newstyle negotiation"',
    ),
    (
        "reply-to-another-option",
        lambda p: opt(p, ev.OptList()),
        w.OPTION_REPLY_HEADER.pack(Magic.OPT_REPLY, Opt.GO, Rep.ACK, 0),
        NO_ID,
        '"Fixed newstyle negotiation"',
    ),
    ("option-reply-magic", lambda p: opt(p, ev.OptList()), bytes(20), NO_ID, '"Fixed newstyle negotiation"'),
    (
        "ack-with-data",
        lambda p: opt(p, ev.OptList()),
        w.OPTION_REPLY_HEADER.pack(Magic.OPT_REPLY, Opt.LIST, Rep.ACK, 1) + b"x",
        NO_ID,
        '"Option reply types"',
    ),
    (
        "long-string-reply",
        lambda p: opt(p, ev.OptList()),
        w.OPTION_REPLY_HEADER.pack(Magic.OPT_REPLY, Opt.LIST, Rep.SERVER, 1 << 20),
        "GEN-003",
        "cap",
    ),
    (
        "long-unknown-reply",
        lambda p: opt(p, ev.OptList()),
        w.OPTION_REPLY_HEADER.pack(Magic.OPT_REPLY, Opt.LIST, 77, 1 << 20),
        NO_ID,
        '"Option haggling / Size',
    ),
    (
        "reply-magic",
        _flush,
        b"\xde\xad\xbe\xef" + bytes(28),
        NO_ID,
        '"Simple reply message / Structured reply',
    ),
    (
        "historic-reply-magic",
        _flush,
        w.U32.pack(Magic.HISTORIC_REPLY) + bytes(12),
        NO_ID,
        "historic NBD_REPLY_MAGIC, reserved",
    ),
    ("none-chunk-too-long", _flush, _chunk(0, 1 << 20), "SR-029", "cap"),
    ("hole-chunk-too-long", _read, _chunk(2, 1 << 20), "SR-035", "cap"),
    ("error-chunk-too-long", _read, _chunk(0x8001, 1 << 20), "SR-043", "cap"),
    ("status-more-extents-than-bytes", _bs, _chunk(5, 4 + 8 * 100), "BS-060", "cap"),
    (
        "status-req-one-many-extents",
        lambda p: _bs(p, flags=CmdFlag.REQ_ONE),
        _chunk(5, 4 + 8 * 100),
        "BS-058",
        "cap",
    ),
    ("unknown-chunk-too-long", _flush, _chunk(77, 1 << 20), "SR-027", "cap"),
    ("unknown-error-chunk-too-long", _flush, _chunk(0x8077, 1 << 20), NO_ID, '"Structured reply types"'),
    (
        "unknown-error-chunk-over-max-payload",
        lambda p: _flush_with_block_size(p),
        _chunk(0x8077, 1 << 20),
        "SR-028",
        "cap",
    ),
]
SERVER_SIDE = [
    ("option-magic", greet, b"IHAVEOPX" + bytes(8), NO_ID, '"Newstyle negotiation"'),
    ("long-export-name", greet, _opt(Opt.EXPORT_NAME, 1 << 20), "GEN-003", "cap"),
    ("long-list", greet, _opt(Opt.LIST, 1 << 20), "OPT-017", "cap"),
    ("long-structured-reply", greet, _opt(Opt.STRUCTURED_REPLY, 1 << 20), "SR-015", "cap"),
    ("long-go", greet, _opt(Opt.GO, 1 << 20), NO_ID, '"Option haggling / Size constraints"'),
    ("request-magic", tx, b"\xde\xad\xbe\xef" + bytes(24), NO_ID, '"Request message"'),
    ("tracelog-magic", tx, b"\x25\x60\x95\x14" + bytes(24), NO_ID, "transaction log magic, reserved"),
    ("historic-request-magic", tx, w.U32.pack(Magic.HISTORIC_REQUEST) + bytes(24), NO_ID, "historic"),
    (
        "extended-without-negotiation",
        tx,
        w.encode_request(R(cookie=1, command=Cmd.FLUSH), extended=True),
        NO_ID,
        '"Request message"',
    ),
    ("write-over-default-max", tx, _write(1 << 30), "BSZ-008", "cap"),
    (
        "write-over-advertised-max",
        lambda p: tx(p, block_size=(1, 4096, 1 << 16)),
        _write(1 << 30),
        "BSZ-025",
        "cap",
    ),
    (
        "extended-write-over-max",
        lambda p: tx(p, extended=True),
        _write(1 << 30, CmdFlag.PAYLOAD_LEN, True),
        "BSZ-008",
        "cap",
    ),
]


def _flush_with_block_size(p):
    tx(p, block_size=(1, 4096, 1 << 16))
    p.send(p.client, R(cookie=1, command=Cmd.FLUSH))
    return p


ROWS = [("client", *r) for r in CLIENT_SIDE] + [("server", *r) for r in SERVER_SIDE]


@pytest.mark.parametrize(("side", "setup", "data", "req_id", "text"), [r[:1] + r[2:] for r in ROWS],
                         ids=[r[1] for r in ROWS])  # fmt: skip
def test_stream_faults_name_a_rule_or_a_section(side, setup, data, req_id, text) -> None:
    p = ConnectionPair()
    setup(p)
    conn = p.client if side == "client" else p.server
    with pytest.raises(RemoteProtocolError) as info:
        p.deliver(conn, data)
    assert conn.state is State.ERROR
    assert text in str(info.value)
    if req_id is None:
        assert info.value.violation is None
        assert "proto.md" in str(info.value)
    else:
        assert info.value.violation is not None and info.value.violation.req_id == req_id
        assert conn.violations[-1].req_id == req_id


@pytest.mark.parametrize(("side", "setup", "data", "req_id", "text"),
                         [r[:1] + r[2:] for r in ROWS if r[4] is not None], ids=[r[1] for r in ROWS if r[4]])  # fmt: skip
def test_a_disabled_rule_still_stops_the_stream(side, setup, data, req_id, text) -> None:
    """Switching the rule off cannot make an unbufferable length acceptable: violation=None then."""
    off = Strictness(disabled=frozenset({req_id}))
    p = ConnectionPair(client=off, server=off)
    setup(p)
    conn = p.client if side == "client" else p.server
    with pytest.raises(RemoteProtocolError) as info:
        p.deliver(conn, data)
    assert info.value.violation is None and "proto.md" in str(info.value)
    assert req_id not in [v.req_id for v in conn.violations]


def test_big_read_without_read_buffer_is_our_limit_not_the_servers() -> None:
    p = ConnectionPair(client=SMALL)
    tx(p, structured=False)
    p.send(p.client, R(cookie=1, command=Cmd.READ, length=1 << 17))
    with pytest.raises(RemoteProtocolError, match="give the request a read_buffer") as info:
        p.deliver(p.client, w.encode_simple_reply_header(1, 0))
    assert info.value.violation is None and p.client.violations == []


def test_lengths_under_the_caps_pass() -> None:
    """The caps do not reject what they should let through: a 1 MiB WRITE, a 4 KiB export name."""
    p = ConnectionPair()
    tx(p)
    got = p.send(p.client, R(cookie=1, command=Cmd.WRITE, length=1 << 20, payload=bytes(1 << 20)))
    assert [type(e) for e in got] == [ev.Request] and len(got[0].payload) == 1 << 20
    p = ConnectionPair()
    greet(p)
    got = p.send(p.client, ev.OptInfo(name="x" * 4096, info=(Info.NAME,)))
    assert got[0].name == "x" * 4096 and p.server.violations[0].req_id == "GEN-002"  # SHOULD: 256 bytes


@pytest.mark.parametrize(
    ("block_size", "req_id"), [(None, None), ((1, 4096, 1 << 15), "SR-028")], ids=["none", "max"]
)
def test_big_offset_data_without_read_buffer(block_size, req_id) -> None:
    """Data over the buffering cap: SR-028 when it also exceeds the advertised maximum payload
    ("No variable-length part of a chunk may exceed the advertised maximum payload"), else our limit."""
    p = ConnectionPair(client=SMALL)
    tx(p, block_size=block_size)
    p.send(p.client, R(cookie=1, command=Cmd.READ, length=1 << 17))
    data_len = 1 << 17
    head = _chunk(1, 8 + data_len) + w.OFFSET.pack(0)
    with pytest.raises(RemoteProtocolError, match="buffering cap") as info:
        p.deliver(p.client, head)
    if req_id is None:
        assert info.value.violation is None and "proto.md" in str(info.value)
    else:
        assert info.value.violation.req_id == req_id
