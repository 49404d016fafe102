"""Option haggling, server side: which replies an option gets, given exports, persona and TLS mode.

Pure decisions, no I/O: ``Negotiation.handle(option)`` returns the reply events and what the driver must
do next (``Outcome``).  The core (ServerConnection) encodes, validates and records; this module decides.
Each rule quotes the proto.md sentence it follows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from .. import events as ev
from .._constants import (
    CONTEXT_BASE_ALLOCATION,
    CONTEXT_QEMU_ALLOCATION_DEPTH,
    CONTEXT_QEMU_DIRTY_BITMAP_PREFIX,
    Info,
    Opt,
    Rep,
    TxFlag,
)
from ..personas import Persona
from ._export import Export


@dataclass(slots=True)
class Outcome:
    """Replies to send, then: ``go`` (enter transmission on ``export``), ``starttls`` or ``close``."""

    replies: list[ev.Event] = field(default_factory=list)
    go: Export | None = None
    starttls: bool = False
    close: str = ""  # non-empty: hard-disconnect after the replies, with this reason


def _brief(text: str, limit: int = 200) -> str:
    """A client-supplied name or a parse reason, cut for an error message: "Strings SHOULD be no
    longer than 256 bytes" (GEN-002) and "MUST never exceed 4096" (GEN-003), whatever the client sent."""
    return text if len(text.encode()) <= limit else text[: limit // 4] + f"... ({len(text)} characters)"


@dataclass(slots=True)
class Negotiation:
    """Negotiation state of one connection (what was agreed so far)."""

    exports: Sequence[Export]
    persona: Persona
    tls_mode: str = "off"          # off | on | require (NOTLS | SELECTIVETLS | FORCEDTLS)
    tls_active: bool = False
    fixed_newstyle: bool = True    # both sides agreed on fixed newstyle
    structured: bool = False
    extended: bool = False
    contexts: dict[int, str] = field(default_factory=dict)
    contexts_export: str | None = None
    block_size_requested: bool = False

    # ----------------------------------------------------------------- helpers

    def find(self, name: str) -> Export | None:
        for e in self.exports:
            if e.name == name:
                return e
        # "A special, 'empty', name ... is reserved for a 'default' export": our first export.
        if name == "" and self.exports:
            return self.exports[0]
        return None

    def block_size(self, export: Export) -> tuple[int, int, int] | None:
        return export.block_size or self.persona.info_block_size

    def enforced_block_size(self, export: Export) -> tuple[int, int, int] | None:
        """Constraints to enforce in transmission: the export's own (always advertised with GO, agreed
        out of band otherwise), else the persona's if NBD_OPT_GO requested (so received) them."""
        if export.block_size is not None:
            return export.block_size
        return self.persona.info_block_size if self.block_size_requested else None

    def contexts_for(self, export: Export) -> dict[int, str]:
        """The selected meta contexts if they belong to ``export``: contexts count only if "it referred
        to the same export name that was ultimately selected"."""
        if self.contexts_export is not None and self.find(self.contexts_export) is not export:
            return {}
        return self.contexts

    def transmission_flags(self, export: Export) -> int:
        p = self.persona
        flags = TxFlag.HAS_FLAGS
        writable = not export.read_only
        if export.read_only:
            flags |= TxFlag.READ_ONLY
        if p.flush:
            flags |= TxFlag.SEND_FLUSH
        if p.fua and writable:
            flags |= TxFlag.SEND_FUA
        if export.rotational:
            flags |= TxFlag.ROTATIONAL
        if p.trim and writable:
            flags |= TxFlag.SEND_TRIM
        if p.write_zeroes and writable:
            flags |= TxFlag.SEND_WRITE_ZEROES
            if p.fast_zero:
                flags |= TxFlag.SEND_FAST_ZERO
        # DF only means something with structured replies.
        if p.df and (self.structured or self.extended):
            flags |= TxFlag.SEND_DF
        if export.multi_conn and (p.multi_conn_rw if writable else p.multi_conn_ro):
            flags |= TxFlag.CAN_MULTI_CONN
        if p.cache:
            flags |= TxFlag.SEND_CACHE
        # ext-header draft, bit 12: "Servers MUST NOT advertise this bit unless the client successfully
        # negotiates extended headers ..., and SHOULD NOT advertise this bit in response to NBD_OPT_GO
        # if the client does not negotiate metacontexts with NBD_OPT_SET_META_CONTEXT" (EXT-011/012).
        if p.block_status_payload and self.extended and self.contexts_for(export):
            flags |= TxFlag.BLOCK_STATUS_PAYLOAD
        return int(flags)

    def _tls_required_for(self, export: Export | None) -> bool:
        if self.tls_active:
            return False
        if self.tls_mode == "require":
            return True
        return self.tls_mode == "on" and export is not None and export.tls_only

    def available_contexts(self, export: Export) -> list[str]:
        p = self.persona
        names = []
        if CONTEXT_BASE_ALLOCATION in p.meta_contexts:
            names.append(CONTEXT_BASE_ALLOCATION)
        if CONTEXT_QEMU_ALLOCATION_DEPTH in p.meta_contexts:
            names.append(CONTEXT_QEMU_ALLOCATION_DEPTH)
        if CONTEXT_QEMU_DIRTY_BITMAP_PREFIX in p.meta_contexts:
            names.extend(b.context for b in export.dirty_bitmaps.values())
        return names

    def _match(self, export: Export, query: str, *, listing: bool) -> list[str]:
        """Contexts a query names.  Wildcards ("base:", "qemu:", "qemu:dirty-bitmap:") only when listing:
        "the empty leaf-name makes sense as a wildcard ... during NBD_OPT_LIST_META_CONTEXT, but SHOULD
        NOT select any contexts during NBD_OPT_SET_META_CONTEXT"."""
        avail = self.available_contexts(export)
        if query in avail:
            return [query]
        if not listing:
            return []
        if query == "base:":
            return [c for c in avail if c.startswith("base:")]
        if query == "qemu:":
            return [c for c in avail if c.startswith("qemu:")]
        if query == CONTEXT_QEMU_DIRTY_BITMAP_PREFIX:
            return [c for c in avail if c.startswith(CONTEXT_QEMU_DIRTY_BITMAP_PREFIX)]
        return []

    # ----------------------------------------------------------------- dispatch

    def handle(self, opt: ev.Option) -> Outcome:
        code = opt.option
        # FORCEDTLS: "If the server receives any other option, including NBD_OPT_INFO and unsupported
        # options, it MUST reply with NBD_REP_ERR_TLS_REQD if TLS has not been initiated".
        if self.tls_mode == "require" and not self.tls_active and code not in (Opt.STARTTLS, Opt.ABORT):
            if code == Opt.EXPORT_NAME:
                # "... via NBD_OPT_EXPORT_NAME when TLS has not been initiated, ... it MUST terminate".
                return Outcome(close="NBD_OPT_EXPORT_NAME before STARTTLS in FORCEDTLS mode")
            return Outcome([ev.RepError(option=code, reply_type=Rep.ERR_TLS_REQD, message="TLS required")])
        handler = {
            Opt.EXPORT_NAME: self._export_name,
            Opt.ABORT: self._abort,
            Opt.LIST: self._list,
            Opt.STARTTLS: self._starttls,
            Opt.INFO: self._info_go,
            Opt.GO: self._info_go,
            Opt.STRUCTURED_REPLY: self._structured_reply,
            Opt.LIST_META_CONTEXT: self._meta_context,
            Opt.SET_META_CONTEXT: self._meta_context,
            Opt.EXTENDED_HEADERS: self._extended_headers,
        }.get(code)
        if handler is None or isinstance(opt, ev.OptUnknown):
            reason = getattr(opt, "reason", "")
            if reason and handler is not None:
                # "If the option request is syntactically invalid ... MUST fail ... NBD_REP_ERR_INVALID".
                return Outcome([ev.RepError(option=code, reply_type=Rep.ERR_INVALID, message=_brief(reason))])
            return Outcome([ev.RepError(option=code, reply_type=Rep.ERR_UNSUP, message="unknown option")])
        return handler(opt)

    @staticmethod
    def _error(opt: ev.Option, rep: int, message: str) -> Outcome:
        return Outcome([ev.RepError(option=opt.option, reply_type=rep, message=message)])

    def _export_name(self, opt: ev.OptExportName) -> Outcome:  # type: ignore[override]
        export = self.find(opt.name)
        # "If the chosen export does not exist or requirements for the chosen export are not met ...
        # the server MUST terminate the session."
        if export is None:
            return Outcome(close=f"NBD_OPT_EXPORT_NAME for unknown export {opt.name!r}")
        if self._tls_required_for(export):
            return Outcome(close=f"NBD_OPT_EXPORT_NAME for TLS-only export {opt.name!r} without TLS")
        if export.block_size_required:
            # "MAY refuse to go into transmission phase with a client that uses NBD_OPT_EXPORT_NAME
            # (via a hard disconnect)" when enforcing non-default size constraints.
            return Outcome(close=f"NBD_OPT_EXPORT_NAME for export {opt.name!r} that needs NBD_INFO_BLOCK_SIZE")
        self._finish_contexts(export)
        return Outcome(
            [ev.ExportNameReply(export_size=export.size, transmission_flags=self.transmission_flags(export))],
            go=export,
        )

    def _abort(self, opt: ev.OptAbort) -> Outcome:  # type: ignore[override]
        # "The server MUST reply with NBD_REP_ACK" (nbd-server persona: closes without it).
        replies: list[ev.Event] = [ev.RepAck(option=Opt.ABORT)] if self.persona.abort_ack else []
        return Outcome(replies, close="client sent NBD_OPT_ABORT")

    def _list(self, opt: ev.OptList) -> Outcome:  # type: ignore[override]
        # "the server SHOULD reject a request that includes data with NBD_REP_ERR_INVALID".
        if opt.data:
            return self._error(opt, Rep.ERR_INVALID, "NBD_OPT_LIST takes no data")
        replies: list[ev.Event] = []
        for e in self.exports:
            # "The server MAY omit entries ... [in] SELECTIVETLS mode, and the entry ... is TLS-only."
            if self._tls_required_for(e):
                continue
            replies.append(ev.RepServer(option=Opt.LIST, name=e.name, details=e.description))
        replies.append(ev.RepAck(option=Opt.LIST))
        return Outcome(replies)

    def _starttls(self, opt: ev.OptStartTLS) -> Outcome:  # type: ignore[override]
        if self.tls_mode == "off":
            # NOTLS: "MUST respond with NBD_REP_ERR_POLICY ... NBD_REP_ERR_UNSUP ... or another error".
            return self._error(opt, Rep.ERR_POLICY, "TLS is not enabled on this server")
        if self.tls_active:
            # "If the server receives NBD_OPT_STARTTLS when TLS has already been negotiated, it MUST
            # reply with NBD_REP_ERR_INVALID."
            return self._error(opt, Rep.ERR_INVALID, "TLS is already active")
        if opt.data:
            return self._error(opt, Rep.ERR_INVALID, "NBD_OPT_STARTTLS takes no data")
        return Outcome([ev.RepAck(option=Opt.STARTTLS)], starttls=True)

    def tls_started(self) -> None:
        """After STARTTLS: "the server MUST NOT preserve any negotiation state ... issued before"."""
        self.tls_active = True
        self.structured = False
        self.extended = False
        self.contexts = {}
        self.contexts_export = None

    def _structured_reply(self, opt: ev.OptStructuredReply) -> Outcome:  # type: ignore[override]
        if not self.persona.structured_replies:
            return self._error(opt, Rep.ERR_UNSUP, "structured replies not supported")
        if opt.data:
            return self._error(opt, Rep.ERR_INVALID, "NBD_OPT_STRUCTURED_REPLY takes no data")
        if self.extended:
            # ext-header draft: "NBD_REP_ERR_EXT_HEADER_REQD: The client has already successfully
            # negotiated extended headers, which takes precedence over this option."
            return self._error(opt, Rep.ERR_EXT_HEADER_REQD, "extended headers already negotiated")
        self.structured = True
        return Outcome([ev.RepAck(option=Opt.STRUCTURED_REPLY)])

    def _extended_headers(self, opt: ev.OptExtendedHeaders) -> Outcome:  # type: ignore[override]
        if not self.persona.extended_headers:
            return self._error(opt, Rep.ERR_UNSUP, "extended headers not supported")
        if opt.data:
            return self._error(opt, Rep.ERR_INVALID, "NBD_OPT_EXTENDED_HEADERS takes no data")
        self.extended = True
        return Outcome([ev.RepAck(option=Opt.EXTENDED_HEADERS)])

    def _meta_context(self, opt: ev.OptListMetaContext | ev.OptSetMetaContext) -> Outcome:  # type: ignore[override]
        listing = opt.option == Opt.LIST_META_CONTEXT
        if not self.persona.meta_contexts:
            return self._error(opt, Rep.ERR_UNSUP, "metadata contexts not supported")
        if not listing:
            # "Issuing this command replaces all previously-set metadata contexts (including when this
            # command fails)".
            self.contexts, self.contexts_export = {}, None
        if not (self.structured or self.extended):
            # LIST: "a server MAY send NBD_REP_ERR_INVALID"; SET: "a server SHOULD send ERR_INVALID".
            return self._error(opt, Rep.ERR_INVALID, "negotiate structured replies first")
        export = self.find(opt.name)
        if export is None:
            return self._error(opt, Rep.ERR_UNKNOWN, f"no export {_brief(repr(opt.name))}")
        for q in opt.queries:
            # Queries "MUST start with a namespace and a colon"; semantically invalid: "MAY fail".
            if ":" not in q:
                return self._error(opt, Rep.ERR_INVALID, f"query {q!r} has no namespace")
        if listing:
            # "If zero queries are sent, then the server MUST return all the metadata contexts".
            names = self.available_contexts(export) if not opt.queries else []
            for q in opt.queries:
                names.extend(n for n in self._match(export, q, listing=True) if n not in names)
            # "The metadata context ID in these replies is reserved and SHOULD be set to zero".
            replies: list[ev.Event] = [
                ev.RepMetaContext(option=Opt.LIST_META_CONTEXT, context_id=0, name=n) for n in names
            ]
            replies.append(ev.RepAck(option=Opt.LIST_META_CONTEXT))
            return Outcome(replies)
        # "If zero queries are sent, the server MUST select no metadata contexts."
        selected: list[str] = []
        for q in opt.queries:
            selected.extend(n for n in self._match(export, q, listing=False) if n not in selected)
        self.contexts = {i: n for i, n in enumerate(selected, start=1)}
        self.contexts_export = export.name
        replies = [
            ev.RepMetaContext(option=Opt.SET_META_CONTEXT, context_id=i, name=n) for i, n in self.contexts.items()
        ]
        replies.append(ev.RepAck(option=Opt.SET_META_CONTEXT))
        return Outcome(replies)

    def _finish_contexts(self, export: Export) -> None:
        self.contexts = self.contexts_for(export)

    def _info_go(self, opt: ev.OptInfo | ev.OptGo) -> Outcome:  # type: ignore[override]
        go = opt.option == Opt.GO
        if not self.persona.opt_go:
            # qemu < 2.10: clients "SHOULD be prepared to also handle NBD_REP_ERR_UNSUP by falling back".
            return self._error(opt, Rep.ERR_UNSUP, "NBD_OPT_INFO/NBD_OPT_GO not supported")
        export = self.find(opt.name)
        if export is None:
            # "NBD_REP_ERR_UNKNOWN: The chosen export does not exist on this server."
            return self._error(opt, Rep.ERR_UNKNOWN, f"no export {_brief(repr(opt.name))}")
        if self._tls_required_for(export):
            # SELECTIVETLS: "MUST reply with NBD_REP_ERR_TLS_REQD if that export is TLS-only".
            return self._error(opt, Rep.ERR_TLS_REQD, f"export {_brief(repr(opt.name))} needs TLS")
        p = self.persona
        size = 0 if (p.info_size_zero and not go) else export.size
        replies: list[ev.Event] = [
            ev.RepInfoExport(option=opt.option, export_size=size, transmission_flags=self.transmission_flags(export))
        ]
        requested = set(opt.info)
        if Info.NAME in requested and p.info_name:
            replies.append(ev.RepInfoName(option=opt.option, name=export.name))
        if Info.DESCRIPTION in requested and p.info_description and export.description:
            replies.append(ev.RepInfoDescription(option=opt.option, description=export.description))
        bs = self.block_size(export)
        size_info = None if bs is None else ev.RepInfoBlockSize(
            option=opt.option, minimum=bs[0], preferred=bs[1], maximum=bs[2])
        if go and export.block_size_required and Info.BLOCK_SIZE not in requested:
            # "A server that wants to enforce size constraints other than the defaults ... MAY refuse
            # to go into transmission phase with a client ... which uses NBD_OPT_GO without requesting
            # NBD_INFO_BLOCK_SIZE (via an error reply of NBD_REP_ERR_BLOCK_SIZE_REQD)"; it "SHOULD
            # ensure it first sends an NBD_INFO_BLOCK_SIZE information reply".
            refusal = ev.RepError(option=opt.option, reply_type=Rep.ERR_BLOCK_SIZE_REQD,
                                  message=f"export {export.name!r} needs NBD_INFO_BLOCK_SIZE")
            return Outcome([size_info, refusal] if size_info else [refusal])
        if size_info is not None and (Info.BLOCK_SIZE in requested or export.block_size is not None):
            # "A server with size constraints other than the default SHOULD advertise [them]" (sent even
            # unasked then: "The server MAY send information requests back which are not ... requested").
            replies.append(size_info)
        replies.append(ev.RepAck(option=opt.option))
        if not go:
            return Outcome(replies)
        self.block_size_requested = Info.BLOCK_SIZE in requested
        self._finish_contexts(export)
        return Outcome(replies, go=export)
