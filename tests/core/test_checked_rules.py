"""`Connection.checked`: the ids of the rules checked on the peer's messages, held or broken.

A suite's req marker may claim an id only when the test really observed it; these sets are what the
coverage listing (reports/coverage.py) counts as observed, so they must hold the peer's rules only,
whether the rule held or was broken, and include what the decoders check.
"""

from __future__ import annotations

from nbdref import ClientFlag, Cmd, HandshakeFlag, Opt, Rep, Strictness
from nbdref import events as ev

from .helpers import ConnectionPair, ids, send_lenient

FIXED = HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES


def test_a_rule_that_held_on_the_peers_message_is_checked_by_the_receiver_only():
    p = ConnectionPair()
    p.send(p.server, ev.NewstyleGreeting(flags=FIXED))
    # "undefined handshake flags" (HS-010) binds the server: the client checked it, the server did not.
    assert "HS-010" in p.client.checked
    assert "HS-010" not in p.server.checked
    p.send(p.client, ev.ClientFlags(flags=ClientFlag.FIXED_NEWSTYLE | ClientFlag.NO_ZEROES))
    assert "HS-016" in p.server.checked
    assert "HS-016" not in p.client.checked


def test_a_broken_rule_is_checked_too():
    p = ConnectionPair(client=Strictness.lenient())
    p.send(p.server, ev.NewstyleGreeting(flags=FIXED))
    p.send(p.client, ev.ClientFlags(flags=ClientFlag.FIXED_NEWSTYLE | ClientFlag.NO_ZEROES))
    p.send(p.client, ev.OptGo(name="", info=()))
    send_lenient(p, p.server, ev.RepError(option=Opt.GO, reply_type=Rep.ERR_UNKNOWN, message="x\0y"))
    assert "GEN-001" in ids(p.client)
    assert "GEN-001" in p.client.checked


def test_what_a_decoder_checks_counts_as_checked():
    p = ConnectionPair()
    p.send(p.server, ev.NewstyleGreeting(flags=FIXED))
    p.send(p.client, ev.ClientFlags(flags=ClientFlag.FIXED_NEWSTYLE | ClientFlag.NO_ZEROES))
    p.send(p.client, ev.OptInfo(name="", info=()))
    assert "GO-002" in p.server.checked          # the INFO data's layout, checked by decode_option
    p.send(p.server, ev.RepInfoExport(option=Opt.INFO, export_size=4096, transmission_flags=1))
    assert "GO-031" in p.client.checked
    assert "GO-034" not in p.client.checked and "GO-035" not in p.client.checked   # not a name or description
    p.send(p.server, ev.RepInfoName(option=Opt.INFO, name="exp"))
    p.send(p.server, ev.RepInfoDescription(option=Opt.INFO, description="d"))
    assert {"GO-034", "GO-035"} <= p.client.checked


def test_reply_rules_that_held_are_checked():
    """A simple reply to a READ without structured replies holds SR-002; a chunk with structured replies
    holds SR-006 (no simple reply to a READ) and SR-004 (chunks only when negotiated)."""
    p = ConnectionPair()
    p.handshake(structured=False)
    p.send(p.client, ev.Request(command=Cmd.READ, cookie=1, offset=0, length=512))
    p.send(p.server, ev.SimpleReply(cookie=1, error=0, data=bytes(512)))
    assert "SR-002" in p.client.checked and "SR-006" not in p.client.checked
    q = ConnectionPair()
    q.handshake(structured=True)
    q.send(q.client, ev.Request(command=Cmd.READ, cookie=1, offset=0, length=512))
    q.send(q.server, ev.OffsetData(cookie=1, done=True, offset=0, data=bytes(512)))
    assert {"SR-006", "SR-004", "SR-032", "SR-033", "RD-027"} <= q.client.checked
    assert "SR-002" not in q.client.checked


def test_a_write_is_known_to_carry_its_length_once_the_next_header_parses():
    p = ConnectionPair()
    p.handshake()
    p.send(p.client, ev.Request(command=Cmd.WRITE, cookie=1, offset=0, length=512, payload=bytes(512)))
    assert "WR-002" not in p.server.checked         # nothing after it yet: the length is not shown right
    p.send(p.client, ev.Request(command=Cmd.FLUSH, cookie=2, offset=0, length=0))
    assert "WR-002" in p.server.checked and "WR-002" not in p.client.checked


def test_a_server_rule_is_never_checked_on_the_clients_message():
    """BS-028 (the server refuses a malformed meta-context request) binds the server: a well-formed
    LIST_META_CONTEXT from the client shows nothing about it."""
    from nbdref import requirements
    p = ConnectionPair()
    p.send(p.server, ev.NewstyleGreeting(flags=FIXED))
    p.send(p.client, ev.ClientFlags(flags=ClientFlag.FIXED_NEWSTYLE | ClientFlag.NO_ZEROES))
    p.send(p.client, ev.OptStructuredReply())
    p.send(p.server, ev.RepAck(option=Opt.STRUCTURED_REPLY))
    p.send(p.client, ev.OptListMetaContext(name="exp", queries=("base:",)))
    assert all(requirements.binds(r) in ("client", "both") for r in p.server.checked), p.server.checked
    assert all(requirements.binds(r) in ("server", "both") for r in p.client.checked), p.client.checked


def test_outcome_rules_record_what_the_reply_was_judged_by():
    """A TRIM past the end of a read-only export answered with EIO: ERR-003 (EINVAL) and ERR-005 (EPERM)
    disagree on the value, so only "it must fail" (WR-001) was judged; ENOTSUP to a WRITE_ZEROES
    without SEND_FAST_ZERO is judged by WZ-025 alone."""
    from nbdref import Err, TxFlag
    from nbdref import _outcome as outcome
    ro = outcome.Negotiated(export_size=1 << 20, transmission_flags=TxFlag.HAS_FLAGS | TxFlag.READ_ONLY,
                            min_block=512, max_payload=1 << 20, contexts=0)
    seen: set[str] = set()
    assert outcome.judge(Cmd.TRIM, 0, 1 << 20, 512, Err.EIO, ro, considered=seen) == []
    assert seen == {"WR-001"}
    rw = outcome.Negotiated(export_size=1 << 20, transmission_flags=TxFlag.HAS_FLAGS | TxFlag.SEND_WRITE_ZEROES,
                            min_block=512, max_payload=1 << 20, contexts=0)
    seen = set()
    assert [r for r, _ in outcome.judge(Cmd.WRITE_ZEROES, 0, 0, 512, Err.ENOTSUP, rw, considered=seen)] == ["WZ-025"]
    assert seen == {"WZ-025"}


def test_a_close_after_disc_holds_the_disconnect_rules():
    p = ConnectionPair()
    p.handshake()
    p.send(p.client, ev.Request(command=Cmd.DISC, cookie=9, offset=0, length=0))
    ConnectionPair.deliver(p.client, b"")            # the server closes, nothing in flight
    assert {"DISC-024", "DISC-025"} <= p.client.checked and not p.client.violations
    ConnectionPair.deliver(p.server, b"")            # and the client after its DISC
    assert "DISC-024" in p.server.checked and not p.server.violations


def test_an_undefined_handshake_flag_is_recorded_and_the_strict_client_goes_on():
    """HS-010 (the server MUST NOT set it) is broken and recorded; "a client SHOULD ignore handshake flags
    it does not recognise" (HS-005), so even the strict default client does not hang up on it."""
    p = ConnectionPair()                                      # the client at its default (strict) strictness
    send_lenient(p, p.server, ev.NewstyleGreeting(flags=FIXED | 0x8000))
    assert ids(p.client) == ["HS-010"] and "HS-010" in p.client.checked
    p.send(p.client, ev.ClientFlags(flags=ClientFlag.FIXED_NEWSTYLE | ClientFlag.NO_ZEROES))
    p.send(p.client, ev.OptList())
    p.send(p.server, ev.RepAck(option=Opt.LIST))
    assert ids(p.client) == ["HS-010"]
