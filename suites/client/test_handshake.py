"""The handshake as clients send it: client flags, the option that ends haggling, fallbacks.

Each test starts reference servers of its own (suites/client/_own.py) in the configuration the rule is
about — the whole spec, no NBD_FLAG_NO_ZEROES, an undefined handshake flag bit, no NBD_OPT_GO — and
makes ONE client run that connects and reads.  The server's core checks every client-bound rule on
what arrives (HS-007, HS-014, HS-016, GEN-00x, OPT-004/005, GO-002/004 ...); the test judges from the
transcript what the core cannot (which option ended haggling, what was asked in NBD_OPT_GO).
"""

from __future__ import annotations

from typing import Any

import pytest
from nbdref import events as ev
from nbdref._constants import ClientFlag, HandshakeFlag, Info, Opt

from suites.client._own import (
    MiB,
    client_events,
    describe,
    options_sent,
    parse_read,
    pattern,
    read_once,
)

SECTION = "Handshake"
OFFSET, LENGTH = MiB + 512, 1024


def _read_ok(verdict: Any, kind: str, res: Any, what: str) -> None:
    got = parse_read(kind, res.out) if res.ok else None
    verdict.expect(got == pattern(OFFSET, LENGTH), "INTEROP-010", expected=f"{what}: the client reads the export's "
                   f"bytes at {OFFSET}", observed=f"exit {res.rc}; {res.out[-300:]!r}")


def _client_flags(record: Any) -> int | None:
    for e in client_events(record):
        if isinstance(e, ev.ClientFlags):
            return int(e.flags)
    return None


def _go(record: Any) -> ev.OptGo | None:
    gos = [e for e in client_events(record) if isinstance(e, ev.OptGo)]
    return gos[-1] if gos else None


def _final_ack_before_each_option(record: Any) -> list[str]:
    """Options sent while the previous one still waited for its final reply (OPT-004), from the wire
    order: a final reply is an ACK or an error (NBD_REP_SERVER / INFO / META_CONTEXT are not)."""
    late: list[str] = []
    pending: int | None = None
    for entry in record.transcript or []:
        e = entry.event
        if entry.direction == "C" and isinstance(e, ev.Option):
            if pending is not None and pending != Opt.ABORT:
                late.append(f"option {e.option} before the final reply to {pending}")
            pending = None if isinstance(e, ev.OptExportName) else e.option
        elif entry.direction == "S" and isinstance(e, ev.RepAck | ev.RepError):
            pending = None
    return late


# proto.md "Newstyle negotiation": the client answers the greeting with its flags; "The client MUST NOT set
# any other flags" (HS-016), "SHOULD set NBD_FLAG_C_FIXED_NEWSTYLE" (HS-007/HS-012); "Clients SHOULD use
# NBD_OPT_GO in preference to NBD_OPT_EXPORT_NAME" (OPT-009) and one that can honour size constraints asks
# NBD_INFO_BLOCK_SIZE (BSZ-001, INTEROP-016) and then MUST use GO (BSZ-002).  After GO's ACK no option
# follows (GO-026), and every option waits for the final reply of the one before (OPT-004).  Haggling that
# ends with GO's ACK had no hard disconnect (DISC-006: the core records it held on each such connection).
@pytest.mark.req("HS-007", "HS-012", "HS-016", "INTEROP-003", "INTEROP-004", "INTEROP-010", "OPT-004", "OPT-005",
                 "OPT-009", "GO-002", "GO-004", "GO-026", "BSZ-002", "INTEROP-016", "GEN-001", "GEN-002", "GEN-003",
                 "EXT-034", "EXT-043", "DISC-006")
@pytest.mark.feature("NBD_OPT_GO")
def test_fixed_newstyle_and_go(request: Any, client_peer: Any, kind: str, peer_workdir: Any, verdict: Any,
                               evidence: Any) -> None:
    """Against the whole spec the client sets FIXED_NEWSTYLE, ends haggling with NBD_OPT_GO (asking
    for NBD_INFO_BLOCK_SIZE) and reads the right bytes."""
    res, records = read_once(request, kind, peer_workdir, verdict, evidence, "full", OFFSET, LENGTH)
    _read_ok(verdict, kind, res, "full spec")
    assert records, "the client never connected"
    for r in records:
        flags = _client_flags(r)
        verdict.expect(flags is not None and bool(flags & ClientFlag.FIXED_NEWSTYLE), "HS-012", "INTEROP-003",
                       expected="NBD_FLAG_C_FIXED_NEWSTYLE in the client flags", observed=f"client flags {flags}")
        late = _final_ack_before_each_option(r)
        verdict.expect(not late, "OPT-004", expected="each option after the final reply to the previous one",
                       observed="; ".join(late) or "in order")
    data = [r for r in records if r.requests]
    verdict.expect(bool(data), "INTEROP-004", expected="a connection that reached transmission",
                   observed=describe(records))
    for r in data:
        opts = options_sent(r)
        go = _go(r)
        verdict.expect(go is not None and Opt.EXPORT_NAME not in opts, "OPT-009", "INTEROP-004",
                       expected="haggling ends with NBD_OPT_GO", observed=describe([r]))
        asked = set(go.info) if go else set()
        verdict.expect(Info.BLOCK_SIZE in asked, "INTEROP-016", expected="NBD_INFO_BLOCK_SIZE requested in NBD_OPT_GO",
                       observed=f"information requests {sorted(asked)}")
        if Info.BLOCK_SIZE in asked:
            verdict.expect(Opt.EXPORT_NAME not in opts, "BSZ-002", expected="GO, not EXPORT_NAME, after asking "
                           "for block sizes", observed=describe([r]))
        if any(isinstance(e, ev.RepAck) and e.option == Opt.EXTENDED_HEADERS
               for e in (x.event for x in r.transcript or [] if x.direction == "S")):
            verdict.expect(Opt.EXPORT_NAME not in opts, "EXT-034", "EXT-014",
                           expected="no NBD_OPT_EXPORT_NAME after extended headers", observed=describe([r]))
        after = opts[opts.index(Opt.GO) + 1:] if Opt.GO in opts else []
        verdict.expect(not after, "GO-026", expected="no option after NBD_OPT_GO's ACK",
                       observed=f"then {after}" if after else "none")


# "The client MUST NOT set NBD_FLAG_C_NO_ZEROES if the server did not set NBD_FLAG_NO_ZEROES" (HS-014):
# the server leaves the flag out (like nbdkit --mask-handshake) and the core checks the client's flags.
@pytest.mark.req("HS-014", "HS-007", "INTEROP-010")
@pytest.mark.feature("NBD_FLAG_NO_ZEROES")
def test_no_zeroes_not_offered(request: Any, client_peer: Any, kind: str, peer_workdir: Any, verdict: Any,
                               evidence: Any) -> None:
    """Without the server's NO_ZEROES the client does not set C_NO_ZEROES and still reads."""
    res, records = read_once(request, kind, peer_workdir, verdict, evidence, "nozero", OFFSET, LENGTH, mask_handshake=0xFFFF & ~HandshakeFlag.NO_ZEROES)
    _read_ok(verdict, kind, res, "server without NBD_FLAG_NO_ZEROES")
    flags = [_client_flags(r) for r in records]
    verdict.info(f"client flags without the server's NO_ZEROES: {flags}")


# "A client SHOULD ignore handshake flags it does not recognise" (HS-005): the greeting carries bit 15
# (fault unknown-handshake-flag); the client must negotiate as usual.
@pytest.mark.req("HS-005", "HS-016")
@pytest.mark.feature("newstyle")
def test_unknown_handshake_flag_ignored(request: Any, client_peer: Any, kind: str, peer_workdir: Any, verdict: Any,
                                        evidence: Any) -> None:
    """An undefined handshake flag bit does not stop the client."""
    res, records = read_once(request, kind, peer_workdir, verdict, evidence, "hsflag", OFFSET, LENGTH, fault="unknown-handshake-flag")
    got = parse_read(kind, res.out) if res.ok else None
    # HS-005 alone: the server broke HS-010 ("MUST NOT set any other flags") on purpose, so a client
    # that hangs up breaks only the SHOULD (non-strict), whatever else it then cannot do.
    verdict.expect(got == pattern(OFFSET, LENGTH), "HS-005",
                   expected="the client ignores handshake flag bit 15 and reads",
                   observed=f"exit {res.rc}; {res.out[-300:]!r}; {describe(records)}")


# A server without NBD_OPT_GO (qemu-nbd before 2.10) answers it NBD_REP_ERR_UNSUP: "Clients SHOULD fall
# back to NBD_OPT_EXPORT_NAME" (OPT-010, GO-021); "implement NBD_OPT_EXPORT_NAME as well" (INTEROP-019).
@pytest.mark.req("OPT-010", "GO-021", "INTEROP-019", "INTEROP-010", "OPT-004")
@pytest.mark.feature("NBD_OPT_GO")
def test_export_name_fallback(request: Any, client_peer: Any, kind: str, peer_workdir: Any, verdict: Any,
                              evidence: Any) -> None:
    """NBD_OPT_GO refused as unsupported: the client retries with NBD_OPT_EXPORT_NAME and reads."""
    res, records = read_once(request, kind, peer_workdir, verdict, evidence, "nogo", OFFSET, LENGTH, persona="qemu-2.6")
    got = parse_read(kind, res.out) if res.ok else None
    data = [r for r in records if r.requests]
    used = [Opt.EXPORT_NAME in options_sent(r) for r in data]
    ok = got == pattern(OFFSET, LENGTH) and bool(used) and all(used)
    seen = f"exit {res.rc}; {describe(records)}; {res.out[-200:]!r}"
    verdict.expect(ok, "INTEROP-019", "INTEROP-010", expected="NBD_OPT_EXPORT_NAME and a correct read", observed=seen)
    if any(Opt.GO in options_sent(r) for r in data):    # a fallback only from a GO that was refused
        verdict.expect(ok, "OPT-010", "GO-021", expected="after NBD_REP_ERR_UNSUP to GO, NBD_OPT_EXPORT_NAME",
                       observed=seen)
    for r in records:
        late = _final_ack_before_each_option(r)
        verdict.expect(not late, "OPT-004", expected="each option after the final reply to the previous one",
                       observed="; ".join(late) or "in order")
