"""Unit tests of the small core modules: receive buffer, transcript text, outcome table, catalogue."""

from __future__ import annotations

import pytest
from nbdref import Cmd, CmdFlag, Err, TxFlag
from nbdref import _outcome as outcome
from nbdref import events as ev
from nbdref._buffer import ReceiveBuffer
from nbdref._transcript import Entry, Transcript, describe

# ---------------------------------------------------------------- ReceiveBuffer


def test_buffer_grows_without_invalidating_old_views():
    b = ReceiveBuffer(capacity=16)
    old = b.get_buffer(8)
    old[:4] = b"abcd"
    b.buffer_updated(4)
    new = b.get_buffer(1000)  # forces a new bytearray while ``old`` is still alive
    assert len(new) >= 1000
    old[:1] = b"X"  # writing to the stale view is harmless
    assert b.take(4) == b"abcd"


def test_buffer_compacts_in_place_while_a_view_is_alive():
    b = ReceiveBuffer(capacity=64)
    view = b.get_buffer(64)
    view[:40] = bytes(range(40))
    b.buffer_updated(40)
    b.skip(30)
    same = b._buf
    b.get_buffer(50)  # 10 unread + 50 free fit in 64: moved to the front, no new allocation
    assert b._buf is same and b.take(10) == bytes(range(30, 40))
    view[:1] = b"!"  # the old view is still usable memory


def test_buffer_feed_take_and_copy_into():
    b = ReceiveBuffer(capacity=8)
    b.feed(b"hello ")
    b.feed(memoryview(b"world, a long line"))
    assert len(b) == 24 and b.peek(5) == b"hello"
    target = bytearray(6)
    assert b.copy_into(memoryview(target), 6) == 6 and target == b"hello "
    assert b.take_all() == b"world, a long line" and len(b) == 0


def test_buffer_updated_beyond_what_was_handed_out():
    b = ReceiveBuffer(capacity=8)
    view = b.get_buffer(4)
    with pytest.raises(ValueError):
        b.buffer_updated(len(view) + 1)


# ---------------------------------------------------------------- transcript


ALL_EVENTS = [
    ev.NewstyleGreeting(),
    ev.OldstyleGreeting(export_size=1),
    ev.ClientFlags(),
    ev.OptExportName(name="e"),
    ev.OptAbort(),
    ev.OptList(data=b"x"),
    ev.OptStartTLS(),
    ev.OptInfo(name="e", info=(3, 99)),
    ev.OptGo(name="e"),
    ev.OptStructuredReply(),
    ev.OptListMetaContext(name="e", queries=("base:",)),
    ev.OptSetMetaContext(name="e"),
    ev.OptExtendedHeaders(),
    ev.OptUnknown(option=99, data=b"?", reason="bad"),
    ev.ExportNameReply(export_size=1, zeroes=False),
    ev.RepAck(option=7),
    ev.RepServer(option=3, name="a", details="d"),
    ev.RepInfoExport(option=7, export_size=5, transmission_flags=TxFlag.HAS_FLAGS | 0x8000),
    ev.RepInfoName(option=7, name="n"),
    ev.RepInfoDescription(option=7, description="d"),
    ev.RepInfoBlockSize(option=7),
    ev.RepInfoUnknown(option=7, info_type=9, data=b"z"),
    ev.RepMetaContext(option=10, context_id=1, name="base:allocation"),
    ev.RepError(option=7, reply_type=0x80000077, message="m"),
    ev.RepUnknown(option=7, reply_type=55, data=b"q"),
    ev.Request(cookie=1, command=Cmd.WRITE, flags=CmdFlag.FUA | 0x400, length=3, payload=b"abc"),
    ev.Request(cookie=1, command=99),
    ev.SimpleReply(cookie=1, error=5),
    ev.SimpleReply(cookie=1, in_place=True),
    ev.OffsetData(cookie=1, offset=0, data=bytes(100), length=100),
    ev.OffsetHole(cookie=1, offset=0, length=5),
    ev.BlockStatus(cookie=1, context_id=1, extents=tuple((512, 0) for _ in range(9))),
    ev.ErrorChunk(cookie=1, error=5, message="m", offset=3),
    ev.ErrorChunk(cookie=1, error=12345),
    ev.NoneChunk(cookie=1),
    ev.UnknownChunk(cookie=1, reply_type=0x8099, data=b"?"),
    ev.ReplyComplete(cookie=1),
    ev.StartTLS(),
    ev.ConnectionClosed(),
]


@pytest.mark.parametrize("event", ALL_EVENTS, ids=lambda e: type(e).__name__)
def test_every_event_has_a_one_line_description(event):
    text = describe(event)
    assert text and "\n" not in text
    assert str(Entry("C", "x", 0, event=event)) == f"C: {text}"


def test_descriptions_name_the_spec_constants():
    assert describe(ev.RepError(option=7, reply_type=0x80000006, message="gone")) == (
        'NBD_REP_ERR_UNKNOWN (to NBD_OPT_GO) message="gone"'
    )
    assert describe(ev.Request(cookie=7, command=Cmd.WRITE, flags=CmdFlag.FUA, length=2, payload=b"hi")) == (
        "NBD_CMD_WRITE cookie=7 offset=0 length=2 flags=FUA payload=<2 bytes 6869>"
    )
    long = describe(ev.OffsetData(cookie=1, offset=0, data=bytes(range(40)), length=40))
    assert "<40 bytes 000102030405060708090a0b0c0d0e0f...>" in long


def test_transcript_formats_lazily():
    t = Transcript()
    e = ev.OptGo(name="x")
    t.record("C", e, 20)
    entry = next(iter(t))
    assert entry._text is None  # nothing formatted until somebody reads it
    assert entry.text == 'NBD_OPT_GO export="x" info=[]' and entry.nbytes == 20


# ---------------------------------------------------------------- outcome table

ST = outcome.Negotiated(
    export_size=1 << 20, transmission_flags=TxFlag.HAS_FLAGS | TxFlag.READ_ONLY, min_block=512, max_payload=1 << 20, contexts=0
)


def test_conflicting_expectations_only_demand_failure():
    # A WRITE past the end of a read-only export: ENOSPC (ERR-001) and EPERM (ERR-005) both apply, so
    # only "must fail" (WR-001) is judged.
    args = (Cmd.WRITE, 0, 1 << 20, 512)
    assert outcome.judge(*args, Err.ENOSPC, ST) == []
    assert outcome.judge(*args, Err.EPERM, ST) == []
    assert [r for r, _ in outcome.judge(*args, 0, ST)] == ["WR-001"]


def test_valid_requests_have_no_refusals():
    rw = outcome.Negotiated(export_size=1 << 20, transmission_flags=TxFlag.HAS_FLAGS, min_block=512, max_payload=None, contexts=1)
    for cmd in (Cmd.READ, Cmd.WRITE, Cmd.TRIM, Cmd.BLOCK_STATUS, Cmd.FLUSH):
        assert outcome.refusals(cmd, 0, 0, 512, rw) == []
        assert outcome.judge(cmd, 0, 0, 512, 0, rw) == []


def test_eoverflow_is_fine_for_df_reads_and_oversize_payloadless_requests():
    assert outcome.judge(Cmd.READ, CmdFlag.DF, 0, 4096, Err.EOVERFLOW, ST) == []
    assert outcome.judge(Cmd.CACHE, 0, 0, 2 << 20, Err.EOVERFLOW, ST) == []
    assert [r for r, _ in outcome.judge(Cmd.READ, 0, 0, 4096, Err.EOVERFLOW, ST)] == ["ERR-006"]


def test_connection_refusals_use_the_negotiated_state():
    from .helpers import ConnectionPair

    p = ConnectionPair()
    p.handshake(tx_flags=TxFlag.HAS_FLAGS | TxFlag.READ_ONLY, export_size=4096)
    write = ev.Request(cookie=1, command=Cmd.WRITE, offset=0, length=1, payload=b"x")
    assert p.server.refusals(write) == [("WR-001", None), ("ERR-005", Err.EPERM)]
    assert p.server.refusals(ev.Request(cookie=1, command=Cmd.READ, offset=4096, length=1)) == [("ERR-003", Err.EINVAL)]
    assert p.server.refusals(ev.Request(cookie=1, command=Cmd.READ, offset=0, length=4096)) == []
