"""The transition table: what each role may send in each state, and nothing else."""

from __future__ import annotations

import pytest
from nbdref import Cmd, LocalProtocolError, Opt, State
from nbdref import events as ev
from nbdref.connection import ACK_TRANSITIONS, TRANSITIONS, Role

from .helpers import ConnectionPair


def test_table_is_readable_and_complete():
    # Every state except the terminal ones and the TLS pause lets somebody speak.
    speaking = {state for state, _ in TRANSITIONS}
    assert speaking == {State.GREETING, State.CLIENT_FLAGS, State.OPTIONS, State.TRANSMISSION, State.DISCONNECTING}
    # Only the server speaks first; only the client answers the greeting.
    assert set(TRANSITIONS) >= {(State.GREETING, Role.SERVER), (State.CLIENT_FLAGS, Role.CLIENT)}
    assert (State.GREETING, Role.CLIENT) not in TRANSITIONS
    assert ACK_TRANSITIONS == {Opt.GO: State.TRANSMISSION, Opt.ABORT: State.CLOSED, Opt.STARTTLS: State.TLS_HANDSHAKE}


@pytest.mark.parametrize(
    ("setup", "side", "event"),
    [
        (lambda p: None, "client", ev.ClientFlags()),  # before the greeting
        (lambda p: None, "client", ev.NewstyleGreeting()),  # not the client's message at all
        (lambda p: p.send(p.server, ev.NewstyleGreeting()), "client", ev.OptGo(name="")),  # before flags
        (lambda p: p.handshake(), "client", ev.OptList()),  # options are over after GO
        (lambda p: p.handshake(), "server", ev.RepAck(option=Opt.GO)),
        (lambda p: p.handshake(), "server", ev.NewstyleGreeting()),
        (lambda p: (p.send(p.server, ev.NewstyleGreeting()), p.send(p.client, ev.ClientFlags())), "client",
         ev.Request(cookie=1, command=Cmd.FLUSH)),  # a request during option haggling
        (lambda p: (p.handshake(), p.send(p.client, ev.Request(cookie=1, command=Cmd.DISC))), "client",
         ev.Request(cookie=2, command=Cmd.FLUSH)),  # nothing after NBD_CMD_DISC
    ],
)
def test_messages_outside_the_table_are_refused(setup, side, event):
    p = ConnectionPair()
    setup(p)
    conn = getattr(p, side)
    before = conn.state
    with pytest.raises(LocalProtocolError, match="not allowed in state"):
        conn.send(event)
    assert conn.state is before  # nothing was sent, nothing moved


def test_state_walk_of_a_whole_session():
    p = ConnectionPair()
    seen = [p.client.state]
    p.send(p.server, ev.NewstyleGreeting())
    seen.append(p.client.state)
    p.send(p.client, ev.ClientFlags())
    seen.append(p.client.state)
    p.send(p.client, ev.OptStartTLS())
    p.send(p.server, ev.RepAck(option=Opt.STARTTLS))
    seen.append(p.client.state)
    p.client.tls_established()
    p.server.tls_established()
    p.send(p.client, ev.OptGo(name=""))
    p.send(p.server, ev.RepInfoExport(option=Opt.GO, export_size=512))
    p.send(p.server, ev.RepAck(option=Opt.GO))
    seen.append(p.client.state)
    p.send(p.client, ev.Request(cookie=1, command=Cmd.DISC))
    seen.append(p.client.state)
    p.deliver(p.client, b"")
    seen.append(p.client.state)
    assert seen == [
        State.GREETING,
        State.CLIENT_FLAGS,
        State.OPTIONS,
        State.TLS_HANDSHAKE,
        State.TRANSMISSION,
        State.DISCONNECTING,
        State.CLOSED,
    ]
    assert p.client.violations == p.server.violations == []
