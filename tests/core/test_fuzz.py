"""Property tests: hostile byte streams never crash, hang or balloon either role.

Random bytes and mutations of a valid session are fed to both roles in every phase; the only
exceptions allowed out of the core are ProtocolError subclasses, next_event() must reach NEED_DATA
or a terminal event within a bounded number of calls, and the receive buffer may not grow far
beyond what was fed.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nbdref import NEED_DATA, Cmd, CmdFlag, ProtocolError, Strictness, TxFlag
from nbdref import events as ev

from .helpers import ConnectionPair

# NBDREF_FUZZ_EXAMPLES=5000 for a longer hunt; the default keeps the file at a few seconds.
SETTINGS = settings(max_examples=int(os.environ.get("NBDREF_FUZZ_EXAMPLES", "150")), deadline=None, suppress_health_check=[HealthCheck.too_slow])
MEMORY_SLACK = 2 * 1024 * 1024  # fixed buffers (receive buffer, one READ) on top of what was fed


def _client_in(phase: str) -> ConnectionPair:
    p = ConnectionPair()
    if phase == "greeting":
        return p
    if phase == "options":
        p.send(p.server, ev.NewstyleGreeting())
        p.send(p.client, ev.ClientFlags())
        p.send(p.client, ev.OptGo(name="e", info=(3,)))
        return p
    flags = TxFlag.HAS_FLAGS | TxFlag.SEND_DF | TxFlag.SEND_FLUSH
    p.handshake(contexts=("base:allocation",), extended=phase == "extended", tx_flags=flags)
    p.send(p.client, ev.Request(cookie=1, command=Cmd.READ, offset=0, length=8192, read_buffer=bytearray(8192)))
    p.send(p.client, ev.Request(cookie=2, command=Cmd.READ, flags=CmdFlag.DF, offset=4096, length=4096))
    p.send(p.client, ev.Request(cookie=3, command=Cmd.BLOCK_STATUS, offset=0, length=65536))
    p.send(p.client, ev.Request(cookie=4, command=Cmd.FLUSH))
    return p


def _server_in(phase: str) -> ConnectionPair:
    p = ConnectionPair()
    p.send(p.server, ev.NewstyleGreeting())
    if phase == "flags":
        return p
    p.send(p.client, ev.ClientFlags())
    if phase == "options":
        return p
    p.send(p.client, ev.OptExtendedHeaders() if phase == "extended" else ev.OptStructuredReply())
    p.send(p.server, ev.RepAck(option=11 if phase == "extended" else 8))
    p.send(p.client, ev.OptGo(name="e"))
    p.send(p.server, ev.RepInfoExport(option=7, export_size=1 << 20, transmission_flags=0xFFF))
    p.send(p.server, ev.RepAck(option=7))
    return p


def _drain(conn, data: bytes, cuts: list[int]) -> None:
    """Feed ``data`` in pieces; pull events until NEED_DATA; only ProtocolError may escape."""
    pieces, last = [], 0
    for c in [*sorted(set(min(c, len(data)) for c in cuts)), len(data)]:
        pieces.append(data[last:c])
        last = c
    try:
        for piece in [*pieces, b""]:
            if not piece and piece is not pieces[-1] and pieces:
                continue
            conn.receive_data(piece)
            for _ in range(len(data) + 16):  # every event consumes bytes: this bounds the loop
                e = conn.next_event()
                if e is NEED_DATA or isinstance(e, ev.ConnectionClosed):
                    break
            else:
                raise AssertionError("next_event() did not reach NEED_DATA")
            if isinstance(e, ev.ConnectionClosed):
                break
    except ProtocolError:
        pass
    assert len(conn._buf._buf) <= 2 * len(data) + MEMORY_SLACK


CLIENT_PHASES = st.sampled_from(["greeting", "options", "structured", "extended"])
SERVER_PHASES = st.sampled_from(["flags", "options", "structured", "extended"])
CUTS = st.lists(st.integers(min_value=0, max_value=4096), max_size=6)


@SETTINGS
@given(phase=CLIENT_PHASES, data=st.binary(max_size=2048), cuts=CUTS)
def test_client_survives_random_bytes(phase, data, cuts):
    _drain(_client_in(phase).client, data, cuts)


@SETTINGS
@given(phase=SERVER_PHASES, data=st.binary(max_size=2048), cuts=CUTS)
def test_server_survives_random_bytes(phase, data, cuts):
    _drain(_server_in(phase).server, data, cuts)


# Plausible prefixes: valid magics followed by random fields reach deeper into the parsers.
MAGICS = [
    bytes.fromhex("67446698"),
    bytes.fromhex("668e33ef"),
    bytes.fromhex("6e8a278c"),
    bytes.fromhex("0003e889045565a9"),
    bytes.fromhex("25609513"),
    bytes.fromhex("21e41c71"),
    b"IHAVEOPT",
    b"NBDMAGICIHAVEOPT",
    b"NBDMAGIC\x00\x00B\x02\x81\x86\x12S",
]


@SETTINGS
@given(
    phase=CLIENT_PHASES,
    parts=st.lists(st.tuples(st.sampled_from(MAGICS), st.binary(max_size=40)), max_size=6),
    cuts=CUTS,
    lenient=st.booleans(),
)
def test_client_survives_magic_led_garbage(phase, parts, cuts, lenient):
    p = _client_in(phase)
    if lenient:
        p.client.strictness = Strictness.lenient()
    _drain(p.client, b"".join(m + tail for m, tail in parts), cuts)


@SETTINGS
@given(
    phase=SERVER_PHASES,
    parts=st.lists(st.tuples(st.sampled_from(MAGICS), st.binary(max_size=40)), max_size=6),
    cuts=CUTS,
    lenient=st.booleans(),
)
def test_server_survives_magic_led_garbage(phase, parts, cuts, lenient):
    p = _server_in(phase)
    if lenient:
        p.server.strictness = Strictness.lenient()
    _drain(p.server, b"".join(m + tail for m, tail in parts), cuts)


def _valid_server_stream() -> tuple[ConnectionPair, bytes]:
    """A client with requests in flight and the server bytes that answer them correctly."""
    p = _client_in("structured")
    s = p.server
    out = b"".join(
        [
            s.send(ev.OffsetData(cookie=1, offset=0, data=b"a" * 4096, done=False)),
            s.send(ev.OffsetHole(cookie=1, offset=4096, length=4096, done=False)),
            s.send(ev.OffsetData(cookie=2, offset=4096, data=b"b" * 4096, done=False)),
            s.send(ev.NoneChunk(cookie=1)),
            s.send(ev.BlockStatus(cookie=3, context_id=1, extents=((4096, 3), (61440, 0)))),
            s.send(ev.SimpleReply(cookie=4)),
            s.send(ev.ErrorChunk(cookie=2, error=5, message="eio", offset=4096)),
        ]
    )
    return p, out


@SETTINGS
@given(
    flips=st.lists(st.tuples(st.integers(min_value=0, max_value=10_000), st.integers(0, 255)), min_size=1, max_size=4),
    cut=st.integers(min_value=0, max_value=10_000),
    cuts=CUTS,
)
def test_client_survives_mutated_valid_stream(flips, cut, cuts):
    p, stream = _valid_server_stream()
    data = bytearray(stream)
    for pos, byte in flips:
        data[pos % len(data)] = byte
    _drain(p.client, bytes(data[: max(cut, 1)]), cuts)


def _valid_client_stream(extended: bool) -> tuple[ConnectionPair, bytes]:
    """A server in transmission and the client bytes of a correct batch of requests."""
    p = ConnectionPair()
    flags = TxFlag.HAS_FLAGS | TxFlag.SEND_FLUSH | TxFlag.SEND_FUA | TxFlag.SEND_TRIM | TxFlag.SEND_WRITE_ZEROES
    p.handshake(contexts=("base:allocation",), extended=extended, tx_flags=flags)
    c = p.client
    wflag = CmdFlag.PAYLOAD_LEN if extended else 0
    out = b"".join(
        [
            c.send(ev.Request(cookie=1, command=Cmd.WRITE, flags=wflag | CmdFlag.FUA, offset=0, length=100, payload=bytes(100))),
            c.send(ev.Request(cookie=2, command=Cmd.READ, offset=512, length=4096)),
            c.send(ev.Request(cookie=3, command=Cmd.TRIM, offset=0, length=4096)),
            c.send(ev.Request(cookie=4, command=Cmd.WRITE_ZEROES, flags=CmdFlag.NO_HOLE, offset=0, length=4096)),
            c.send(ev.Request(cookie=5, command=Cmd.BLOCK_STATUS, offset=0, length=8192)),
            c.send(ev.Request(cookie=6, command=Cmd.WRITE, flags=wflag, offset=0, length=70000, payload=bytes(70000))),
        ]
    )
    return p, out


@SETTINGS
@given(
    extended=st.booleans(),
    flips=st.lists(st.tuples(st.integers(min_value=0, max_value=80_000), st.integers(0, 255)), min_size=1, max_size=4),
    cut=st.integers(min_value=0, max_value=80_000),
    cuts=CUTS,
)
def test_server_survives_mutated_valid_stream(extended, flips, cut, cuts):
    p, stream = _valid_client_stream(extended)
    data = bytearray(stream)
    for pos, byte in flips:
        data[pos % len(data)] = byte
    _drain(p.server, bytes(data[: max(cut, 1)]), cuts)


@pytest.mark.parametrize("extended", [False, True])
def test_the_valid_client_stream_is_valid(extended):
    p, stream = _valid_client_stream(extended)
    events = p.deliver(p.server, stream)
    assert [e.cookie for e in events] == [1, 2, 3, 4, 5, 6]
    assert p.server.violations == []


def test_the_valid_stream_is_valid():
    """The unmutated stream decodes without a violation (so mutations are what the fuzzer tests)."""
    p, stream = _valid_server_stream()
    events = p.deliver(p.client, stream)
    assert p.client.violations == []
    assert sum(isinstance(e, ev.ReplyComplete) for e in events) == 4


def test_huge_declared_lengths_do_not_allocate():
    """A 4 GiB option or chunk length is refused before any allocation."""
    import tracemalloc

    from nbdref import _wire as w

    p = _client_in("structured")
    tracemalloc.start()
    _drain(p.client, w.encode_chunk_header(0, 0x7777, 4, 0xFFFFFFFF, False), [])
    p2 = _server_in("options")
    _drain(p2.server, w.OPTION_HEADER.pack(0x49484156454F5054, 7, 0xFFFFFFFF), [])
    p3 = _client_in("structured")
    _drain(p3.client, w.encode_chunk_header(0, 1, 1, 0xFFFFFFFF, False) + bytes(8), [])
    p4 = _client_in("structured")  # a block status chunk cannot need more than 8 bytes per byte asked
    _drain(p4.client, w.encode_chunk_header(0, 5, 3, 60 << 20, False), [])
    assert p4.client.state.name == "ERROR"
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 8 * 1024 * 1024
