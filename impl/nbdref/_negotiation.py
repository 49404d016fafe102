"""Rules and effects of the handshake and option haggling, for messages of either role."""

from __future__ import annotations

from . import _events as ev
from . import _wire as w
from ._checker import Checker, _power_of_two
from ._constants import (
    MAX_MIN_BLOCK,
    STRING_MAX,
    ClientFlag,
    HandshakeFlag,
    Info,
    Opt,
    Rep,
    TxFlag,
)
from ._errors import LocalProtocolError

# Flag masks as plain ints: ``~`` of an IntFlag keeps only the bits its class defines, so a check
# written ``flags & ~HandshakeFlag(...)`` would never see an undefined bit.
_HANDSHAKE_FLAGS = int(HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES)
_FIXED_NEWSTYLE, _NO_ZEROES = int(HandshakeFlag.FIXED_NEWSTYLE), int(HandshakeFlag.NO_ZEROES)
_CLIENT_FLAGS = int(ClientFlag.FIXED_NEWSTYLE | ClientFlag.NO_ZEROES)
_C_FIXED_NEWSTYLE, _C_NO_ZEROES = int(ClientFlag.FIXED_NEWSTYLE), int(ClientFlag.NO_ZEROES)

# Non-error reply types each option may receive before its final ACK.
ALLOWED_REPLIES: dict[int, frozenset[int]] = {
    Opt.LIST: frozenset({Rep.SERVER}),
    Opt.INFO: frozenset({Rep.INFO}),
    Opt.GO: frozenset({Rep.INFO}),
    Opt.LIST_META_CONTEXT: frozenset({Rep.META_CONTEXT}),
    Opt.SET_META_CONTEXT: frozenset({Rep.META_CONTEXT}),
}
# Requirement broken by a known-but-unexpected reply type, per option.
UNEXPECTED_REPLY_REQ: dict[int, str] = {
    Opt.ABORT: "OPT-011",
    Opt.STARTTLS: "TLS-053",
    Opt.INFO: "GO-012",
    Opt.GO: "GO-012",
    Opt.LIST_META_CONTEXT: "BS-032",
    Opt.SET_META_CONTEXT: "BS-049",
}
# "the client MUST NOT send data with NBD_OPT_..." per option.
NO_DATA_REQ: dict[type[ev.Option], str] = {
    ev.OptAbort: "OPT-012",
    ev.OptList: "OPT-017",
    ev.OptStartTLS: "TLS-052",
    ev.OptStructuredReply: "SR-015",
    ev.OptExtendedHeaders: "EXT-029",
}


class NegotiationRules(Checker):
    """Mixin: per-message checks (rules binding the sender) and state effects before transmission."""

    def _on_newstyle(self, e: ev.NewstyleGreeting) -> None:
        flags = int(e.flags)  # plain int: ~ of an IntFlag would drop the undefined bits we look for
        # "bits 2-15 ... MUST NOT be set" (HS-010); the client "SHOULD ignore" flags it does not know
        # (HS-005): recorded, and negotiation goes on
        self._check(not flags & ~_HANDSHAKE_FLAGS & 0xFFFF, "HS-010", f"undefined handshake flags {flags:#06x}",
                    tolerated=True)
        self.handshake_flags = flags

    def _on_oldstyle(self, e: ev.OldstyleGreeting) -> None:
        # "the server MUST NOT set any of these flags during oldstyle negotiation" (OLD-003)
        self._check(e.handshake_flags == 0, "OLD-003", f"handshake flags {e.handshake_flags:#x} in oldstyle")
        self._tx_flags(e.transmission_flags)
        self.oldstyle = True
        self.export_size, self.transmission_flags = e.export_size, e.transmission_flags

    def _on_client_flags(self, e: ev.ClientFlags) -> None:
        flags = int(e.flags)
        # "Clients MUST NOT set any other flags" than the defined ones (HS-016)
        self._check(not flags & ~_CLIENT_FLAGS, "HS-016", f"undefined client flags {flags:#010x}")
        # "The client MUST NOT set NBD_FLAG_C_NO_ZEROES unless the server set NBD_FLAG_NO_ZEROES" (HS-014)
        hs = self.handshake_flags or 0
        self._check(
            not (flags & _C_NO_ZEROES) or hs & _NO_ZEROES,
            "HS-014",
            "NBD_FLAG_C_NO_ZEROES without the server's NBD_FLAG_NO_ZEROES",
        )
        self._check(
            not (hs & _FIXED_NEWSTYLE) or flags & _C_FIXED_NEWSTYLE,
            "HS-007",
            "fixed-newstyle server answered without NBD_FLAG_C_FIXED_NEWSTYLE",
        )
        self.client_flags = flags

    def _on_option(self, e: ev.Option) -> None:
        if self._shutdown_seen:
            # "On receiving NBD_REP_ERR_SHUTDOWN the client MUST initiate a soft disconnect" (DISC-014)
            self._check(isinstance(e, ev.OptAbort), "DISC-014", f"option {e.option} after NBD_REP_ERR_SHUTDOWN")
        # "the client MUST NOT send another option until it has received the final reply" (OPT-004)
        if self._pending is not None:
            self._check(False, "OPT-004", f"option {e.option} sent before the final reply to {self._pending.option}")
        req = NO_DATA_REQ.get(type(e))
        if req is not None:
            self._check(not e.data, req, f"{len(e.data)} bytes of data with option {e.option}")  # type: ignore[attr-defined]
        replies = self.structured_replies or self.extended_headers
        if isinstance(e, ev.OptStartTLS):
            fixed = (self.handshake_flags or 0) & 1 and (self.client_flags or 0) & 1
            self._check(fixed, "TLS-032", "NBD_OPT_STARTTLS without fixed newstyle on both sides")
            self._check(not self.tls_negotiated, "TLS-033", "NBD_OPT_STARTTLS with TLS already active")
        elif isinstance(e, ev.OptExportName):
            self._string(e.name, "export name")
            # "a client that negotiated extended headers MUST NOT use NBD_OPT_EXPORT_NAME" (EXT-014)
            self._check(not self.extended_headers, "EXT-014", "NBD_OPT_EXPORT_NAME after extended headers")
        elif isinstance(e, ev.OptInfo | ev.OptGo):
            self._string(e.name, "export name")
            # "The client MUST NOT list the same information request twice" (GO-004)
            self._check(len(set(e.info)) == len(e.info), "GO-004", f"duplicate information requests {e.info}")
        elif isinstance(e, ev.OptListMetaContext | ev.OptSetMetaContext):
            self._string(e.name, "export name")
            setting = isinstance(e, ev.OptSetMetaContext)
            for q in e.queries:
                self._string(q, "meta context query")
                # "each query MUST begin with a namespace and a colon" (BS-027 / BS-046)
                self._check(":" in q, "BS-046" if setting else "BS-027", f"query {q!r} has no namespace")
                self._context_name(q, "meta context query")
            if setting:
                # "The client MUST NOT send NBD_OPT_SET_META_CONTEXT before structured replies" (BS-043)
                self._check(replies, "BS-043", "NBD_OPT_SET_META_CONTEXT before structured replies")
            else:
                self._check(replies, "BS-025", "NBD_OPT_LIST_META_CONTEXT before structured replies")
        if isinstance(e, ev.OptStructuredReply | ev.OptExtendedHeaders):
            # "a client SHOULD NOT send a state-changing option more than once" (OPT-005)
            self._check(e.option not in self._sent_state_options, "OPT-005", f"option {e.option} sent twice")
            self._sent_state_options.add(e.option)
        if isinstance(e, ev.OptAbort | ev.OptExportName) and self._fixed_newstyle():
            # The client ended haggling by a soft disconnect or by entering transmission: it did not
            # hard-disconnect during haggling (DISC-006), watched for the whole phase.
            self._record("DISC-006")
        self._options_since_info += 1
        if isinstance(e, ev.OptInfo):
            self._options_since_info = 0
            self._last_info = None
        self._pending = e
        self._pending_infos = []
        self._pending_contexts = {}

    def _on_option_reply(self, r: ev.OptionReply) -> None:
        opt = self._pending
        if opt is None or r.option != opt.option:
            asked = "no option" if opt is None else f"option {opt.option}"
            msg = f"reply to option {r.option} while {asked} is pending"
            if self._sender is self.role:
                if self.strictness.check_local:
                    raise LocalProtocolError(msg)
                return
            # An option reply carries "the option as sent by the client to which this is a reply".
            raise self._fail(msg, "Fixed newstyle negotiation")
        code = opt.option
        final = isinstance(r, ev.RepAck | ev.RepError)
        self._client_flags_dropped()
        if isinstance(r, ev.RepError):
            self._string(r.message, "error message")
            self._on_rep_error(opt, r)
        elif isinstance(r, ev.RepAck):
            self._on_ack(opt)
        elif not isinstance(r, ev.RepUnknown) and code in UNEXPECTED_REPLY_REQ:
            ok = r.reply_type in ALLOWED_REPLIES.get(code, frozenset())
            self._check(ok, UNEXPECTED_REPLY_REQ[code], f"{type(r).__name__} in reply to option {code}")
        if isinstance(r, ev.RepServer):
            self._string(r.name, "export name")
            self._string(r.details, "export details")
        elif isinstance(r, ev.RepInfo) and code in (Opt.INFO, Opt.GO):
            self._on_rep_info(r)
        elif isinstance(r, ev.RepMetaContext) and code in (Opt.LIST_META_CONTEXT, Opt.SET_META_CONTEXT):
            # "every returned name MUST begin with its namespace and a colon" (BS-040); UTF-8 (BS-053)
            self._check(":" in r.name, "BS-040", f"context name {r.name!r} has no namespace")
            self._check(w.is_valid_utf8(r.name), "BS-053", "context name is not valid UTF-8")
            self._string(r.name, "context name")
            self._context_name(r.name, "context name")
            if code == Opt.SET_META_CONTEXT:
                queries = getattr(opt, "queries", ())
                # "With zero queries SET_META_CONTEXT MUST select no contexts" (BS-047)
                self._check(queries, "BS-047", f"context {r.name!r} selected by an empty query list")
                # "The query 'base:' MUST be ignored by NBD_OPT_SET_META_CONTEXT" (BS-014)
                self._check(
                    not (r.name.startswith("base:") and "base:" in queries and r.name not in queries),
                    "BS-014",
                    f"context {r.name!r} selected by the query 'base:'",
                )
                # "one NBD_REP_META_CONTEXT with a unique ID per selected context" (BS-049)
                self._check(r.context_id not in self._pending_contexts, "BS-049", f"context id {r.context_id} reused")
                self._pending_contexts[r.context_id] = r.name
            else:
                self._check(r.context_id == 0, "BS-041", f"LIST_META_CONTEXT reply with id {r.context_id}")
        if final:
            self._pending = None
            # An error reply to STARTTLS (a failed TLS negotiation, DISC-005 / TLS-036) or
            # ERR_TLS_REQD (TLS required but not running, TLS-031/040/041): the client may give up.
            self._last_reply_failed = isinstance(r, ev.RepError) and (
                (opt is not None and opt.option == Opt.STARTTLS) or r.reply_type == Rep.ERR_TLS_REQD
            )

    def _on_rep_error(self, opt: ev.Option, r: ev.RepError) -> None:
        code = opt.option
        if r.reply_type == Rep.ERR_SHUTDOWN:
            self._shutdown_seen = True
        # "The server MUST reply NBD_REP_ACK to NBD_OPT_ABORT" (OPT-011)
        self._check(code != Opt.ABORT, "OPT-011", "error reply to NBD_OPT_ABORT")
        if r.reply_type == Rep.ERR_TLS_REQD:
            # "Once TLS is negotiated ... the server MUST NOT send NBD_REP_ERR_TLS_REQD" (TLS-020 / TLS-027)
            self._check(not self.tls_negotiated, "TLS-020", "NBD_REP_ERR_TLS_REQD after TLS was negotiated")
        if code in (Opt.INFO, Opt.GO):
            asked_bs = Info.BLOCK_SIZE in getattr(opt, "info", ())
            # "The server MUST NOT send NBD_REP_ERR_BLOCK_SIZE_REQD if the client requested
            # NBD_INFO_BLOCK_SIZE" (GO-016)
            self._check(
                not (r.reply_type == Rep.ERR_BLOCK_SIZE_REQD and asked_bs),
                "GO-016",
                "NBD_REP_ERR_BLOCK_SIZE_REQD although NBD_INFO_BLOCK_SIZE was requested",
            )
            # "a server that acknowledged NBD_OPT_EXTENDED_HEADERS MUST NOT fail NBD_OPT_GO with
            # NBD_REP_ERR_UNSUP" (EXT-016)
            self._check(
                not (code == Opt.GO and r.reply_type == Rep.ERR_UNSUP and self.extended_headers),
                "EXT-016",
                "NBD_OPT_GO refused with NBD_REP_ERR_UNSUP after extended headers",
            )
            self._check(
                not (r.reply_type == Rep.ERR_UNKNOWN and self._pending_infos),
                "GO-013",
                "NBD_REP_INFO replies sent before NBD_REP_ERR_UNKNOWN",
            )
        if code == Opt.SET_META_CONTEXT:
            # "If the reply ends in an error the client must disregard any context replies" (BS-033)
            self.meta_contexts = {}
            self._meta_export = None

    def _on_ack(self, opt: ev.Option) -> None:
        code = opt.option
        if code in (Opt.INFO, Opt.GO):
            exports = [i for i in self._pending_infos if isinstance(i, ev.RepInfoExport)]
            # "the server MUST send at least one NBD_REP_INFO of type NBD_INFO_EXPORT before
            # NBD_REP_ACK" (GO-012)
            self._check(exports, "GO-012", "NBD_REP_ACK without a preceding NBD_INFO_EXPORT")
            if code == Opt.GO:
                # Haggling ended with GO's ACK: neither side hard-disconnected during it (DISC-006).
                self.checked.add("DISC-006")
                self._same_as_info(opt, exports)
                self._commit_export(opt, exports)
                self._zeroes_suspect = "GO-025"
            else:
                last = exports[-1] if exports else None
                self._last_info = (getattr(opt, "name", ""), getattr(opt, "info", ()), last)
        elif code == Opt.STRUCTURED_REPLY:
            self.structured_replies = True
        elif code == Opt.EXTENDED_HEADERS:
            self.extended_headers = True
        elif code == Opt.SET_META_CONTEXT:
            self.meta_contexts = dict(self._pending_contexts)
            self._meta_export = getattr(opt, "name", "")
        elif code == Opt.STARTTLS:
            self._queue.append(ev.StartTLS())

    def _same_as_info(self, opt: ev.Option, exports: list[ev.RepInfo]) -> None:
        """GO right after an INFO with the same parameters must return the same information."""
        if self._last_info is None or self._options_since_info != 1 or not exports:
            return
        name, info, before = self._last_info
        if (name, info) != (getattr(opt, "name", ""), getattr(opt, "info", ())) or before is None:
            return
        now = exports[-1]
        assert isinstance(now, ev.RepInfoExport) and isinstance(before, ev.RepInfoExport)
        # "A GO with the same parameters directly after a successful INFO MUST return the same
        # information" (GO-022)
        self._check(
            (now.export_size, now.transmission_flags) == (before.export_size, before.transmission_flags),
            "GO-022",
            f"GO gave size {now.export_size} flags {now.transmission_flags:#x}, INFO gave "
            f"{before.export_size} / {before.transmission_flags:#x}",
        )

    def _context_name(self, name: str, what: str) -> None:
        """proto.md "Metadata querying": a context name is "a namespace, followed by a colon, followed by
        a leaf-name"; the namespace is non-empty, "printable non-whitespace UTF-8 characters other than
        colons" (BS-007); the whole name follows the string rules (BS-008).  Held to a client's queries
        too (the only names a client sends): a query's leaf may be empty (the LIST wildcard; in SET it
        "SHOULD NOT select any contexts", which binds the server), and its syntax after the colon is
        implementation-defined, so only the namespace and the colon are judged."""
        ns, colon, _leaf = name.partition(":")
        if colon:       # a missing colon is BS-027 / BS-046 / BS-040, reported where it is checked
            ok = bool(ns) and all(c.isprintable() and not c.isspace() for c in ns)
            self._check(ok, "BS-007", f"{what} {name[:80]!r}: the namespace is empty or not printable "
                                      "non-whitespace characters")
        # The string rules themselves are GEN-001 / GEN-003, checked by _string on the same name just
        # before: BS-008 ("the whole name MUST obey them") held when they did, so a breach is told once.
        b = w.enc_str(name)
        if len(b) <= STRING_MAX and b"\0" not in b and w.is_valid_utf8(name):
            self._record("BS-008")

    def _bad_client_flags(self) -> bool:
        """The client set an unknown flag or one the server did not advertise."""
        cf, hs = self.client_flags or 0, self.handshake_flags or 0
        return bool(cf & ~_CLIENT_FLAGS or (cf & _C_NO_ZEROES and not hs & _NO_ZEROES))

    def _client_flags_dropped(self) -> None:
        """The server answered although the client flags obliged it to drop the connection."""
        cf, bad = self.client_flags or 0, self._bad_client_flags()
        # "The server MUST drop the connection if the client sets an unknown flag or a flag the server
        # did not advertise" (HS-017)
        self._check(not bad, "HS-017", f"server carried on after client flags {cf:#x}")

    def _commit_export(self, opt: ev.Option, exports: list[ev.RepInfo]) -> None:
        name = getattr(opt, "name", "")
        self.export_name = name
        if exports:
            last = exports[-1]
            assert isinstance(last, ev.RepInfoExport)
            self.export_size, self.transmission_flags = last.export_size, last.transmission_flags
        sizes = [i for i in self._pending_infos if isinstance(i, ev.RepInfoBlockSize)]
        if sizes:
            s = sizes[-1]
            self.block_size = (s.minimum, s.preferred, s.maximum)
            if self.export_size is not None and s.minimum > 0:
                # "the export size SHOULD be a multiple of the minimum block size" (BSZ-016)
                self._check(
                    self.export_size % s.minimum == 0,
                    "BSZ-016",
                    f"export size {self.export_size} not a multiple of minimum block size {s.minimum}",
                )
        self._block_size_requested = Info.BLOCK_SIZE in getattr(opt, "info", ())
        if self._meta_export != name:
            # Contexts selected for another export cannot be used (BS-045).
            self.meta_contexts = {}

    def _on_rep_info(self, r: ev.RepInfo) -> None:
        # "Each information type SHOULD appear only once per export" (GO-028)
        again = any(i.info_type == r.info_type for i in self._pending_infos)
        self._check(not again, "GO-028", f"NBD_INFO type {r.info_type} sent twice")
        self._pending_infos.append(r)
        if isinstance(r, ev.RepInfoExport):
            self._tx_flags(r.transmission_flags, go=self._pending)
        elif isinstance(r, ev.RepInfoName):
            self._string(r.name, "canonical export name")
        elif isinstance(r, ev.RepInfoDescription):
            self._string(r.description, "export description")
        elif isinstance(r, ev.RepInfoBlockSize):
            mn, pref, mx = r.minimum, r.preferred, r.maximum
            # "The minimum block size MUST be a power of 2 ... MUST NOT be larger than 2^16" (BSZ-013/014)
            self._check(_power_of_two(mn), "BSZ-013", f"minimum block size {mn} is not a power of 2")
            self._check(mn <= MAX_MIN_BLOCK, "BSZ-014", f"minimum block size {mn} exceeds 65536")
            # "The preferred block size MUST be a power of 2 and at least max(min, 512)" (BSZ-017)
            self._check(
                _power_of_two(pref) and pref >= max(mn, 512),
                "BSZ-017",
                f"preferred block size {pref} (minimum {mn})",
            )
            # "The maximum payload size ... MUST be at least the preferred block size" (BSZ-021)
            self._check(mx >= pref, "BSZ-021", f"maximum payload {mx} below preferred block size {pref}")

    def _tx_flags(self, flags: int, *, go: ev.Option | None = None) -> None:
        """Checks on transmission flags (EXPORT_NAME reply, NBD_INFO_EXPORT, oldstyle greeting).

        ``go`` is the option an NBD_INFO_EXPORT answers. Undefined bits are not a breach: "Clients
        SHOULD ignore unknown flags" (CMD-013).
        """
        flags = int(flags)
        # "NBD_FLAG_HAS_FLAGS ... MUST always be 1" (CMD-009)
        self._check(flags & TxFlag.HAS_FLAGS, "CMD-009", f"transmission flags {flags:#06x} lack HAS_FLAGS")
        replies = self.structured_replies or self.extended_headers
        # "The server MUST leave NBD_FLAG_SEND_DF clear if structured replies were not negotiated"
        # (RD-002; EXT-010 counts extended headers as well)
        self._check(not (flags & TxFlag.SEND_DF) or replies, "RD-002", "SEND_DF without structured replies")
        # "NBD_FLAG_SEND_FAST_ZERO MUST be clear if NBD_FLAG_SEND_WRITE_ZEROES is clear" (WZ-002)
        self._check(
            not (flags & TxFlag.SEND_FAST_ZERO) or flags & TxFlag.SEND_WRITE_ZEROES,
            "WZ-002",
            "SEND_FAST_ZERO without SEND_WRITE_ZEROES",
        )
        # "Servers MUST NOT advertise NBD_FLAG_BLOCK_STATUS_PAYLOAD unless extended headers" (EXT-011)
        self._check(
            not (flags & TxFlag.BLOCK_STATUS_PAYLOAD) or self.extended_headers,
            "EXT-011",
            "BLOCK_STATUS_PAYLOAD without extended headers",
        )
        if isinstance(go, ev.OptGo) and flags & TxFlag.BLOCK_STATUS_PAYLOAD:
            # "...and SHOULD NOT advertise this bit in response to NBD_OPT_GO if the client does not
            # negotiate metacontexts with NBD_OPT_SET_META_CONTEXT" (EXT-012): the GO reply only, not
            # NBD_OPT_INFO's (which selects nothing) nor NBD_OPT_EXPORT_NAME's. Contexts negotiated for
            # another export are not negotiated for this one (they are dropped, BS-045).
            negotiated = bool(self.meta_contexts) and self._meta_export == go.name
            self._check(negotiated, "EXT-012", "BLOCK_STATUS_PAYLOAD without negotiated meta contexts")

    def _on_export_name_reply(self, e: ev.ExportNameReply) -> None:
        opt = self._pending
        if not isinstance(opt, ev.OptExportName):
            msg = "export name reply without a pending NBD_OPT_EXPORT_NAME"
            if self._sender is self.role:
                if self.strictness.check_local:
                    raise LocalProtocolError(msg)
                return
            raise self._fail(msg, "Option types / NBD_OPT_EXPORT_NAME")
        self._client_flags_dropped()
        self._tx_flags(e.transmission_flags)
        if e.zeroes is not None:
            # "the server MUST NOT send the 124 bytes of zeroes" when NO_ZEROES was agreed (HS-009)
            self._check(not (e.zeroes and self.no_zeroes), "HS-009", "124 zero bytes despite NO_ZEROES")
        self._pending = None
        self.export_name = opt.name
        self.export_size, self.transmission_flags = e.export_size, e.transmission_flags
        if self._meta_export != opt.name:
            self.meta_contexts = {}
