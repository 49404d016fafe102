"""Option haggling in depth: unknown options, options with data they must not carry, truncated and
oversized ones, strings of 4096 and 4097 bytes, repeated options — and after every refusal the *next*
option must still be understood (the server consumed all of the refused option).

Each case runs on its own connection to the shared server: the odd option, then NBD_OPT_LIST (a plain
option every fixed-newstyle server understands), then NBD_OPT_ABORT.  A client that breaks a MUST may be
hard-disconnected ("If either the client or the server detects a violation of a mandatory condition ...
it MAY initiate a hard disconnect"): a close after an illegal option is recorded, not failed; after a
legal one (an unknown option, a 4096-byte name) it is a breach of DISC-006 / DISC-010.
"""

from __future__ import annotations

import contextlib
import struct
from collections.abc import Callable
from dataclasses import dataclass

import pytest
from nbdref import events as ev
from nbdref._constants import Opt, Rep

from fixtures.expectations import option_haggling
from fixtures.timeouts import SILENCE
from suites.server._haggle import UNKNOWN_OPTION, Plain, final, is_error, names

SECTION = "Option haggling"


def _name_data(name: bytes, infos: tuple[int, ...] = (), *, name_len: int | None = None,
               count: int | None = None) -> bytes:
    """NBD_OPT_INFO / GO data: name length, name, number of info requests, the requests (lengths may lie)."""
    n = len(name) if name_len is None else name_len
    k = len(infos) if count is None else count
    return struct.pack(">I", n) + name + struct.pack(">H", k) + b"".join(struct.pack(">H", i) for i in infos)


def _meta_data(name: bytes, queries: list[bytes], *, query_len: int | None = None) -> bytes:
    out = struct.pack(">I", len(name)) + name + struct.pack(">I", len(queries))
    for q in queries:
        out += struct.pack(">I", len(q) if query_len is None else query_len) + q
    return out


@dataclass(frozen=True)
class Case:
    """One odd option: its code and data, whether a client may legally send it, and what the spec wants."""

    code: int
    data: bytes
    legal: bool                     # the client breaks no MUST by sending it (so a close is a breach)
    want: tuple[int, ...] = ()      # acceptable final replies (NBD_REP_*); () = any error
    ids: tuple[str, ...] = ()       # ids judged on the final reply
    note: str = ""


N4096, N4097 = b"n" * 4096, b"n" * 4097
CASES: dict[str, Case] = {
    # "A server MUST answer options it does not implement with NBD_REP_ERR_UNSUP" (INTEROP-005)
    "unknown-empty": Case(UNKNOWN_OPTION, b"", True, (Rep.ERR_UNSUP,), ("INTEROP-005",)),
    "unknown-data": Case(UNKNOWN_OPTION, bytes(range(256)) * 4, True, (Rep.ERR_UNSUP,), ("INTEROP-005",)),
    "unknown-8k": Case(0x7777, b"\xaa" * 8192, True, (Rep.ERR_UNSUP, Rep.ERR_TOO_BIG), ("INTEROP-005",)),
    # "the server SHOULD reject a request that includes data with NBD_REP_ERR_INVALID" (OPT-018, SR-016)
    "list-with-data": Case(Opt.LIST, b"\0\0\0\0", False, (Rep.ERR_INVALID,), ("OPT-018",)),
    "structured-reply-with-data": Case(Opt.STRUCTURED_REPLY, b"data", False, (Rep.ERR_INVALID,), ("SR-016",)),
    # NOTLS: STARTTLS answered "with NBD_REP_ERR_POLICY, NBD_REP_ERR_UNSUP or another explicitly permitted
    # error" (TLS-009), NBD_REP_ERR_INVALID "if data was sent" (TLS-053); never NBD_REP_ERR_TLS_REQD (TLS-010)
    "starttls-with-data": Case(Opt.STARTTLS, b"tls?", False, (Rep.ERR_INVALID, Rep.ERR_POLICY, Rep.ERR_UNSUP),
                               ("TLS-053", "TLS-009", "TLS-010")),
    # syntactically invalid: lengths past the option's end, or leftover bytes
    "info-name-past-end": Case(Opt.INFO, _name_data(b"exp", name_len=4000), False, (Rep.ERR_INVALID,)),
    "info-count-past-end": Case(Opt.INFO, _name_data(b"exp", count=50), False, (Rep.ERR_INVALID,)),
    "info-trailing-bytes": Case(Opt.INFO, _name_data(b"exp") + b"\x01", False, (Rep.ERR_INVALID,)),
    "info-truncated": Case(Opt.INFO, b"\0\0", False, (Rep.ERR_INVALID,)),
    # "If the option request is syntactically invalid (such as a query length that would require reading
    # beyond the original length given in the option header), the server MUST fail the request with
    # NBD_REP_ERR_INVALID" (BS-028)
    "meta-query-past-end": Case(Opt.LIST_META_CONTEXT, _meta_data(b"exp", [b"base:"], query_len=9999), False,
                                (Rep.ERR_INVALID,), ("BS-028",)),
    # "Strings must never exceed 4096 bytes" (GEN-003): a 4097-byte name must not be accepted; 4096 is legal
    "info-name-4096": Case(Opt.INFO, _name_data(N4096), True, (), (), "legal: any answer, then go on"),
    "info-name-4097": Case(Opt.INFO, _name_data(N4097), False, (), ("GEN-003",)),
    "meta-query-4097": Case(Opt.LIST_META_CONTEXT, _meta_data(b"exp", [b"base:" + b"q" * 4092]), False, ()),
    # unknown export: an error (NBD_REP_ERR_UNKNOWN is the one for it), and haggling goes on
    "info-unknown-export": Case(Opt.INFO, _name_data(b"no-such-export-\x01"), True, ()),
}


# Options a server may lack entirely (then NBD_REP_ERR_UNSUP is the right answer whatever the data)
FEATURE_OF = {Opt.STRUCTURED_REPLY: "NBD_OPT_STRUCTURED_REPLY", Opt.LIST_META_CONTEXT: "NBD_OPT_LIST_META_CONTEXT",
              Opt.INFO: "NBD_OPT_INFO", Opt.LIST: "NBD_OPT_LIST"}


def _list_answer(plain: Plain) -> str:
    replies = plain.option(ev.OptList())
    return names(replies[-1:]) if replies else "nothing"


def _need_options(server_peer, verdict) -> None:
    why = option_haggling(server_peer)
    if why is not None:
        verdict.not_applicable(f"needs option haggling: {why}")


# A healthy server answers an option in milliseconds; one out of step after a malformed option waits
# for bytes that never come, so the wait for a reply is short.
REPLY_TIMEOUT = SILENCE


def _session(shared_server, verdict, run: Callable[[Plain], None], *, legal: bool = True) -> None:
    plain = Plain(shared_server, timeout=REPLY_TIMEOUT)
    # after an illegal option a server out of step may close at the next one: recorded by the case
    verdict.watch(plain.conn, allow=() if legal else ("DISC-006",))
    try:
        if not plain.fixed:
            verdict.not_applicable("the server did not offer fixed newstyle: options other than "
                                   "NBD_OPT_EXPORT_NAME are not allowed")
        run(plain)
    finally:
        plain.close()


# After each odd option: the right refusal (or any, or a close when the client broke a MUST), and the
# next option understood: "must still parse the next option correctly (skip the unknown option's data)"
# (INTEROP-006); "A server unwilling to continue must keep answering options with errors instead of
# disconnecting" (DISC-010); no hard disconnect during haggling outside the listed cases (DISC-006).
# Each case's marker names what it judges; the NBD_REP_SERVER names of the NBD_OPT_LIST after it are
# strings the core checks (GEN-001 no NUL, GEN-002 at most 256 bytes; OPT-019 "the name length must be
# at most the reply length minus 4").
def _params() -> list:
    out = []
    for key, c in CASES.items():
        # the next option is judged (INTEROP-006, DISC-010, DISC-006) only after a legal odd option
        ids = (*c.ids, "GEN-001", "GEN-002", "OPT-019") + (("INTEROP-006", "DISC-010", "DISC-006") if c.legal else ())
        out.append(pytest.param(key, id=key, marks=pytest.mark.req(*dict.fromkeys(ids))))
    return out


@pytest.mark.feature("fixed-newstyle")
@pytest.mark.parametrize("case", _params())
def test_odd_option_then_next(server_peer, shared_server, verdict, case):
    """An odd option gets a refusal the spec allows, and the option after it is understood."""
    _need_options(server_peer, verdict)
    c = CASES[case]
    if c.code == Opt.STARTTLS and "x509" in server_peer.tls and getattr(shared_server.export, "tls", None):
        verdict.not_applicable("the shared server has TLS")

    def run(plain: Plain) -> None:
        replies = plain.raw_option(c.code, c.data)
        last = final(replies)
        got = names(replies)
        closed = not plain.open
        if closed:
            if c.legal:
                verdict.fail("DISC-006", "DISC-010", expected=f"{case}: a reply, and haggling goes on",
                             observed=f"the server hard-disconnected ({got})")
            else:
                # the client broke a MUST: the server MAY hard-disconnect
                verdict.info(f"{case}: hard disconnect after an illegal option ({got}): allowed")
                if "GEN-003" in c.ids:
                    verdict.held("GEN-003", expected="a 4097-byte name is not accepted",
                                   observed="closed")
            return
        if isinstance(last, ev.RepAck) or not is_error(last):
            if "GEN-003" in c.ids:
                verdict.fail("GEN-003", expected="a 4097-byte export name refused", observed=f"accepted: {got}")
            elif c.want and c.ids:
                verdict.fail(*c.ids, expected=f"{case}: " + " or ".join(f"NBD_REP_{Rep(w).name}" for w in c.want),
                             observed=got)
            else:
                verdict.info(f"{case}: answered {got}")
        elif last.reply_type == Rep.ERR_UNSUP and c.code in FEATURE_OF:
            # the server does not implement the option at all: a timeline question, not a malformed-data one
            verdict.timeline(FEATURE_OF[c.code], False, export=shared_server.export, how=f"{case}: {got}")
        else:
            for rid in c.ids:
                if rid == "TLS-010":
                    verdict.expect(last.reply_type != Rep.ERR_TLS_REQD, rid, expected="never NBD_REP_ERR_TLS_REQD "
                                   "from a NOTLS server", observed=got)
                elif rid == "GEN-003":
                    verdict.held(rid, expected="a 4097-byte name refused", observed=got)
                elif c.want:
                    verdict.expect(last.reply_type in c.want, rid, expected=" or ".join(
                        f"NBD_REP_{Rep(w).name}" for w in c.want), observed=got)
            if not c.ids or not c.want:
                verdict.info(f"{case}: refused with {got}")
        after = _list_answer(plain)
        understood = after.startswith("RepAck") or after.startswith("NBD_REP_ERR")
        story = f"{case}: {got}; then NBD_OPT_LIST: {after}"
        if c.legal:
            verdict.expect(understood, "INTEROP-006", "DISC-010",
                           expected=f"NBD_OPT_LIST after {case} understood (NBD_REP_SERVER ... NBD_REP_ACK)",
                           observed=story)
            verdict.expect(plain.open, "DISC-006", expected="no hard disconnect during haggling",
                           observed=story)
        elif not understood:
            # The option length frames every option ("allows the server to skip any options ... it does
            # not understand"), but no MUST says a server that parsed a malformed option must resync:
            # recorded, not failed.
            verdict.info(f"not in step after a malformed option: {story}")
        else:
            verdict.info(story)
        if plain.open:
            with contextlib.suppress(OSError):
                plain.option(ev.OptAbort())

    _session(shared_server, verdict, run, legal=c.legal)


# "The server SHOULD ignore data sent with NBD_OPT_ABORT rather than reject the request" (OPT-013),
# and "The server MUST reply with NBD_REP_ACK" (OPT-011); a close is what the client must cope with
# (OPT-014), not the reply.
@pytest.mark.req("OPT-013", "OPT-011")
@pytest.mark.feature("NBD_OPT_ABORT")
def test_abort_with_data(server_peer, shared_server, verdict):
    """NBD_OPT_ABORT with data is acknowledged (or the session closed), never refused."""
    _need_options(server_peer, verdict)

    def run(plain: Plain) -> None:
        replies = plain.raw_option(Opt.ABORT, b"bye!")
        got = names(replies)
        verdict.expect(not is_error(final(replies)), "OPT-013", expected="NBD_REP_ACK (or a close), not an error",
                       observed=got)
        # "The server MUST reply with NBD_REP_ACK" (OPT-011): a close is what clients tolerate from
        # servers of earlier spec versions (OPT-014), not that reply.
        verdict.expect(isinstance(final(replies), ev.RepAck), "OPT-011", expected="NBD_REP_ACK", observed=got)
    _session(shared_server, verdict, run)


# "The server should cope with a client that sends NBD_OPT_ABORT and closes without waiting for the
# reply" (OPT-015): the next client is served as usual.
@pytest.mark.req("OPT-015")
@pytest.mark.feature("NBD_OPT_ABORT")
def test_abort_and_close_at_once(server_peer, shared_server, shared_export, ref_client, verdict):
    """A client that sends NBD_OPT_ABORT and closes at once leaves the server healthy."""
    _need_options(server_peer, verdict)
    for _ in range(3):
        plain = Plain(shared_server)
        plain.sock.sendall(plain.conn.send(ev.OptAbort()))
        plain.close()
    c = ref_client(shared_server)
    verdict.expect(c.get_size() == shared_export.size, "OPT-015", expected="the next client served",
                   observed=f"size {c.get_size()}")


# The same option twice: answers the spec allows either way, recorded (a repeated NBD_OPT_LIST must list
# the same; a second NBD_OPT_STRUCTURED_REPLY may be acked again or refused), and haggling goes on.
@pytest.mark.req("INTEROP-006", "DISC-010", "OPT-019")
@pytest.mark.feature("fixed-newstyle")
def test_repeated_options(server_peer, shared_server, verdict):
    """Options sent twice are answered consistently and haggling goes on."""
    _need_options(server_peer, verdict)

    def run(plain: Plain) -> None:
        lists = [plain.option(ev.OptList()) for _ in range(2)]
        first, second = ([(type(r).__name__, getattr(r, "name", "")) for r in x] for x in lists)
        if is_error(final(lists[1])):
            # nbdkit answers a second NBD_OPT_LIST with an error (it lists once per connection): a refusal
            # the spec allows ("the server MAY ... NBD_REP_ERR_*"); the session must go on
            verdict.info(f"NBD_OPT_LIST twice: {first}, then refused {names(lists[1])}")
        else:
            verdict.expect(first == second, "INTEROP-006", expected="NBD_OPT_LIST twice lists the same",
                           observed=f"{first} then {second}")
        sr = [names(plain.option(ev.OptStructuredReply())) for _ in range(2)]
        verdict.info(f"NBD_OPT_STRUCTURED_REPLY twice: {sr}")
        unknown = [names(plain.raw_option(UNKNOWN_OPTION, b"x" * n)) for n in (0, 7, 0)]
        verdict.expect(all(u == "NBD_REP_ERR_UNSUP" for u in unknown) and plain.open, "DISC-010",
                       expected="an unknown option refused each time, haggling goes on", observed=str(unknown))
        if plain.open:
            with contextlib.suppress(OSError):
                plain.option(ev.OptAbort())
    _session(shared_server, verdict, run)


# After each kind of refusal in one session (ERR_UNSUP, ERR_INVALID, ERR_UNKNOWN / another error), the
# next option is understood: here the last one is NBD_OPT_GO, and the export is served.
@pytest.mark.req("INTEROP-006", "DISC-010", "DISC-006")
@pytest.mark.feature("NBD_OPT_GO")
def test_refusals_then_go(server_peer, shared_server, shared_export, verdict):
    """Refusal after refusal on one connection, then NBD_OPT_GO works."""
    _need_options(server_peer, verdict)

    def run(plain: Plain) -> None:
        seen = []
        for label in ("unknown-data", "info-unknown-export", "list-with-data", "info-trailing-bytes",
                      "info-name-4096", "unknown-empty"):
            c = CASES[label]
            replies = plain.raw_option(c.code, c.data)
            seen.append(f"{label}: {names(replies)}")
            if not plain.open:
                if c.legal:
                    verdict.fail("DISC-006", "DISC-010", expected="haggling goes on after each refusal",
                                 observed="; ".join(seen))
                else:
                    verdict.info(f"closed after an illegal option: {seen}")
                return
        verdict.expect(plain.open, "DISC-006", "DISC-010", expected="haggling goes on after each refusal",
                       observed="; ".join(seen))
        replies = plain.option(ev.OptGo(name=shared_export.name))
        verdict.info("; ".join(seen))
        if names(replies) == "NBD_REP_ERR_UNSUP":      # a release before NBD_OPT_GO
            verdict.timeline("NBD_OPT_GO", False, export=shared_export, how="NBD_REP_ERR_UNSUP")
            return
        verdict.expect(isinstance(final(replies), ev.RepAck), "INTEROP-006", expected="NBD_OPT_GO after the "
                       "refusals succeeds", observed=names(replies))
        if isinstance(final(replies), ev.RepAck):
            plain.sock.sendall(plain.conn.send(ev.Request(command=2, cookie=1)))   # NBD_CMD_DISC
    _session(shared_server, verdict, run)
