"""The core's checks of "both" rules on the client's side of a ServerConnection: TLS-014 (the first bytes
after the STARTTLS ACK), DISC-002 / DISC-016 (close_notify before a hard disconnect under TLS), DISC-006
(haggling ended properly), BS-007 / BS-008 (context names in queries, and in the server's replies)."""

from __future__ import annotations

import pytest
from nbdref import ClientFlag, Cmd, HandshakeFlag, Opt, Strictness
from nbdref import events as ev

from .helpers import ConnectionPair, ids

NO_FATAL = Strictness(fatal_levels=frozenset())


def _greet(p: ConnectionPair) -> None:
    p.send(p.server, ev.NewstyleGreeting(flags=HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES))
    p.send(p.client, ev.ClientFlags(flags=ClientFlag.FIXED_NEWSTYLE | ClientFlag.NO_ZEROES))


def _tls(p: ConnectionPair) -> None:
    _greet(p)
    p.send(p.client, ev.OptStartTLS())
    p.send(p.server, ev.RepAck(option=Opt.STARTTLS))
    p.client.tls_established()
    p.server.tls_established()


# ---------------------------------------------------------------- TLS-014

@pytest.mark.parametrize(("first", "broken"), [
    (bytes.fromhex("160301020001"), False),               # a TLS handshake record (ClientHello)
    (bytes.fromhex("15030300020228"), False),             # an alert record is TLS too
    (b"IHAVEOPT\0\0\0\x02\0\0\0\0", True),                # NBD_OPT_ABORT in the clear
    (bytes.fromhex("25609513") + bytes(24), True),        # an NBD request in the clear
    (b"\x16\x00", True),                                  # not protocol version 3
])
def test_tls_014_first_bytes_after_the_ack(first, broken):
    p = ConnectionPair(server=NO_FATAL)
    _greet(p)
    p.send(p.client, ev.OptStartTLS())
    p.send(p.server, ev.RepAck(option=Opt.STARTTLS))
    p.server.tls_first_bytes(first)
    assert "TLS-014" in p.server.checked
    assert (ids(p.server) == ["TLS-014"]) is broken
    if broken:
        assert p.server.violations[0].data == first[:64]


# ---------------------------------------------------------------- DISC-002 / DISC-016

@pytest.mark.parametrize("notify", [True, False])
def test_disc_002_eof_in_haggling_under_tls(notify):
    p = ConnectionPair(server=NO_FATAL)
    _tls(p)
    p.server.peer_tls_eof(notify)
    p.deliver(p.server, b"")
    assert "DISC-002" in p.server.checked and ("DISC-002" in ids(p.server)) is not notify
    assert "DISC-016" not in p.server.checked


@pytest.mark.parametrize("notify", [True, False])
def test_disc_016_eof_in_transmission_under_tls(notify):
    p = ConnectionPair(server=NO_FATAL)
    _tls(p)
    p.send(p.client, ev.OptGo(name="exp"))
    p.send(p.server, ev.RepInfoExport(option=Opt.GO, export_size=4096, transmission_flags=1))
    p.send(p.server, ev.RepAck(option=Opt.GO))
    p.server.peer_tls_eof(notify)
    p.deliver(p.server, b"")
    assert "DISC-016" in p.server.checked and ("DISC-016" in ids(p.server)) is not notify
    assert "DISC-024" in ids(p.server)


def test_no_close_notify_judgement_without_tls_or_after_disc():
    p = ConnectionPair(server=NO_FATAL)
    p.handshake()
    p.server.peer_tls_eof(False)          # a driver mistake: no TLS is running, so nothing is judged
    p.deliver(p.server, b"")
    assert not {"DISC-002", "DISC-016"} & p.server.checked
    p = ConnectionPair(server=NO_FATAL)
    _tls(p)
    p.send(p.client, ev.OptGo(name="exp"))
    p.send(p.server, ev.RepInfoExport(option=Opt.GO, export_size=4096, transmission_flags=1))
    p.send(p.server, ev.RepAck(option=Opt.GO))
    p.send(p.client, ev.Request(cookie=1, command=Cmd.DISC))
    p.server.peer_tls_eof(False)          # a soft disconnect: the TLS shutdown is the server's
    p.deliver(p.server, b"")
    assert "DISC-016" not in p.server.checked and ids(p.server) == []


# ---------------------------------------------------------------- DISC-006

def test_disc_006_held_when_haggling_ends_with_go_export_name_or_abort():
    p = ConnectionPair()
    p.handshake()
    assert "DISC-006" in p.server.checked and "DISC-006" in p.client.checked
    for option in (ev.OptExportName(name="exp"), ev.OptAbort()):
        p = ConnectionPair()
        _greet(p)
        p.send(p.client, option)
        assert "DISC-006" in p.server.checked


def test_disc_006_not_held_on_a_bare_close():
    p = ConnectionPair(server=NO_FATAL)
    _greet(p)
    p.deliver(p.server, b"")
    assert ids(p.server) == ["DISC-007"] and "DISC-006" not in p.server.checked


# ---------------------------------------------------------------- BS-007 / BS-008

@pytest.mark.parametrize(("setting", "query", "broken"), [
    (True, "base:allocation", set()),
    (False, "qemu:", set()),
    (True, "qemu:dirty-bitmap:b0", set()),
    (True, "allocation", {"BS-046"}),                 # no colon: the query rule says it, once
    (False, ":x", {"BS-007"}),
    (True, "a\tb:x", {"BS-007"}),
    (True, "x-a:b\0c", {"GEN-001"}),                  # the string rules say it, once (BS-008 not held)
    (False, "x-a:" + "é" * 2100, {"GEN-003", "GEN-002"}),
])
def test_bs_007_008_client_queries(setting, query, broken):
    p = ConnectionPair(client=Strictness.lenient(), server=NO_FATAL)
    _greet(p)
    p.send(p.client, ev.OptStructuredReply())
    p.send(p.server, ev.RepAck(option=Opt.STRUCTURED_REPLY))
    cls = ev.OptSetMetaContext if setting else ev.OptListMetaContext
    p.send(p.client, cls(name="exp", queries=(query,)))
    assert ("BS-007" in p.server.checked) == (":" in query)
    assert ("BS-008" in p.server.checked) == (not broken & {"GEN-001", "GEN-003"})
    assert set(ids(p.server)) == broken


def test_bs_007_008_server_context_names():
    p = ConnectionPair(client=NO_FATAL, server=Strictness.lenient())
    _greet(p)
    p.send(p.client, ev.OptStructuredReply())
    p.send(p.server, ev.RepAck(option=Opt.STRUCTURED_REPLY))
    p.send(p.client, ev.OptListMetaContext(name="exp", queries=("base:",)))
    p.send(p.server, ev.RepMetaContext(option=Opt.LIST_META_CONTEXT, context_id=0, name="base:allocation"))
    assert {"BS-007", "BS-008"} <= p.client.checked and ids(p.client) == []
    p.send(p.server, ev.RepMetaContext(option=Opt.LIST_META_CONTEXT, context_id=0, name=" :x"))
    assert ids(p.client) == ["BS-007"]
