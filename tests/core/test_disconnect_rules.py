"""Who may end a session how: DISC-021 (a soft disconnect after NBD_ESHUTDOWN) binds the client only, and
the DISC-007 exemption for hard disconnects covers a failed TLS negotiation only."""

from __future__ import annotations

import pytest
from nbdref import Cmd, Err, LocalProtocolError, Strictness
from nbdref import events as ev

from .helpers import ConnectionPair, ids

NO_FATAL = Strictness(fatal_levels=frozenset())


# ---------------------------------------------------------------- DISC-021 binds the client only
# "A client that receives NBD_ESHUTDOWN MUST initiate a soft disconnect" (DISC-021): a request the client
# pipelined before the server's NBD_ESHUTDOWN reached it breaks nothing.


def test_request_pipelined_before_eshutdown_is_not_flagged_by_the_server():
    p = ConnectionPair()
    p.handshake(structured=False)
    c, s = p.client, p.server
    # Both requests leave the client before it sees the reply.
    data = c.send(ev.Request(cookie=1, command=Cmd.READ, length=512))
    late = c.send(ev.Request(cookie=2, command=Cmd.READ, length=512))
    p.deliver(s, data)
    reply = s.send(ev.SimpleReply(cookie=1, error=Err.ESHUTDOWN))
    out = p.deliver(s, late)
    assert [type(e) for e in out] == [ev.Request] and ids(s) == []
    p.deliver(c, reply)
    # The client has now seen it: another request breaks DISC-021 on its side.
    with pytest.raises(LocalProtocolError, match="DISC-021"):
        c.send(ev.Request(cookie=3, command=Cmd.READ, length=512))


# ---------------------------------------------------------------- DISC-007 exemption: failed TLS only
# proto.md "Termination of the session during option haggling": "A party that is mandated by this
# document to terminate the session MUST initiate a hard disconnect if it is not possible to use a soft
# disconnect. Such circumstances include: ... where that party is the client following a failed TLS
# negotiation." / "unless a client's situation falls within the provisions of the previous paragraph ...
# it MUST NOT use a hard disconnect" (DISC-007).


def _options(p: ConnectionPair) -> None:
    from nbdref import ClientFlag, HandshakeFlag

    p.send(p.server, ev.NewstyleGreeting(flags=HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES))
    p.send(p.client, ev.ClientFlags(flags=ClientFlag.FIXED_NEWSTYLE | ClientFlag.NO_ZEROES))


@pytest.mark.parametrize(
    ("option", "reply_type", "expected"),
    [
        (ev.OptStartTLS(), "ERR_POLICY", []),  # STARTTLS refused: the failed TLS negotiation
        (ev.OptStartTLS(), "ERR_UNSUP", []),
        (ev.OptList(), "ERR_TLS_REQD", []),  # "TLS is unavailable and the user requires it" (TLS-031/040)
        (ev.OptInfo(name="x"), "ERR_UNKNOWN", ["DISC-007"]),  # an ordinary failed option
        (ev.OptList(), "ERR_POLICY", ["DISC-007"]),
    ],
)
def test_hard_disconnect_after_a_failed_option(option, reply_type, expected):
    from nbdref import Rep

    p = ConnectionPair(server=NO_FATAL)
    _options(p)
    p.send(p.client, option)
    p.send(p.server, ev.RepError(option=option.option, reply_type=getattr(Rep, reply_type)))
    p.deliver(p.server, b"")
    assert ids(p.server) == expected


def test_plain_newstyle_haggling_ends_with_a_close_on_either_side():
    """Without fixed newstyle there is no NBD_OPT_ABORT and a server closes on any option but
    NBD_OPT_EXPORT_NAME: neither close is charged (DISC-006 / DISC-007 are fixed newstyle's rules)."""
    from nbdref import ClientConnection, HandshakeFlag, ServerConnection
    from nbdref import events as ev

    from .helpers import ConnectionPair
    for closer in ("client", "server"):
        p = ConnectionPair()
        p.send(p.server, ev.NewstyleGreeting(flags=HandshakeFlag.NO_ZEROES))
        p.send(p.client, ev.ClientFlags(flags=0))
        target = p.server if closer == "client" else p.client
        ConnectionPair.deliver(target, b"")
        assert not target.violations, (closer, target.violations)
        assert isinstance(p.client, ClientConnection) and isinstance(p.server, ServerConnection)
