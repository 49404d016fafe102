"""EXT-002: an extended WRITE without NBD_CMD_FLAG_PAYLOAD_LEN is recorded, and its data is still read
(qemu-io 10.0 / 11.1 send such WRITEs; qemu-nbd 11.1 reads them)."""

from __future__ import annotations

import pytest
from nbdref import Cmd, CmdFlag, LocalProtocolError, RemoteProtocolError, Strictness
from nbdref import _wire as w
from nbdref import events as ev

from .helpers import ConnectionPair, ids

SIZE = 1 << 20
NO_FATAL = Strictness(fatal_levels=frozenset())


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
