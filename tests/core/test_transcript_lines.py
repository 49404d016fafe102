"""Transcript lines of every message kind, as the sender and as the receiver record them.

One table: each row drives a client/server pair to where the message is legal, sends it from one role
and checks the line both transcripts got. Both sides format the same event class from different
objects (the sender's event, the receiver's decoded one), so a field the sender leaves "as negotiated"
(OffsetData.length=-1, BlockStatus.extended=None, ExportNameReply.zeroes=None) must still show the
value that went on the wire.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from nbdref import Cmd, CmdFlag, Err, Info, Opt, Rep, Strictness, TxFlag
from nbdref import events as ev

from .helpers import ConnectionPair

GREETING = "S: NBDMAGIC IHAVEOPT handshake_flags=0x0003"
FLAGS = TxFlag.HAS_FLAGS | TxFlag.SEND_FLUSH | TxFlag.SEND_FUA


def _new(**kw) -> ConnectionPair:
    return ConnectionPair(**kw)


def greeted(zeroes: bool = False) -> ConnectionPair:
    p = _new()
    p.send(p.server, ev.NewstyleGreeting(flags=1 if zeroes else 3))
    p.send(p.client, ev.ClientFlags(flags=1 if zeroes else 3))
    return p


def asked(option: ev.Option, zeroes: bool = False) -> Callable[[], ConnectionPair]:
    def make() -> ConnectionPair:
        p = greeted(zeroes)
        p.send(p.client, option)
        return p

    return make


def tx(
    structured: bool = True, extended: bool = False, contexts: tuple[str, ...] = ()
) -> Callable[[], ConnectionPair]:
    def make() -> ConnectionPair:
        p = _new()
        p.handshake(structured=structured, extended=extended, contexts=contexts)
        return p

    return make


def in_flight(request: ev.Request, **kw) -> Callable[[], ConnectionPair]:
    def make() -> ConnectionPair:
        p = tx(**kw)()
        p.send(p.client, request)
        return p

    return make


READ = ev.Request(cookie=7, command=Cmd.READ, offset=4096, length=8)
BS = ev.Request(cookie=9, command=Cmd.BLOCK_STATUS, offset=0, length=4096)
WRITE = ev.Request(
    cookie=8, command=Cmd.WRITE, offset=0, length=4, flags=CmdFlag.FUA, payload=b"\x01\x02\x03\x04"
)

# (id, make the pair, sender "C"/"S", event, expected text (both sides) or (sender's, receiver's))
ROWS: list[tuple[str, Callable[[], ConnectionPair], str, ev.Event, str | tuple[str, str]]] = [
    ("newstyle", _new, "S", ev.NewstyleGreeting(flags=3), "NBDMAGIC IHAVEOPT handshake_flags=0x0003"),
    (
        "oldstyle",
        _new,
        "S",
        ev.OldstyleGreeting(export_size=512, transmission_flags=TxFlag.HAS_FLAGS | TxFlag.READ_ONLY),
        "NBDMAGIC cliserv_magic (oldstyle) size=512 flags=HAS_FLAGS|READ_ONLY",
    ),
    ("client-flags", lambda: _greeting_only(), "C", ev.ClientFlags(flags=3), "client_flags=0x00000003"),
    ("opt-export-name", greeted, "C", ev.OptExportName(name="exp"), 'NBD_OPT_EXPORT_NAME export="exp"'),
    ("opt-abort", greeted, "C", ev.OptAbort(), "NBD_OPT_ABORT"),
    ("opt-list", greeted, "C", ev.OptList(), "NBD_OPT_LIST"),
    ("opt-starttls", greeted, "C", ev.OptStartTLS(), "NBD_OPT_STARTTLS"),
    (
        "opt-info",
        greeted,
        "C",
        ev.OptInfo(name="exp", info=(Info.NAME, Info.BLOCK_SIZE)),
        'NBD_OPT_INFO export="exp" info=[NBD_INFO_NAME,NBD_INFO_BLOCK_SIZE]',
    ),
    ("opt-go", greeted, "C", ev.OptGo(name="", info=()), 'NBD_OPT_GO export="" info=[]'),
    ("opt-structured", greeted, "C", ev.OptStructuredReply(), "NBD_OPT_STRUCTURED_REPLY"),
    (
        "opt-list-meta",
        tx_options := lambda: _with_structured(),
        "C",
        ev.OptListMetaContext(name="exp", queries=("base:",)),
        "NBD_OPT_LIST_META_CONTEXT export=\"exp\" queries=['base:']",
    ),
    (
        "opt-set-meta",
        tx_options,
        "C",
        ev.OptSetMetaContext(name="exp", queries=("base:allocation",)),
        "NBD_OPT_SET_META_CONTEXT export=\"exp\" queries=['base:allocation']",
    ),
    ("opt-extended", greeted, "C", ev.OptExtendedHeaders(), "NBD_OPT_EXTENDED_HEADERS"),
    ("opt-unknown", greeted, "C", ev.OptUnknown(option=99, data=b"\xab"), "NBD_OPT_0x63 data=<1 bytes ab>"),
    (
        "export-name-reply",
        asked(ev.OptExportName(name="exp"), zeroes=True),
        "S",
        ev.ExportNameReply(export_size=1024, transmission_flags=FLAGS),
        "export size=1024 flags=HAS_FLAGS|SEND_FLUSH|SEND_FUA +124 zeroes",
    ),
    (
        "export-name-reply-no-zeroes",
        asked(ev.OptExportName(name="exp")),
        "S",
        ev.ExportNameReply(export_size=1024, transmission_flags=TxFlag.HAS_FLAGS),
        "export size=1024 flags=HAS_FLAGS (no zeroes)",
    ),
    (
        "rep-ack",
        asked(ev.OptStructuredReply()),
        "S",
        ev.RepAck(option=Opt.STRUCTURED_REPLY),
        "NBD_REP_ACK (to NBD_OPT_STRUCTURED_REPLY)",
    ),
    (
        "rep-server",
        asked(ev.OptList()),
        "S",
        ev.RepServer(option=Opt.LIST, name="a", details="d"),
        'NBD_REP_SERVER name="a" details="d" (to NBD_OPT_LIST)',
    ),
    (
        "rep-info-export",
        asked(ev.OptInfo(name="exp")),
        "S",
        ev.RepInfoExport(option=Opt.INFO, export_size=4096, transmission_flags=FLAGS),
        "NBD_REP_INFO NBD_INFO_EXPORT size=4096 flags=HAS_FLAGS|SEND_FLUSH|SEND_FUA (to NBD_OPT_INFO)",
    ),
    (
        "rep-info-name",
        asked(ev.OptInfo(name="exp")),
        "S",
        ev.RepInfoName(option=Opt.INFO, name="canon"),
        'NBD_REP_INFO NBD_INFO_NAME name="canon" (to NBD_OPT_INFO)',
    ),
    (
        "rep-info-description",
        asked(ev.OptInfo(name="exp")),
        "S",
        ev.RepInfoDescription(option=Opt.INFO, description="disk"),
        'NBD_REP_INFO NBD_INFO_DESCRIPTION "disk" (to NBD_OPT_INFO)',
    ),
    (
        "rep-info-block-size",
        asked(ev.OptInfo(name="exp", info=(Info.BLOCK_SIZE,))),
        "S",
        ev.RepInfoBlockSize(option=Opt.INFO, minimum=512, preferred=4096, maximum=1 << 20),
        "NBD_REP_INFO NBD_INFO_BLOCK_SIZE min=512 pref=4096 max=1048576 (to NBD_OPT_INFO)",
    ),
    (
        "rep-info-unknown",
        asked(ev.OptInfo(name="exp")),
        "S",
        ev.RepInfoUnknown(option=Opt.INFO, info_type=77, data=b"\x01"),
        "NBD_REP_INFO info_type=77 data=<1 bytes 01> (to NBD_OPT_INFO)",
    ),
    (
        "rep-meta-context",
        lambda: _meta_asked(),
        "S",
        ev.RepMetaContext(option=Opt.SET_META_CONTEXT, context_id=3, name="base:allocation"),
        'NBD_REP_META_CONTEXT id=3 name="base:allocation" (to NBD_OPT_SET_META_CONTEXT)',
    ),
    (
        "rep-error",
        asked(ev.OptGo(name="x")),
        "S",
        ev.RepError(option=Opt.GO, reply_type=Rep.ERR_UNKNOWN, message="no"),
        'NBD_REP_ERR_UNKNOWN (to NBD_OPT_GO) message="no"',
    ),
    (
        "rep-unknown",
        asked(ev.OptUnknown(option=99)),
        "S",
        ev.RepUnknown(option=99, reply_type=42, data=b"\x00"),
        "NBD_REP_0x2a data=<1 bytes 00> (to NBD_OPT_0x63)",
    ),
    ("request-read", tx(), "C", READ, "NBD_CMD_READ cookie=7 offset=4096 length=8"),
    (
        "request-write",
        tx(),
        "C",
        WRITE,
        "NBD_CMD_WRITE cookie=8 offset=0 length=4 flags=FUA payload=<4 bytes 01020304>",
    ),
    (
        "request-undefined-flag",
        lambda: _lenient_tx(),
        "C",
        ev.Request(cookie=3, command=Cmd.FLUSH, flags=0x8000),
        "NBD_CMD_FLUSH cookie=3 offset=0 length=0 flags=0x8000",
    ),
    (
        "request-undefined-intflag",
        lambda: _lenient_tx(),
        "C",
        ev.Request(cookie=4, command=Cmd.FLUSH, flags=CmdFlag(0x8001)),
        "NBD_CMD_FLUSH cookie=4 offset=0 length=0 flags=FUA|0x8000",
    ),
    (
        "request-disc",
        tx(),
        "C",
        ev.Request(cookie=1, command=Cmd.DISC),
        "NBD_CMD_DISC cookie=1 offset=0 length=0",
    ),
    (
        "simple-reply-error",
        in_flight(READ, structured=False),
        "S",
        ev.SimpleReply(cookie=7, error=Err.EIO),
        "simple reply cookie=7 error=5",
    ),
    (
        "simple-reply-data",
        in_flight(READ, structured=False),
        "S",
        ev.SimpleReply(cookie=7, data=b"abcdefgh"),
        "simple reply cookie=7 error=0 data=<8 bytes 6162636465666768>",
    ),
    (
        "offset-data",
        in_flight(READ),
        "S",
        ev.OffsetData(cookie=7, offset=4096, data=b"abcdefgh"),
        "NBD_REPLY_TYPE_OFFSET_DATA cookie=7 DONE offset=4096 length=8 data=<8 bytes 6162636465666768>",
    ),
    (
        "offset-data-memoryview",
        in_flight(READ),
        "S",
        ev.OffsetData(
            cookie=7, offset=4096, data=memoryview(bytearray(b"\x00\x01\x02\x03")).cast("H"), done=False
        ),
        "NBD_REPLY_TYPE_OFFSET_DATA cookie=7 offset=4096 length=4 data=<4 bytes 00010203>",
    ),
    (
        "offset-hole",
        in_flight(READ),
        "S",
        ev.OffsetHole(cookie=7, offset=4096, length=8),
        "NBD_REPLY_TYPE_OFFSET_HOLE cookie=7 DONE offset=4096 length=8",
    ),
    (
        "block-status",
        in_flight(BS, contexts=("base:allocation",)),
        "S",
        ev.BlockStatus(cookie=9, context_id=1, extents=((4096, 3),)),
        "NBD_REPLY_TYPE_BLOCK_STATUS cookie=9 DONE id=1 [4096:0x3]",
    ),
    (
        "block-status-ext",
        in_flight(BS, extended=True, contexts=("base:allocation",)),
        "S",
        ev.BlockStatus(cookie=9, context_id=1, extents=((4096, 0),)),  # extended=None: as negotiated
        "NBD_REPLY_TYPE_BLOCK_STATUS_EXT cookie=9 DONE id=1 [4096:0x0]",
    ),
    (
        "error-chunk",
        in_flight(READ),
        "S",
        ev.ErrorChunk(cookie=7, error=Err.EIO, message="bad"),
        'NBD_REPLY_TYPE_ERROR cookie=7 DONE error=NBD_EIO message="bad"',
    ),
    (
        "error-offset-chunk",
        in_flight(READ),
        "S",
        ev.ErrorChunk(cookie=7, error=Err.EIO, message="", offset=4100),
        'NBD_REPLY_TYPE_ERROR_OFFSET cookie=7 DONE error=NBD_EIO offset=4100 message=""',
    ),
    (
        "none-chunk",
        in_flight(ev.Request(cookie=5, command=Cmd.FLUSH)),
        "S",
        ev.NoneChunk(cookie=5),
        "NBD_REPLY_TYPE_NONE cookie=5 DONE",
    ),
    (
        "unknown-error-chunk",
        in_flight(READ),
        "S",
        ev.UnknownChunk(cookie=7, reply_type=0x8077, data=b"\x09"),
        "NBD_REPLY_TYPE_0x8077 cookie=7 DONE data=<1 bytes 09>",
    ),
]


def _greeting_only() -> ConnectionPair:
    p = _new()
    p.send(p.server, ev.NewstyleGreeting(flags=3))
    return p


def _with_structured() -> ConnectionPair:
    p = greeted()
    p.send(p.client, ev.OptStructuredReply())
    p.send(p.server, ev.RepAck(option=Opt.STRUCTURED_REPLY))
    return p


def _meta_asked() -> ConnectionPair:
    p = _with_structured()
    p.send(p.client, ev.OptSetMetaContext(name="exp", queries=("base:allocation",)))
    return p


def _lenient_tx() -> ConnectionPair:
    p = ConnectionPair(client=Strictness(check_local=False), server=Strictness.lenient())
    p.handshake()
    return p


@pytest.mark.parametrize(
    ("make", "sender", "event", "expected"), [r[1:] for r in ROWS], ids=[r[0] for r in ROWS]
)
def test_transcript_line_of_every_message_in_both_directions(make, sender, event, expected) -> None:
    p = make()
    src, dst = (p.client, p.server) if sender == "C" else (p.server, p.client)
    before_src, before_dst = len(src.transcript), len(dst.transcript)
    p.send(src, event)
    sent = [str(e) for e in list(src.transcript)[before_src:] if e.direction == sender]
    got = [str(e) for e in list(dst.transcript)[before_dst:] if e.direction == sender]
    mine, theirs = expected if isinstance(expected, tuple) else (expected, expected)
    assert sent == [f"{sender}: {mine}"]
    assert got == [f"{sender}: {theirs}"]
    assert "length=-1" not in sent[0]


def test_in_place_read_data_is_summarised_as_in_place() -> None:
    """A READ with ``read_buffer``: the receiver's line says where the data went, not its bytes."""
    p = ConnectionPair()
    p.handshake()
    buf = bytearray(8)
    p.send(p.client, ev.Request(cookie=1, command=Cmd.READ, offset=0, length=8, read_buffer=buf))
    p.send(p.server, ev.OffsetData(cookie=1, offset=0, data=b"12345678"))
    assert buf == b"12345678"
    assert str(list(p.client.transcript)[-1]) == (
        "S: NBD_REPLY_TYPE_OFFSET_DATA cookie=1 DONE offset=0 length=8 data=in-place"
    )


def test_transcript_nbytes_counts_the_payload() -> None:
    p = ConnectionPair()
    p.handshake()
    p.send(p.client, WRITE)
    assert list(p.client.transcript)[-1].nbytes == 28 + 4
    assert list(p.server.transcript)[-1].nbytes == 28 + 4


def test_every_event_class_is_in_the_table() -> None:
    """Adding a message kind without a transcript row fails here."""
    sent = {type(r[3]) for r in ROWS}
    abstract = {ev.Event, ev.Option, ev.OptionReply, ev.RepInfo, ev.Chunk}
    local = {ev.ReplyComplete, ev.StartTLS, ev.ConnectionClosed}  # never on the wire
    every = {getattr(ev, n) for n in ev.__all__ if isinstance(getattr(ev, n), type)} - {ev.Buffer}  # type: ignore[comparison-overlap]
    missing = {c.__name__ for c in every - abstract - local - sent if issubclass(c, ev.Event)}
    assert not missing
    assert GREETING.startswith("S:")


def test_buffers_of_another_item_size_are_counted_in_bytes() -> None:
    """``len`` of a memoryview counts items: a WRITE payload viewed as 32-bit words, or bytes handed to
    receive_data that way, must still frame as their size in bytes."""
    p = ConnectionPair()
    p.handshake()
    words = memoryview(bytearray(range(8))).cast("I")  # 2 items, 8 bytes
    data = p.client.send(ev.Request(cookie=1, command=Cmd.WRITE, offset=0, length=8, payload=words))
    assert len(data) == 28 + 8
    p.server.receive_data(memoryview(bytearray(data)).cast("H"))
    got = p.server.next_event()
    assert isinstance(got, ev.Request) and bytes(got.payload) == bytes(range(8))
    assert p.server.violations == []
