"""Handshake and option haggling through an in-memory ConnectionPair, both roles at once."""

from __future__ import annotations

import pytest
from nbdref import (
    NEED_DATA,
    ClientConnection,
    ClientFlag,
    HandshakeFlag,
    Info,
    LocalProtocolError,
    Opt,
    RemoteProtocolError,
    Rep,
    ServerConnection,
    State,
    TxFlag,
)
from nbdref import events as ev

from .helpers import ConnectionPair

FIXED = HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES
CFIXED = ClientFlag.FIXED_NEWSTYLE | ClientFlag.NO_ZEROES


def greeted(flags=FIXED, cflags=CFIXED) -> ConnectionPair:
    p = ConnectionPair()
    assert p.send(p.server, ev.NewstyleGreeting(flags=flags)) == [ev.NewstyleGreeting(flags=flags)]
    assert p.send(p.client, ev.ClientFlags(flags=cflags)) == [ev.ClientFlags(flags=cflags)]
    assert p.client.state is p.server.state is State.OPTIONS
    return p


def test_greeting_byte_by_byte():
    s = ServerConnection()
    c = ClientConnection()
    data = s.send(ev.NewstyleGreeting())
    for i in range(len(data) - 1):
        c.receive_data(data[i : i + 1])
        assert c.next_event() is NEED_DATA
    c.receive_data(data[-1:])
    assert c.next_event() == ev.NewstyleGreeting()
    assert c.handshake_flags == FIXED


def test_oldstyle_goes_straight_to_transmission():
    p = ConnectionPair()
    greeting = ev.OldstyleGreeting(export_size=1 << 30, transmission_flags=TxFlag.HAS_FLAGS | TxFlag.READ_ONLY)
    assert p.send(p.server, greeting) == [greeting]
    assert p.client.state is State.TRANSMISSION and p.client.oldstyle
    assert p.client.export_size == 1 << 30
    assert p.client.transmission_flags == TxFlag.HAS_FLAGS | TxFlag.READ_ONLY


@pytest.mark.parametrize("no_zeroes", [True, False])
def test_export_name(no_zeroes):
    cflags = CFIXED if no_zeroes else ClientFlag.FIXED_NEWSTYLE
    p = greeted(cflags=cflags)
    assert p.send(p.client, ev.OptExportName(name="disk")) == [ev.OptExportName(name="disk")]
    data = p.server.send(ev.ExportNameReply(export_size=4096, transmission_flags=TxFlag.HAS_FLAGS))
    assert len(data) == (10 if no_zeroes else 134)
    events = p.deliver(p.client, data)
    assert events == [ev.ExportNameReply(export_size=4096, transmission_flags=1, zeroes=not no_zeroes)]
    assert p.client.state is p.server.state is State.TRANSMISSION
    assert p.client.export_name == "disk" and p.client.export_size == 4096


def test_export_name_refused_by_closing():
    p = greeted()
    p.send(p.client, ev.OptExportName(name="nope"))
    assert p.deliver(p.client, b"") == [ev.ConnectionClosed()]
    assert p.client.violations == []  # "the server MUST terminate the session" (OPT-001) is legal


def test_abort():
    p = greeted()
    p.send(p.client, ev.OptAbort())
    # After the ACK to NBD_OPT_ABORT the session is over: the next event is ConnectionClosed.
    assert p.send(p.server, ev.RepAck(option=Opt.ABORT)) == [ev.RepAck(option=Opt.ABORT), ev.ConnectionClosed()]
    assert p.client.state is p.server.state is State.CLOSED
    with pytest.raises(LocalProtocolError):
        p.client.send(ev.OptList())


def test_list():
    p = greeted()
    p.send(p.client, ev.OptList())
    replies = [ev.RepServer(option=Opt.LIST, name="a"), ev.RepServer(option=Opt.LIST, name="b", details="B")]
    for r in replies:
        assert p.send(p.server, r) == [r]
    assert p.send(p.server, ev.RepAck(option=Opt.LIST)) == [ev.RepAck(option=Opt.LIST)]
    assert p.client.pending_option is None and p.client.violations == []


def test_info_then_go_with_every_info_type():
    p = greeted()
    p.send(p.client, ev.OptStructuredReply())
    p.send(p.server, ev.RepAck(option=Opt.STRUCTURED_REPLY))
    assert p.client.structured_replies and p.server.structured_replies
    for opt in (Opt.INFO, Opt.GO):
        cls = ev.OptInfo if opt == Opt.INFO else ev.OptGo
        asked = cls(name="e", info=(Info.NAME, Info.DESCRIPTION, Info.BLOCK_SIZE))
        assert p.send(p.client, asked) == [asked]
        infos = [
            ev.RepInfoName(option=opt, name="canonical"),
            ev.RepInfoDescription(option=opt, description="d"),
            ev.RepInfoBlockSize(option=opt, minimum=512, preferred=4096, maximum=1 << 20),
            ev.RepInfoUnknown(option=opt, info_type=42, data=b"x"),
            ev.RepInfoExport(option=opt, export_size=1 << 20, transmission_flags=TxFlag.HAS_FLAGS | TxFlag.SEND_DF),
        ]
        for i in infos:
            assert p.send(p.server, i) == [i]
        assert p.send(p.server, ev.RepAck(option=opt)) == [ev.RepAck(option=opt)]
        if opt == Opt.INFO:
            assert p.client.state is State.OPTIONS and p.client.export_size is None
    for conn in (p.client, p.server):
        assert conn.state is State.TRANSMISSION
        assert conn.export_size == 1 << 20 and conn.block_size == (512, 4096, 1 << 20)
        assert conn.transmission_flags == TxFlag.HAS_FLAGS | TxFlag.SEND_DF
        assert conn.violations == []


def test_go_error_stays_in_options():
    p = greeted()
    p.send(p.client, ev.OptGo(name="missing"))
    err = ev.RepError(option=Opt.GO, reply_type=Rep.ERR_UNKNOWN, message="no such export")
    assert p.send(p.server, err) == [err]
    assert p.client.state is State.OPTIONS and p.client.pending_option is None


def test_meta_contexts_set_and_list():
    p = greeted()
    p.send(p.client, ev.OptStructuredReply())
    p.send(p.server, ev.RepAck(option=Opt.STRUCTURED_REPLY))
    p.send(p.client, ev.OptListMetaContext(name="e", queries=("base:",)))
    p.send(p.server, ev.RepMetaContext(option=Opt.LIST_META_CONTEXT, context_id=0, name="base:allocation"))
    p.send(p.server, ev.RepAck(option=Opt.LIST_META_CONTEXT))
    assert p.client.meta_contexts == {}
    p.send(p.client, ev.OptSetMetaContext(name="e", queries=("base:allocation", "qemu:dirty-bitmap:b")))
    p.send(p.server, ev.RepMetaContext(option=Opt.SET_META_CONTEXT, context_id=3, name="base:allocation"))
    p.send(p.server, ev.RepMetaContext(option=Opt.SET_META_CONTEXT, context_id=9, name="qemu:dirty-bitmap:b"))
    p.send(p.server, ev.RepAck(option=Opt.SET_META_CONTEXT))
    expected = {3: "base:allocation", 9: "qemu:dirty-bitmap:b"}
    assert p.client.meta_contexts == p.server.meta_contexts == expected
    p.send(p.client, ev.OptGo(name="e"))
    p.send(p.server, ev.RepInfoExport(option=Opt.GO, export_size=512))
    p.send(p.server, ev.RepAck(option=Opt.GO))
    assert p.client.meta_contexts == expected
    assert p.client.violations == p.server.violations == []


def test_meta_contexts_for_another_export_are_dropped():
    p = greeted()
    p.send(p.client, ev.OptStructuredReply())
    p.send(p.server, ev.RepAck(option=Opt.STRUCTURED_REPLY))
    p.send(p.client, ev.OptSetMetaContext(name="a", queries=("base:allocation",)))
    p.send(p.server, ev.RepMetaContext(option=Opt.SET_META_CONTEXT, context_id=1, name="base:allocation"))
    p.send(p.server, ev.RepAck(option=Opt.SET_META_CONTEXT))
    p.send(p.client, ev.OptGo(name="b"))
    p.send(p.server, ev.RepInfoExport(option=Opt.GO, export_size=512))
    p.send(p.server, ev.RepAck(option=Opt.GO))
    assert p.client.meta_contexts == {}


def test_failed_set_meta_context_clears_contexts():
    p = greeted()
    p.send(p.client, ev.OptStructuredReply())
    p.send(p.server, ev.RepAck(option=Opt.STRUCTURED_REPLY))
    p.send(p.client, ev.OptSetMetaContext(name="a", queries=("base:allocation",)))
    p.send(p.server, ev.RepMetaContext(option=Opt.SET_META_CONTEXT, context_id=1, name="base:allocation"))
    p.send(p.server, ev.RepError(option=Opt.SET_META_CONTEXT, reply_type=Rep.ERR_TOO_BIG))
    assert p.client.meta_contexts == {}


def test_extended_headers_negotiation():
    p = greeted()
    p.send(p.client, ev.OptExtendedHeaders())
    p.send(p.server, ev.RepAck(option=Opt.EXTENDED_HEADERS))
    assert p.client.extended_headers and p.server.extended_headers
    assert not p.client.structured_replies


def test_unknown_option_is_not_a_violation():
    p = greeted()
    assert p.send(p.client, ev.OptUnknown(option=0x77, data=b"zz")) == [ev.OptUnknown(option=0x77, data=b"zz")]
    p.send(p.server, ev.RepError(option=0x77, reply_type=Rep.ERR_UNSUP))
    assert p.client.violations == p.server.violations == []


def test_starttls_pause_and_reset():
    p = greeted()
    p.send(p.client, ev.OptStructuredReply())
    p.send(p.server, ev.RepAck(option=Opt.STRUCTURED_REPLY))
    p.send(p.client, ev.OptStartTLS())
    ack = p.server.send(ev.RepAck(option=Opt.STARTTLS))
    assert p.server.state is State.TLS_HANDSHAKE
    assert p.server.next_event() == ev.StartTLS()
    assert p.server.next_event() is NEED_DATA
    p.server.receive_data(b"\x16\x03\x01 client hello")  # the TLS layer's bytes, not NBD
    assert p.server.next_event() is NEED_DATA
    assert p.server.trailing_data == b"\x16\x03\x01 client hello"
    # The client sees the ACK, then StartTLS; bytes after the ACK belong to TLS, from the moment
    # the ACK is decoded (a driver reads trailing_data when it sees StartTLS).
    p.client.receive_data(ack + b"\x16tls")
    assert p.client.next_event() == ev.RepAck(option=Opt.STARTTLS)
    assert p.client.trailing_data == b"\x16tls"
    assert p.client.next_event() == ev.StartTLS()
    assert p.client.next_event() is NEED_DATA
    assert p.client.trailing_data == b"\x16tls"
    for conn in (p.client, p.server):
        conn.tls_established()
        assert conn.state is State.OPTIONS and conn.tls_negotiated
        assert not conn.structured_replies  # "forget all earlier negotiation state" (TLS-054)
        assert conn.trailing_data == b""
    p.send(p.client, ev.OptGo(name="x"))
    p.send(p.server, ev.RepInfoExport(option=Opt.GO, export_size=512))
    p.send(p.server, ev.RepAck(option=Opt.GO))
    assert p.client.state is State.TRANSMISSION


def test_tls_established_outside_the_pause_is_refused():
    with pytest.raises(LocalProtocolError):
        ClientConnection().tls_established()


def test_reply_to_an_option_not_asked():
    p = greeted()
    with pytest.raises(LocalProtocolError):
        p.server.send(ev.RepAck(option=Opt.GO))
    data = ev.RepAck(option=Opt.GO)
    from nbdref import _wire as w

    p.client.receive_data(w.encode_option_reply(data))
    with pytest.raises(RemoteProtocolError, match="no option is pending"):
        p.client.next_event()
    assert p.client.state is State.ERROR


def test_reply_for_a_different_option_is_fatal():
    p = greeted()
    p.send(p.client, ev.OptList())
    from nbdref import _wire as w

    p.client.receive_data(w.encode_option_reply(ev.RepAck(option=Opt.GO)))
    with pytest.raises(RemoteProtocolError, match="reply to option 7"):
        p.client.next_event()


def test_transcript_notation():
    p = greeted()
    p.send(p.client, ev.OptGo(name="exp", info=(Info.BLOCK_SIZE,)))
    p.send(p.server, ev.RepInfoExport(option=Opt.GO, export_size=1048576, transmission_flags=TxFlag.HAS_FLAGS | TxFlag.SEND_FLUSH))
    lines = p.client.transcript.lines()
    assert 'C: NBD_OPT_GO export="exp" info=[NBD_INFO_BLOCK_SIZE]' in lines
    assert "S: NBD_REP_INFO NBD_INFO_EXPORT size=1048576 flags=HAS_FLAGS|SEND_FLUSH (to NBD_OPT_GO)" in lines
    assert p.server.transcript.lines() == lines  # both roles saw the same conversation
