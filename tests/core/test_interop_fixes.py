"""Core rules corrected after real peers (qemu 10.0 / 11.1 with extended headers) exposed them.

Each test goes through the in-memory pair and quotes the sentence that decides it:
- BLOCK_STATUS payload form (ext-header draft): the reply is limited to the ids in the payload and every
  length rule uses the effect length inside the payload (BS-056, BS-002, BS-059, BS-060, BS-085,
  BSZ-033, BS-064, EXT-055).
- EXT-012 binds the NBD_OPT_GO reply only.
- ERR-006: EOVERFLOW for a structured READ over the maximum payload is documented behaviour.
- EXT-002: an extended WRITE without PAYLOAD_LEN is recorded, and its data is still read.
"""

from __future__ import annotations

import pytest
from nbdref import Cmd, CmdFlag, Err, LocalProtocolError, Opt, RemoteProtocolError, Strictness, TxFlag
from nbdref import _outcome as outcome
from nbdref import _wire as w
from nbdref import events as ev

from .helpers import ConnectionPair, ids, send_lenient

TX = TxFlag.HAS_FLAGS | TxFlag.SEND_FLUSH | TxFlag.SEND_FUA
BSP = TX | TxFlag.BLOCK_STATUS_PAYLOAD
CONTEXTS = ("base:allocation", "qemu:allocation-depth", "qemu:dirty-bitmap:b0")  # ids 1, 2, 3
SIZE = 1 << 20
NO_FATAL = Strictness(fatal_levels=frozenset())


def pair(*, tx_flags: int = BSP, client: Strictness | None = None, server: Strictness | None = None,
         **kw) -> ConnectionPair:
    p = ConnectionPair(client=client, server=server)
    p.handshake(extended=True, contexts=CONTEXTS, export_size=SIZE, tx_flags=tx_flags, **kw)
    return p


def bs_request(effect: int, wanted: tuple[int, ...], *, offset: int = 0, flags: int = 0, cookie: int = 1) -> ev.Request:
    payload = w.encode_block_status_payload(effect, wanted)
    return ev.Request(
        cookie=cookie,
        command=Cmd.BLOCK_STATUS,
        flags=CmdFlag.PAYLOAD_LEN | flags,
        offset=offset,
        length=len(payload),
        payload=payload,
    )


# ---------------------------------------------------------------------------- BLOCK_STATUS payload form
# Ext-header draft, NBD_CMD_BLOCK_STATUS: a server advertising NBD_FLAG_BLOCK_STATUS_PAYLOAD supports "an
# alternative request form where the client sets NBD_CMD_FLAG_PAYLOAD_LEN in order to pass a payload that
# informs the server to limit its replies to the metacontext id(s) in the client's request payload";
# "C: 64 bits, effect length / C: n * 32 bits, list of metacontext ids to use".


def test_payload_form_reply_for_the_asked_ids_only_is_clean():
    p = pair()
    (req,) = p.send(p.client, bs_request(4096, (2,)))
    assert isinstance(req, ev.Request) and req.payload is not None and req.length == 12
    out = p.send(p.server, ev.BlockStatus(cookie=1, context_id=2, extents=((4096, 0),)))
    assert isinstance(out[-1], ev.ReplyComplete) and out[-1].error == 0
    assert ids(p.client) == [] and ids(p.server) == []


def test_payload_form_still_demands_every_asked_id():
    # "For a successful return, the server MUST use one reply chunk per selected context id" (BS-056):
    # the payload selected 1 and 3.
    p = pair(client=NO_FATAL)
    p.send(p.client, bs_request(4096, (1, 3)))
    send_lenient(p, p.server, ev.BlockStatus(cookie=1, context_id=1, extents=((4096, 0),)))
    assert ids(p.client) == ["BS-056"]
    assert "[3]" in p.client.violations[0].message


def test_payload_form_chunk_for_an_id_not_asked():
    p = pair(client=NO_FATAL)
    p.send(p.client, bs_request(4096, (2,)))
    send_lenient(p, p.server, ev.BlockStatus(cookie=1, context_id=1, extents=((4096, 0),)))
    assert ids(p.client) == ["BS-002", "BS-056"]


def test_normal_form_still_demands_every_negotiated_context():
    p = pair(client=NO_FATAL)
    p.send(p.client, ev.Request(cookie=1, command=Cmd.BLOCK_STATUS, length=4096))
    send_lenient(p, p.server, ev.BlockStatus(cookie=1, context_id=1, extents=((4096, 0),)))
    assert ids(p.client) == ["BS-056"]


@pytest.mark.parametrize(
    ("flags", "extents", "expected"),
    [
        # "If the client used the NBD_CMD_FLAG_REQ_ONE flag, each chunk contains exactly one descriptor
        # where the length of the descriptor MUST NOT be greater than the length of the request" (BS-059):
        # the effect length (8192), not the 12-byte payload length.
        (CmdFlag.REQ_ONE, ((8192, 0),), []),
        (CmdFlag.REQ_ONE, ((8193, 0),), ["BS-059"]),
        # Without REQ_ONE "the lengths of all but the last extent must sum to less than the requested
        # length" (BS-060).
        (0, ((4096, 0), (4096, 1)), []),
        (0, ((8192, 0), (4096, 1)), ["BS-060"]),
    ],
)
def test_payload_form_extent_rules_use_the_effect_length(flags, extents, expected):
    p = pair(client=NO_FATAL)
    p.send(p.client, bs_request(8192, (1,), flags=flags))
    send_lenient(p, p.server, ev.BlockStatus(cookie=1, context_id=1, extents=extents))
    assert ids(p.client) == expected


def test_payload_form_range_rules_use_the_effect_length():
    # "The client MUST NOT send a request whose offset plus length exceeds the export size" (BSZ-033):
    # offset + 12 is inside, offset + effect length is not.
    p = pair()
    with pytest.raises(LocalProtocolError, match="BSZ-033"):
        p.client.send(bs_request(8192, (1,), offset=SIZE - 4096))
    p.client.send(bs_request(4096, (1,), offset=SIZE - 4096))  # exactly to the end: fine
    # Received: the server records it.
    p = pair(server=NO_FATAL)
    send_lenient(p, p.client, bs_request(8192, (1,), offset=SIZE - 4096))
    assert ids(p.server) == ["BSZ-033"]
    # "The client SHOULD NOT request a status length of 0" (BS-064): the effect length, not 12.
    p = pair()
    p.send(p.client, bs_request(0, (1,)))
    assert ids(p.server) == ["BS-064"]


def test_payload_form_past_the_end_is_judged_by_the_effect_length():
    # "The server SHOULD return NBD_EINVAL if it receives a NBD_CMD_BLOCK_STATUS request with an effect
    # length exceeding the size of the export" (BS-085).
    request = bs_request(8192, (1,), offset=SIZE - 4096)
    p = pair(server=NO_FATAL)
    send_lenient(p, p.client, request)
    assert p.server.refusals(request) == [("BS-085", Err.EINVAL)]
    assert p.server.refusals(bs_request(4096, (1,), offset=SIZE - 4096)) == []
    send_lenient(p, p.server, ev.BlockStatus(cookie=1, context_id=1, extents=((4096, 0),)))
    assert "BS-085" in ids(p.client)


@pytest.mark.parametrize(
    ("wanted", "tx_flags", "refused"),
    [
        ((1, 3), BSP, False),
        ((), BSP, False),  # n = 0: the draft names no id to refuse
        ((2, 2), BSP, True),  # duplicate
        ((4,), BSP, True),  # unknown
        ((1,), TX, True),  # payload form not advertised
    ],
)
def test_payload_form_refusals(wanted, tx_flags, refused):
    # "If the server does not support the payload form, or detects duplicate or unknown metacontext ids in
    # the client's payload, the server MUST gracefully consume the client's payload before failing with
    # NBD_EINVAL" (EXT-055).
    p = pair(tx_flags=tx_flags, client=NO_FATAL, server=NO_FATAL)
    request = bs_request(4096, wanted)
    send_lenient(p, p.client, request)
    assert (("EXT-055", Err.EINVAL) in p.server.refusals(request)) is refused
    # A client judges the server that succeeds anyway.
    send_lenient(p, p.server, ev.BlockStatus(cookie=1, context_id=1, extents=((4096, 0),)))
    assert ("EXT-055" in ids(p.client)) is refused


def test_payload_form_einval_for_duplicate_ids_is_clean():
    p = pair()
    p.send(p.client, bs_request(4096, (2, 2)))
    out = p.send(p.server, ev.ErrorChunk(cookie=1, error=Err.EINVAL, message="duplicate id"))
    assert out[-1].error == Err.EINVAL
    assert ids(p.client) == [] and ids(p.server) == []


def test_payload_form_malformed_demands_nothing_but_is_flagged():
    # "The payload form MUST occupy 8 + n*4 bytes" (EXT-056): 10 bytes carry no id list to judge by.
    p = pair(server=NO_FATAL)
    bad = ev.Request(cookie=1, command=Cmd.BLOCK_STATUS, flags=CmdFlag.PAYLOAD_LEN, length=10, payload=bytes(10))
    send_lenient(p, p.client, bad)
    assert ids(p.server) == ["EXT-056"]
    send_lenient(p, p.server, ev.BlockStatus(cookie=1, context_id=1, extents=((4096, 0),)))
    assert ids(p.client) == []


# ---------------------------------------------------------------------------- EXT-012
# "Servers MUST NOT advertise this bit unless the client successfully negotiates extended headers via
# NBD_OPT_EXTENDED_HEADERS, and SHOULD NOT advertise this bit in response to NBD_OPT_GO if the client
# does not negotiate metacontexts with NBD_OPT_SET_META_CONTEXT" (EXT-012: the GO reply only).


def _greeted() -> ConnectionPair:
    p = ConnectionPair()
    p.send(p.server, ev.NewstyleGreeting(flags=1 | 2))
    p.send(p.client, ev.ClientFlags(flags=1 | 2))
    p.send(p.client, ev.OptExtendedHeaders())
    p.send(p.server, ev.RepAck(option=Opt.EXTENDED_HEADERS))
    return p


def test_info_reply_may_offer_block_status_payload():
    p = _greeted()
    p.send(p.client, ev.OptInfo(name="e"))
    p.send(p.server, ev.RepInfoExport(option=Opt.INFO, export_size=4096, transmission_flags=BSP))
    p.send(p.server, ev.RepAck(option=Opt.INFO))
    assert ids(p.client) == []


def test_go_reply_without_contexts_breaks_ext_012():
    p = _greeted()
    p.send(p.client, ev.OptGo(name="e"))
    p.send(p.server, ev.RepInfoExport(option=Opt.GO, export_size=4096, transmission_flags=BSP))
    assert ids(p.client) == ["EXT-012"]


def test_go_reply_with_contexts_of_another_export_breaks_ext_012():
    p = _greeted()
    p.send(p.client, ev.OptSetMetaContext(name="other", queries=("base:allocation",)))
    p.send(p.server, ev.RepMetaContext(option=Opt.SET_META_CONTEXT, context_id=1, name="base:allocation"))
    p.send(p.server, ev.RepAck(option=Opt.SET_META_CONTEXT))
    p.send(p.client, ev.OptGo(name="e"))
    p.send(p.server, ev.RepInfoExport(option=Opt.GO, export_size=4096, transmission_flags=BSP))
    assert ids(p.client) == ["EXT-012"]


def test_go_reply_with_contexts_of_this_export_is_clean():
    p = pair()  # SET_META_CONTEXT and GO both name "exp"
    assert ids(p.client) == [] and p.client.transmission_flags & TxFlag.BLOCK_STATUS_PAYLOAD


# ---------------------------------------------------------------------------- ERR-006
# "The server SHOULD NOT return NBD_EOVERFLOW except as documented in response to NBD_CMD_READ when
# NBD_CMD_FLAG_DF is supported, or when a command without payload requests a length larger than an
# advertised maximum payload length" (ERR-006); proto.md, NBD_CMD_READ with structured replies: "A server
# MAY support read requests larger than the maximum payload size by splitting the response across
# multiple chunks ...; however, the server is also permitted to reject large read requests up front with
# NBD_EOVERFLOW".

BIG = 1 << 30


def _eoverflow_read(length: int, *, structured: bool = True, block_size=None) -> ConnectionPair:
    p = ConnectionPair(server=NO_FATAL)  # the simple-reply case has the client break BSZ-025
    p.handshake(structured=structured, export_size=BIG, block_size=block_size)
    send_lenient(p, p.client, ev.Request(cookie=1, command=Cmd.READ, length=length))
    if structured:
        p.send(p.server, ev.ErrorChunk(cookie=1, error=Err.EOVERFLOW, message="too large"))
    else:
        p.send(p.server, ev.SimpleReply(cookie=1, error=Err.EOVERFLOW))
    return p


@pytest.mark.parametrize(
    ("length", "block_size", "flagged"),
    [
        ((1 << 25) + 512, None, False),  # over the 2^25 default maximum payload
        (1 << 25, None, True),  # not over it
        ((1 << 20) + 512, (512, 4096, 1 << 20), False),  # over the advertised maximum
        (1 << 20, (512, 4096, 1 << 20), True),
        ((1 << 25) + 512, (512, 4096, 1 << 26), True),  # the advertised maximum is larger than 2^25
    ],
)
def test_eoverflow_for_a_large_structured_read(length, block_size, flagged):
    p = _eoverflow_read(length, block_size=block_size)
    assert ("ERR-006" in ids(p.client)) is flagged
    # Our own server side notes a SHOULD it breaks in the transcript ("sent anyway"): only when flagged.
    assert ("ERR-006" in str(p.server.transcript)) is flagged


def test_eoverflow_for_a_simple_reply_read_is_still_flagged():
    # With simple replies a READ over the maximum is the client's breach (BSZ-025); nothing documents
    # EOVERFLOW for it.
    p = _eoverflow_read(1 << 20, structured=False, block_size=(512, 4096, 65536))
    assert "ERR-006" in ids(p.client)


def test_outcome_eoverflow_table():
    st = outcome.Negotiated(
        export_size=BIG, transmission_flags=TxFlag.HAS_FLAGS, min_block=None, max_payload=None, contexts=0,
        structured=True,
    )
    assert outcome.judge(Cmd.READ, 0, 0, (1 << 25) + 1, Err.EOVERFLOW, st) == []
    assert [r for r, _ in outcome.judge(Cmd.READ, 0, 0, 1 << 25, Err.EOVERFLOW, st)] == ["ERR-006"]
    simple = outcome.Negotiated(
        export_size=BIG, transmission_flags=TxFlag.HAS_FLAGS, min_block=None, max_payload=None, contexts=0
    )
    assert [r for r, _ in outcome.judge(Cmd.READ, 0, 0, (1 << 25) + 1, Err.EOVERFLOW, simple)] == ["ERR-006"]


# ---------------------------------------------------------------------------- EXT-002
# "The command NBD_CMD_WRITE MUST use the flag NBD_CMD_FLAG_PAYLOAD_LEN in this mode" (EXT-002, binds the
# client). qemu-io 10.0/11.1 omit it; qemu-nbd 11.1 reads length bytes of data anyway, since "the write
# command always sends a payload of the length given".


def _write_without_flag(length: int, server: Strictness | None) -> tuple[ConnectionPair, bytes]:
    p = ConnectionPair(client=Strictness(disabled=frozenset({"EXT-002"})), server=server)
    p.handshake(extended=True, export_size=SIZE)
    data = bytes(range(256)) * (length // 256)
    wire = p.client.send(ev.Request(cookie=1, command=Cmd.WRITE, offset=0, length=length, payload=data))
    # The header says length; no PAYLOAD_LEN flag.
    (_, flags, cmd, _, _, hdr_len) = w.EXTENDED_REQUEST.unpack_from(wire)
    assert flags & CmdFlag.PAYLOAD_LEN == 0 and cmd == Cmd.WRITE and hdr_len == length
    assert len(wire) == w.EXTENDED_REQUEST.size + length
    wire += p.client.send(ev.Request(cookie=2, command=Cmd.FLUSH))
    return p, wire


@pytest.mark.parametrize("length", [4096, 128 << 10], ids=["small", "sink"])
def test_extended_write_without_payload_len_is_read_and_recorded(length):
    p, wire = _write_without_flag(length, NO_FATAL)
    got = p.deliver(p.server, wire)
    write, flush = got
    assert isinstance(write, ev.Request) and bytes(write.payload) == bytes(range(256)) * (length // 256)
    assert isinstance(flush, ev.Request) and flush.command == Cmd.FLUSH  # the stream stays framed
    assert ids(p.server) == ["EXT-002"]
    assert p.server.violations[0].level == "MUST" and p.server.violations[0].direction == "C"


def test_extended_write_without_payload_len_is_fatal_under_default_strictness():
    # Its level (MUST) decides, as for every other rule: fatal by default, not forced.
    p, wire = _write_without_flag(4096, None)
    p.server.receive_data(wire)
    with pytest.raises(RemoteProtocolError) as exc:
        p.server.next_event()
    assert exc.value.violation is not None and exc.value.violation.req_id == "EXT-002"


def test_extended_write_without_payload_len_disabled_check():
    p, wire = _write_without_flag(4096, Strictness(disabled=frozenset({"EXT-002"})))
    got = p.deliver(p.server, wire)
    assert [e.command for e in got] == [Cmd.WRITE, Cmd.FLUSH] and ids(p.server) == []


def test_our_client_still_refuses_an_extended_write_without_payload_len():
    p = ConnectionPair()
    p.handshake(extended=True, export_size=SIZE)
    with pytest.raises(LocalProtocolError, match="EXT-002"):
        p.client.send(ev.Request(cookie=1, command=Cmd.WRITE, length=4, payload=b"abcd"))

