"""Undefined flag bits in every flags field, sent and received.

``~`` of an IntFlag keeps only the bits its class defines, so a check written ``flags & ~VALID`` on
IntFlags never sees bit 15 of a command's flags; the core works on plain ints. Each test passes the
flags both as a plain int and as an IntFlag carrying the undefined bit, as callers do.
"""

from __future__ import annotations

import pytest
from nbdref import (
    ClientFlag,
    Cmd,
    CmdFlag,
    HandshakeFlag,
    LocalProtocolError,
    RemoteProtocolError,
    Strictness,
    TxFlag,
)
from nbdref import _wire as w
from nbdref import events as ev
from nbdref._constants import VALID_CMD_FLAGS

from .helpers import ConnectionPair

EVERY_TX_FLAG = sum(int(f) for f in TxFlag) & ~int(TxFlag.READ_ONLY | TxFlag.BLOCK_STATUS_PAYLOAD)
UNDEFINED_CMD_BITS = [1 << b for b in range(16) if not (1 << b) & sum(int(f) for f in CmdFlag)]


def _request(cmd: Cmd, flags: int) -> ev.Request:
    """A request that is legal in every other way, so only CMD-014 can fire."""
    if cmd in (Cmd.DISC, Cmd.FLUSH):
        return ev.Request(cookie=5, command=cmd, flags=flags)
    if cmd == Cmd.WRITE:
        return ev.Request(cookie=5, command=cmd, flags=flags, offset=0, length=4, payload=b"abcd")
    return ev.Request(cookie=5, command=cmd, flags=flags, offset=0, length=4096)


def _tx(**strictness) -> ConnectionPair:
    p = ConnectionPair(**strictness)
    p.handshake(contexts=("base:allocation",), tx_flags=EVERY_TX_FLAG)
    return p


def test_every_undefined_command_bit_is_listed() -> None:
    assert UNDEFINED_CMD_BITS[0] == 1 << 6 and UNDEFINED_CMD_BITS[-1] == 0x8000
    assert len(UNDEFINED_CMD_BITS) == 10


@pytest.mark.parametrize("as_intflag", [False, True], ids=["int", "IntFlag"])
@pytest.mark.parametrize("bit", [0x40, 0x8000], ids=["bit6", "bit15"])
@pytest.mark.parametrize("cmd", list(Cmd), ids=[c.name for c in Cmd])
def test_undefined_command_flag_is_refused_locally(cmd: Cmd, bit: int, as_intflag: bool) -> None:
    # "Clients MUST NOT set a command flag ... not documented for that command" (CMD-014)
    p = _tx()
    flags = CmdFlag(bit) if as_intflag else bit
    with pytest.raises(LocalProtocolError) as info:
        p.client.send(_request(cmd, flags))
    assert info.value.violation is not None and info.value.violation.req_id == "CMD-014"
    assert p.client.in_flight == {}  # nothing was sent, nothing is awaited


@pytest.mark.parametrize("bit", UNDEFINED_CMD_BITS, ids=[f"{b:#06x}" for b in UNDEFINED_CMD_BITS])
@pytest.mark.parametrize("cmd", list(Cmd), ids=[c.name for c in Cmd])
def test_undefined_command_flag_from_the_peer_is_a_violation(cmd: Cmd, bit: int) -> None:
    p = _tx(client=Strictness(check_local=False))
    raw = w.encode_request(_request(cmd, bit))
    p.server.receive_data(raw)
    with pytest.raises(RemoteProtocolError) as info:
        p.server.next_event()
    assert info.value.violation is not None and info.value.violation.req_id == "CMD-014"
    assert [v.req_id for v in p.server.violations] == ["CMD-014"]


@pytest.mark.parametrize("cmd", list(Cmd), ids=[c.name for c in Cmd])
def test_undefined_flag_is_refused_by_the_outcome_table(cmd: Cmd) -> None:
    """The server side answers an unknown flag with NBD_EINVAL (ERR-009), whatever the command."""
    p = _tx(client=Strictness(check_local=False))
    refusals = p.server.refusals(_request(cmd, CmdFlag(0x8000)))
    assert ("ERR-009", 22) in refusals


@pytest.mark.parametrize("cmd", list(Cmd), ids=[c.name for c in Cmd])
def test_documented_flags_pass(cmd: Cmd) -> None:
    """The other side of the coin: the flags VALID_CMD_FLAGS documents raise no CMD-014."""
    p = _tx(client=Strictness(disabled=frozenset({"FUA-003", "EXT-001", "DISC-027"})))
    flags = int(VALID_CMD_FLAGS[cmd]) & ~int(CmdFlag.PAYLOAD_LEN)
    if cmd == Cmd.BLOCK_STATUS:
        flags &= ~int(CmdFlag.REQ_ONE)
    p.send(p.client, _request(cmd, CmdFlag(flags)))
    assert "CMD-014" not in [v.req_id for v in p.server.violations]


@pytest.mark.parametrize("flags", [0x8003, HandshakeFlag(0x8003), 0x0007], ids=["int", "IntFlag", "bit2"])
def test_undefined_handshake_flags(flags: int) -> None:
    # "bits 2-15 ... MUST NOT be set" (HS-010)
    p = ConnectionPair()
    with pytest.raises(LocalProtocolError) as info:
        p.server.send(ev.NewstyleGreeting(flags=flags))
    assert info.value.violation.req_id == "HS-010"
    # A strict client records the breach and goes on: it "SHOULD ignore" flags it does not know (HS-005).
    lenient = ConnectionPair(server=Strictness(check_local=False))
    lenient.send(lenient.server, ev.NewstyleGreeting(flags=flags))
    assert [v.req_id for v in lenient.client.violations] == ["HS-010"]
    assert isinstance(lenient.client.handshake_flags, int)


@pytest.mark.parametrize(
    "flags", [0x80000001, ClientFlag(0x80000001), 0x00000005], ids=["int-bit31", "IntFlag-bit31", "bit2"]
)
def test_undefined_client_flags_and_the_server_that_carries_on(flags: int) -> None:
    # "Clients MUST NOT set any other flags" (HS-016)
    p = ConnectionPair()
    p.send(p.server, ev.NewstyleGreeting(flags=3))
    with pytest.raises(LocalProtocolError) as info:
        p.client.send(ev.ClientFlags(flags=flags))
    assert info.value.violation.req_id == "HS-016"
    # Sent anyway: the server records it; a server that then answers an option breaks HS-017
    # ("The server MUST drop the connection if the client sets an unknown flag").
    p = ConnectionPair(client=Strictness(check_local=False), server=Strictness.lenient())
    p.send(p.server, ev.NewstyleGreeting(flags=3))
    p.send(p.client, ev.ClientFlags(flags=flags))
    assert [v.req_id for v in p.server.violations] == ["HS-016"]
    p.send(p.client, ev.OptList())
    with pytest.raises(RemoteProtocolError) as info:
        p.send(p.server, ev.RepAck(option=3))
    assert info.value.violation.req_id == "HS-017"


@pytest.mark.parametrize("flags", [0x8001, TxFlag(0x8001)], ids=["int", "IntFlag"])
def test_undefined_transmission_flags_are_ignored(flags: int) -> None:
    # "Clients SHOULD ignore unknown flags" (CMD-013): no violation, and the bit is kept as sent.
    p = ConnectionPair()
    p.handshake(tx_flags=flags)
    assert p.client.violations == [] and p.server.violations == []
    assert p.client.transmission_flags == 0x8001 and type(p.client.transmission_flags) is int
    assert type(p.server.transmission_flags) is int
    assert "flags=HAS_FLAGS|0x8000" in str(p.client.transcript)
    assert "flags=HAS_FLAGS|0x8000" in str(p.server.transcript)


@pytest.mark.parametrize("flags", [0x8001, 0x0003], ids=["bit15", "bit1"])
def test_undefined_reply_flags_are_ignored(flags: int) -> None:
    # "Clients MUST ignore unrecognised reply flags" (SR-026): DONE is read, the rest is ignored.
    p = ConnectionPair()
    p.handshake()
    buf = bytearray(4)
    p.send(p.client, ev.Request(cookie=1, command=Cmd.READ, offset=0, length=4, read_buffer=buf))
    raw = w.encode_chunk_header(flags, 1, 1, 12, False) + w.OFFSET.pack(0) + b"data"
    got = p.deliver(p.client, raw)
    assert [type(e).__name__ for e in got] == ["OffsetData", "ReplyComplete"]
    assert got[0].done and buf == b"data" and p.client.violations == []
