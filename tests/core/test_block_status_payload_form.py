"""NBD_CMD_BLOCK_STATUS in payload form (ext-header draft) and NBD_FLAG_BLOCK_STATUS_PAYLOAD.

Each test goes through the in-memory pair and quotes the sentence that decides it:
- the reply is limited to the ids in the payload and every length rule uses the effect length inside
  the payload (BS-056, BS-002, BS-059, BS-060, BS-085, BSZ-033, BS-064, SR-046, EXT-055, EXT-056);
- EXT-012 (advertising the payload form) binds the NBD_OPT_GO reply only.
qemu 10.0 / 11.1 with extended headers exposed most of these.
"""

from __future__ import annotations

import pytest
from nbdref import Cmd, CmdFlag, Err, LocalProtocolError, Opt, Strictness, TxFlag
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


# ---------------------------------------------------------------------------- many extents, error offsets
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
