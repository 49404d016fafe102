"""observe() and discard_payloads: an observer pair follows a real exchange from the bytes alone.

A client and a server talk through in-memory bytes; an observer (ServerConnection on the client's
bytes, ClientConnection on the server's, each told what the other decoded) must decode the same
messages, record the same breaches as the side that received them, and keep no payload.
"""

from __future__ import annotations

import dataclasses

from nbdref import NEED_DATA, ClientConnection, ServerConnection, Strictness, Transcript
from nbdref import events as ev
from nbdref._constants import Cmd, CmdFlag

from .helpers import ConnectionPair

LENIENT = dataclasses.replace(Strictness.lenient(), disabled=frozenset({"WR-002"}))


class Observer:
    """What nbdref.proxy does, without sockets."""

    def __init__(self) -> None:
        self.transcript = Transcript()
        self.s = ServerConnection(LENIENT, self.transcript, discard_payloads=True)  # decodes the client
        self.c = ClientConnection(LENIENT, self.transcript, discard_payloads=True)  # decodes the server
        self.events: list[ev.Event] = []

    def feed(self, from_client: bool, data: bytes) -> None:
        conn, other = (self.s, self.c) if from_client else (self.c, self.s)
        # Received in small pieces, so payloads are counted past across many calls.
        for i in range(0, len(data), 7000):
            conn.receive_data(data[i : i + 7000])
            while (e := conn.next_event()) is not NEED_DATA:
                if isinstance(e, ev.ReplyComplete | ev.StartTLS | ev.ConnectionClosed):
                    continue
                self.events.append(e)
                other.observe(e)
            assert conn.buffered_bytes < 64 * 1024  # no payload accumulates


class Tapped(ConnectionPair):
    """A pair whose bytes also go to an Observer."""

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.obs = Observer()

    def send(self, conn, event):
        data = conn.send(event)
        self.obs.feed(conn is self.client, data)
        return self.deliver(self.other(conn), data)


def test_observer_follows_negotiation_and_keeps_no_payload():
    p = Tapped()
    p.handshake(structured=True, export_size=8 << 20)
    big = bytes(range(256)) * 4096  # 1 MiB
    p.send(p.client, ev.Request(cookie=1, command=Cmd.WRITE, offset=0, length=len(big), payload=big))
    p.send(p.server, ev.NoneChunk(cookie=1, done=True))
    buf = bytearray(len(big))
    p.send(p.client, ev.Request(cookie=2, command=Cmd.READ, offset=0, length=len(big), read_buffer=buf))
    p.send(p.server, ev.OffsetData(cookie=2, offset=0, data=big[: 1 << 19], done=False))
    p.send(p.server, ev.OffsetData(cookie=2, offset=1 << 19, data=big[1 << 19 :], done=True))
    assert bytes(buf) == big  # the real client got the data
    obs = p.obs
    assert obs.s.state is obs.c.state is p.client.state
    assert obs.c.structured_replies and obs.s.structured_replies
    write = next(e for e in obs.events if isinstance(e, ev.Request) and e.command == Cmd.WRITE)
    assert write.payload is None and write.length == len(big)  # counted past, not kept
    data = [e for e in obs.events if isinstance(e, ev.OffsetData)]
    assert [(e.offset, e.length, e.data) for e in data] == [(0, 1 << 19, None), (1 << 19, 1 << 19, None)]
    assert obs.s.violations == obs.c.violations == []
    lines = obs.transcript.lines()
    assert any(line.startswith("C: NBD_CMD_WRITE") for line in lines)
    assert any(line.startswith("S: NBD_REPLY_TYPE_OFFSET_DATA") for line in lines)
    assert not any(line.startswith("!:") for line in lines), lines


def test_observer_attributes_breaches_to_the_sender():
    """A client breach shows on the observer's ServerConnection (direction C), a server breach on
    its ClientConnection (direction S), with the ids the real receivers record."""
    p = Tapped(client=Strictness.lenient(), server=Strictness.lenient())  # illegal traffic on purpose
    p.handshake(structured=False)
    # FUA on a READ: "The client MUST NOT set NBD_CMD_FLAG_FUA" for commands other than writes (FUA-003)
    p.send(p.client, ev.Request(cookie=5, command=Cmd.READ, flags=CmdFlag.FUA, offset=0, length=512))
    p.send(p.server, ev.SimpleReply(cookie=5, error=0, data=bytes(512)))
    # A simple reply to BLOCK_STATUS with success (BS-005) is the server's breach.
    p.send(p.client, ev.Request(cookie=6, command=Cmd.BLOCK_STATUS, offset=0, length=512))
    p.send(p.server, ev.SimpleReply(cookie=6, error=0))
    obs = p.obs
    client_ids = [v.req_id for v in obs.s.violations]
    server_ids = [v.req_id for v in obs.c.violations]
    assert "FUA-003" in client_ids and {v.direction for v in obs.s.violations} == {"C"}
    assert "BS-005" in server_ids and {v.direction for v in obs.c.violations} == {"S"}
    # The same ids as the real receivers recorded.
    assert client_ids == [v.req_id for v in p.server.violations]
    assert server_ids == [v.req_id for v in p.client.violations]
    # The observing side does not report the other's breach again as its own.
    assert "BS-005" not in client_ids and "FUA-003" not in server_ids


def test_discard_through_get_buffer_with_simple_replies():
    """The proxy's path: bytes land in get_buffer()'s memory (a scratch view while a payload is
    counted past), buffer_updated() says how many; a simple-reply READ keeps no data either."""
    q = Tapped()
    q.handshake(structured=False, export_size=8 << 20)
    obs = q.obs
    big = bytes(range(256)) * 8192  # 2 MiB
    data = q.client.send(ev.Request(cookie=9, command=Cmd.READ, offset=0, length=len(big)))
    obs.feed(True, data)
    q.deliver(q.server, data)
    reply = q.server.send(ev.SimpleReply(cookie=9, error=0, data=big))
    c = obs.c
    pos = 0
    events = []
    while pos < len(reply):
        view = c.get_buffer(100_000)
        n = min(len(view), len(reply) - pos)
        view[:n] = reply[pos : pos + n]
        c.buffer_updated(n)
        pos += n
        while (e := c.next_event()) is not NEED_DATA:
            events.append(e)
        assert c.buffered_bytes < 128 * 1024  # at most one recv's worth waits, never the payload
    simple = [e for e in events if isinstance(e, ev.SimpleReply)]
    assert len(simple) == 1 and simple[0].data is None and simple[0].in_place and simple[0].cookie == 9
    assert c.violations == [] and c.in_flight == {}
