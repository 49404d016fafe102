"""Rules and effects of the transmission phase: requests, simple replies and reply chunks."""

from __future__ import annotations

from collections.abc import Callable

from . import _events as ev
from . import _outcome
from . import _wire as w
from ._checker import (
    _KNOWN_REPLY_TYPES,
    Checker,
    _Reply,
)
from ._constants import (
    COMMAND_NEEDS_TXFLAG,
    FLAG_NEEDS_TXFLAG,
    MAX_EXTENTS_PER_CHUNK,
    MAX_PAYLOAD_UNLIMITED,
    STRING_MAX,
    VALID_CMD_FLAGS,
    WRITE_COMMANDS,
    Cmd,
    CmdFlag,
    Err,
    TxFlag,
)
from ._constants import cmd_name as _cmd
from ._errors import LocalProtocolError
from ._state import CLIENT

# Requirement broken when a command is used although its transmission flag was not set.
COMMAND_FLAG_REQ: dict[int, str] = {
    Cmd.FLUSH: "FLUSH-003",
    Cmd.TRIM: "TRIM-006",
    Cmd.WRITE_ZEROES: "WZ-014",
}
CMDFLAG_FLAG_REQ: dict[int, str] = {CmdFlag.DF: "RD-003", CmdFlag.FAST_ZERO: "WZ-004"}
# "The client SHOULD NOT send a zero-length ..." per command.
ZERO_LENGTH_REQ: dict[int, str] = {
    Cmd.READ: "RD-008",
    Cmd.WRITE: "WR-003",
    Cmd.TRIM: "TRIM-003",
    Cmd.WRITE_ZEROES: "WZ-010",
    Cmd.BLOCK_STATUS: "BS-064",
}
# Commands whose offset/length describe a range of the export.
RANGE_COMMANDS = frozenset({Cmd.READ, Cmd.WRITE, Cmd.TRIM, Cmd.CACHE, Cmd.WRITE_ZEROES, Cmd.BLOCK_STATUS})

# The per-request path works on plain ints: every & or | on an IntFlag runs Python code and builds a
# new flag object (~0.8 µs), ``~`` of an IntFlag drops the bits the class does not define, and an
# enum class attribute costs more than a global. Enums stay at the API and in the transcript.
_READ, _WRITE, _DISC, _FLUSH = int(Cmd.READ), int(Cmd.WRITE), int(Cmd.DISC), int(Cmd.FLUSH)
_BLOCK_STATUS = int(Cmd.BLOCK_STATUS)
_FUA, _DF, _REQ_ONE, _PAYLOAD_LEN = int(CmdFlag.FUA), int(CmdFlag.DF), int(CmdFlag.REQ_ONE), int(CmdFlag.PAYLOAD_LEN)
_TX_BLOCK_STATUS_PAYLOAD = int(TxFlag.BLOCK_STATUS_PAYLOAD)
_ESHUTDOWN, _EOVERFLOW, _EINVAL = int(Err.ESHUTDOWN), int(Err.EOVERFLOW), int(Err.EINVAL)
_VALID_FLAGS: dict[int, int] = {int(c): int(f) for c, f in VALID_CMD_FLAGS.items()}
# command -> (transmission flag it needs, requirement id, message) (CMD-008 and friends)
_COMMAND_NEEDS: dict[int, tuple[int, str, str]] = {
    int(c): (int(t), COMMAND_FLAG_REQ.get(c, "CMD-008"), f"{c.name} without {t.name}")
    for c, t in COMMAND_NEEDS_TXFLAG.items()
}
# (command flag, transmission flag it needs, requirement id, message)
_FLAG_NEEDS: tuple[tuple[int, int, str, str], ...] = tuple(
    (int(f), int(t), CMDFLAG_FLAG_REQ.get(f, "CMD-008"), f"{f.name} without {t.name}")
    for f, t in FLAG_NEEDS_TXFLAG.items()
)
_FLAG_NEEDS_MASK = sum(int(f) for f in FLAG_NEEDS_TXFLAG)
_ZERO_LENGTH_REQ: dict[int, str] = {int(c): r for c, r in ZERO_LENGTH_REQ.items()}
_RANGE_COMMANDS = frozenset(int(c) for c in RANGE_COMMANDS)
_WRITE_COMMANDS = frozenset(int(c) for c in WRITE_COMMANDS)


# What a chunk (instead of a simple reply) shows held, by (structured replies or extended headers
# negotiated, extended headers negotiated): SR-004 (no chunks without structured replies) and EXT-005
# (no simple reply with extended headers).
_CHUNK_HELD: dict[bool, dict[bool, tuple[str, ...]]] = {
    False: {False: (), True: ("EXT-005",)},
    True: {False: ("SR-004",), True: ("SR-004", "EXT-005")},
}


class TransmissionRules(Checker):
    """Mixin: per-message checks and effects of requests and replies."""

    def _on_request(self, e: ev.Request) -> None:
        cmd, flags, tx = int(e.command), int(e.flags), self._tx
        inflight = self._inflight
        # Rules that held go into ``checked`` only for the peer's requests (``_record``).
        held = self._record
        if self._sender is self.peer:
            if self._after_peer_write:
                # This header parsed where the WRITE before it said its data ends: that WRITE carried
                # exactly its length (WR-002; a short or long payload shows as a broken next header).
                held("WR-002")
            self._after_peer_write = cmd == _WRITE
        if cmd == _DISC:
            # "NBD_CMD_DISC offset and length MUST be zero" (DISC-027)
            self._check(e.offset == 0 and e.length == 0, "DISC-027", "NBD_CMD_DISC with offset or length")
            if inflight:
                # "The client SHOULD wait until no requests are in flight before sending NBD_CMD_DISC"
                # (DISC-023)
                self._check(False, "DISC-023", f"NBD_CMD_DISC with {len(inflight)} requests in flight")
            else:
                held("DISC-023")
        elif self._shutdown_seen and self.role is CLIENT:
            # "A client that receives NBD_ESHUTDOWN MUST initiate a soft disconnect" (DISC-021). Only
            # the client knows when it received it: a server would flag requests pipelined before.
            self._check(False, "DISC-021", f"{_cmd(cmd)} after NBD_ESHUTDOWN instead of NBD_CMD_DISC")
        if e.cookie in inflight:
            # "a client SHOULD give each request a cookie distinct from every request in flight" (CMD-001)
            self._check(False, "CMD-001", f"cookie {e.cookie} is already in flight")
        else:
            held("CMD-001")
        need = _COMMAND_NEEDS.get(cmd)
        if need is not None:
            if not tx & need[0]:
                # "The client MUST NOT send NBD_CMD_FLUSH unless NBD_FLAG_SEND_FLUSH was set" etc. (CMD-008)
                self._check(False, need[1], need[2])
            else:
                held(need[1])
        if flags & _FLAG_NEEDS_MASK:
            for flag, txflag, req, message in _FLAG_NEEDS:
                if flags & flag:
                    if not tx & txflag:
                        self._check(False, req, message)
                    else:
                        held(req)
        valid = _VALID_FLAGS.get(cmd)
        if valid is not None:
            if flags & ~valid:
                # "Clients MUST NOT set a command flag ... not documented for that command" (CMD-014).
                # Plain ints: ``~`` of an IntFlag would drop undefined bits such as 0x8000.
                self._check(False, "CMD-014", f"flags {flags:#x} not valid for {Cmd(cmd).name}")
            else:
                held("CMD-014")
        if cmd == _FLUSH:
            if e.offset or e.length:
                self._check(False, "FLUSH-004", "NBD_CMD_FLUSH with offset or length")
            else:
                held("FLUSH-004")
        if flags & _FUA:
            if cmd not in _WRITE_COMMANDS:
                self._check(False, "FUA-003", f"FUA on {_cmd(cmd)}")
            else:
                held("FUA-003")
        payload = e.payload
        payload_len = w.nbytes(payload) if payload is not None else 0
        if self.extended_headers:
            # "NBD_CMD_WRITE MUST use the flag NBD_CMD_FLAG_PAYLOAD_LEN" (EXT-002)
            if cmd == _WRITE:
                if not flags & _PAYLOAD_LEN:
                    self._check(False, "EXT-002", "extended WRITE without PAYLOAD_LEN")
                else:
                    held("EXT-002")
            if cmd == _BLOCK_STATUS and flags & _PAYLOAD_LEN:
                if not tx & _TX_BLOCK_STATUS_PAYLOAD:
                    self._check(False, "EXT-013", "BLOCK_STATUS payload not advertised")
                else:
                    held("EXT-013")
            if cmd == _READ:
                if e.length >= 1 << 32:
                    self._check(False, "EXT-043", f"READ length {e.length} exceeds 32 bits")
                else:
                    held("EXT-043")
        elif flags & _PAYLOAD_LEN:
            # "With compact requests the client MUST NOT use NBD_CMD_FLAG_PAYLOAD_LEN" (EXT-001)
            self._check(False, "EXT-001", "PAYLOAD_LEN in a compact request")
        else:
            held("EXT-001")
        if cmd == _WRITE and payload_len != e.length and self._sender is self.role:
            # "The client MUST follow a WRITE header with exactly length bytes of data" (WR-002)
            self._check(False, "WR-002", f"WRITE length {e.length} with {payload_len} bytes")
        has_payload = bool(flags & _PAYLOAD_LEN) and self.extended_headers
        length: int | None = e.length
        form = None
        if cmd == _BLOCK_STATUS and has_payload:
            # Payload form: "the client sets NBD_CMD_FLAG_PAYLOAD_LEN in order to pass a payload that
            # informs the server to limit its replies to the metacontext id(s) in the client's request
            # payload"; the header's length is the payload's, the effect length is inside it.
            form = w.decode_block_status_payload(payload) if payload is not None else None
            # "The payload form MUST occupy 8 + n*4 bytes" (EXT-056)
            n = payload_len if payload is not None else e.length
            well_formed = form is not None if payload is not None else n >= 8 and (n - 8) % 4 == 0
            self._check(well_formed, "EXT-056", f"BLOCK_STATUS payload of {n} bytes")
            length = form[0] if form is not None else None  # malformed: no effect length to judge by
        if cmd in _ZERO_LENGTH_REQ and (form is not None or not has_payload):
            if length == 0:
                self._check(False, _ZERO_LENGTH_REQ[cmd], f"zero-length {Cmd(cmd).name}")
            else:
                held(_ZERO_LENGTH_REQ[cmd])
        if cmd in _RANGE_COMMANDS and length is not None:
            self._range_checks(e.offset, length, cmd, held)
        if cmd == _BLOCK_STATUS:
            # "The client MUST NOT send NBD_CMD_BLOCK_STATUS unless it selected at least one context"
            # (BS-003)
            self._check(self.meta_contexts, "BS-003", "NBD_CMD_BLOCK_STATUS without a negotiated context")
        if cmd != _DISC:
            view = None
            if e.read_buffer is not None and cmd == _READ:
                view = memoryview(e.read_buffer).cast("B")
                if len(view) < e.length:
                    raise LocalProtocolError(f"read_buffer of {len(view)} bytes for a {e.length}-byte READ")
            reply = inflight[e.cookie] = _Reply(e, view)
            if cmd == _BLOCK_STATUS and has_payload:
                reply.effect = length
                # A malformed payload, or one naming no id, selects nothing the draft defines: no
                # particular chunk can be demanded then.
                reply.wanted = form[1] if form is not None else ()

    def _range_checks(self, offset: int, length: int, cmd: int, held: Callable[[str], None]) -> None:
        """Rules on the range a request is about (``length``: the effect length)."""
        if self.export_size is not None:
            if offset + length > self.export_size:
                # "The client MUST NOT send a request whose offset plus length exceeds the export size"
                # (BSZ-033)
                self._check(False, "BSZ-033",
                            f"offset {offset} + length {length} beyond export size {self.export_size}")
            else:
                held("BSZ-033")
        if self.block_size is not None and self._block_size_requested:
            mn, _, mx = self.block_size
            if offset % mn or length % mn:
                # "the client MUST use multiples of any advertised minimum block size" (BSZ-031)
                self._check(
                    False,
                    "BSZ-031",
                    f"offset {offset} / length {length} not multiples of minimum block size {mn}",
                )
            else:
                held("BSZ-031")
            simple_read = cmd == _READ and not (self.structured_replies or self.extended_headers)
            if (cmd == _WRITE or simple_read) and mx != MAX_PAYLOAD_UNLIMITED:
                if length > mx:
                    # "A client MUST NOT request a WRITE, or a READ with simple replies, longer than
                    # the maximum payload size" (BSZ-025)
                    self._check(False, "BSZ-025", f"length {length} exceeds maximum payload {mx}")
                else:
                    held("BSZ-025")

    def _reply_for(self, cookie: int, chunk: bool = False) -> _Reply | None:
        reply = self._inflight.get(cookie)
        if reply is not None:
            if self._sender is self.peer:
                self.checked.add("CMD-003")
                if chunk:
                    self.checked.add("SR-011")
            return reply
        if chunk and cookie in self._completed:
            # "The chunk with NBD_REPLY_FLAG_DONE MUST be the last chunk sent for that cookie" (SR-011)
            self._check(False, "SR-011", f"chunk for cookie {cookie} after its final chunk", fatal=True)
            return None
        # "Every reply MUST carry the request's cookie unchanged" (CMD-003): an unknown cookie is a
        # reply to nothing we sent, or to a request that already completed.
        self._check(False, "CMD-003", f"reply for cookie {cookie}, which is not in flight", fatal=True)
        return None

    def _on_simple_reply(self, e: ev.SimpleReply) -> None:
        reply = self._reply_for(e.cookie)
        if self.extended_headers:
            # "If extended headers have been negotiated, a simple reply MUST NOT be used" (EXT-005)
            self._check(False, "EXT-005", "simple reply after extended headers")
        if reply is None:
            return
        cmd, error = reply.command, int(e.error)
        if cmd == _READ and self.structured_replies:
            # "MUST NOT use a simple reply for NBD_CMD_READ (even for an early NBD_EINVAL)" (SR-006)
            self._check(False, "SR-006", "simple reply to NBD_CMD_READ with structured replies")
        elif cmd == _READ and not self.extended_headers:
            # Without structured replies "the server MUST use a simple reply" (SR-002): it did.
            self._record("SR-002")
        if cmd == _BLOCK_STATUS and error == 0:
            self._check(False, "BS-005", "successful simple reply to NBD_CMD_BLOCK_STATUS")
        if self._sender is self.role:
            if cmd == _READ and error == 0 and not e.in_place:
                n = w.nbytes(e.data) if e.data is not None else 0
                if n != reply.request.length:
                    # "a READ must get a simple reply carrying exactly length bytes on success" (RD-010)
                    self._check(False, "RD-010", f"{n} bytes for a {reply.request.length}-byte READ")
            if error != 0 and e.data:
                self._check(False, "RD-013", "payload after an error in a simple reply")
        reply.error = error
        self._complete(reply)
        if error == _ESHUTDOWN:
            self._shutdown_seen = True

    def _negotiated(self) -> _outcome.Negotiated:
        """The negotiated state the outcome rules need (rebuilt only when it changed)."""
        structured = self.structured_replies or self.extended_headers
        # The dict itself, not a copy of its ids: the core replaces meta_contexts, never mutates it, and
        # tuple comparison checks identity first (this runs for every completed request).
        key = (self.export_size, self._tx, self.block_size, self.meta_contexts, structured)
        if key != self._negotiated_key:
            bs = self.block_size
            self._negotiated_key = key
            self._negotiated_cache = _outcome.Negotiated(
                export_size=self.export_size,
                transmission_flags=self._tx,
                min_block=bs[0] if bs else None,
                max_payload=bs[2] if bs else None,
                contexts=len(self.meta_contexts),
                context_ids=frozenset(self.meta_contexts),
                structured=structured,
            )
        return self._negotiated_cache

    def refusals(self, request: ev.Request) -> list[tuple[str, int | None]]:
        """Why a correct server fails ``request`` now: ``[(req_id, NBD error or None = any error)]``.

        The reference server can answer with the first error; the client side judges replies with the
        same table when they complete. A BLOCK_STATUS in payload form is judged by the effect length
        and context ids inside its payload.
        """
        cmd, flags, length, ids = int(request.command), int(request.flags), request.length, None
        if cmd == _BLOCK_STATUS and flags & _PAYLOAD_LEN and self.extended_headers:
            form = w.decode_block_status_payload(request.payload) if request.payload is not None else None
            length, ids = form if form is not None else (0, ())  # malformed: EXT-056, the client's
        return _outcome.refusals(cmd, flags, request.offset, length, self._negotiated(), payload_ids=ids)

    def _complete(self, reply: _Reply) -> None:
        req = reply.request
        cookie = req.cookie
        del self._inflight[cookie]
        self._completed.append(cookie)
        considered = self.checked if self._sender is self.peer else None
        for req_id, why in _outcome.judge(
            reply.command,
            reply.flags,
            req.offset,
            reply.effect or 0,
            reply.error,
            self._negotiated(),
            payload_ids=reply.wanted,
            considered=considered,
        ):
            self._check(False, req_id, why)
        if self._sender is not self.role:  # ReplyComplete is for the side that receives replies
            self._queue.append(ev.ReplyComplete(cookie=cookie, command=req.command, error=reply.error))

    def _on_chunk(self, e: ev.Chunk) -> None:
        if not (self.structured_replies or self.extended_headers):
            # "The server MUST NOT send structured reply chunks unless the client negotiated
            # NBD_OPT_STRUCTURED_REPLY" (SR-004)
            self._check(False, "SR-004", "chunk without structured replies")
        reply = self._reply_for(e.cookie, chunk=True)
        if reply is None:
            return
        if self._sender is self.peer:
            # Answered in chunks: what a simple reply would have broken held (SR-004 counts only when
            # structured replies were negotiated; EXT-005 when extended headers were).
            held = _CHUNK_HELD[bool(self.structured_replies or self.extended_headers)][bool(self.extended_headers)]
            self.checked.update(held)
            if reply.command == _READ and (self.structured_replies or self.extended_headers):
                self.checked.add("SR-006")      # extended headers imply structured replies
            elif reply.command == _BLOCK_STATUS:
                self.checked.add("BS-005")
        reply.chunks += 1
        kind = type(e)
        if kind is ev.OffsetData or kind is ev.OffsetHole:
            self._content_chunk(e, reply)  # type: ignore[arg-type]
        elif isinstance(e, ev.OffsetData | ev.OffsetHole):
            self._content_chunk(e, reply)
        elif isinstance(e, ev.NoneChunk):
            # "NBD_REPLY_TYPE_NONE ... MUST always carry NBD_REPLY_FLAG_DONE" (SR-030)
            self._check(e.done, "SR-030", "NBD_REPLY_TYPE_NONE without NBD_REPLY_FLAG_DONE")
        elif isinstance(e, ev.BlockStatus):
            self._status_chunk(e, reply)
        elif isinstance(e, ev.ErrorChunk):
            self._error_chunk(e, reply)
        else:
            self._other_chunk(e, reply)
        if e.done:
            self._on_done(reply)

    def _other_chunk(self, e: ev.Chunk, reply: _Reply) -> None:
        """A chunk of an unknown type, or of a known type whose payload could not be decoded."""
        rtype = int(w.chunk_type(e, False))
        if isinstance(e, ev.UnknownChunk) and rtype in _KNOWN_REPLY_TYPES:
            if self._sender is self.role:
                # Hand-made payload of a known type: hold it to the layout rules of that type.
                try:
                    w.decode_chunk(e.cookie, int(e.done), rtype, e.data)
                except w.WireError as exc:
                    self._check(False, exc.req_id or "SR-053", str(exc))
            reply.error = reply.error or (_EINVAL if w.is_error_type(rtype) else 0)
        elif not w.is_error_type(rtype):
            # "On an unknown or unexpected chunk type that is not an error chunk the client must
            # hard-disconnect" (SR-027)
            self._check(False, "SR-027", f"unknown chunk type {rtype:#x}", fatal=True)
        else:
            # Unknown error chunk: the reply failed (SR-051). "All error chunk types ... begin with the
            # same *error*, *message length*, and optional *message* fields as NBD_REPLY_TYPE_ERROR".
            data = e.data if isinstance(e, ev.UnknownChunk) else b""
            error = int.from_bytes(bytes(data[:4]), "big") if len(data) >= 4 else 0
            reply.error = reply.error or error or 0x7FFFFFFF

    def _extended_bs(self, e: ev.Chunk) -> bool:
        if isinstance(e, ev.BlockStatus):
            return self.extended_headers if e.extended is None else e.extended
        return False

    def _content_chunk(self, e: ev.OffsetData | ev.OffsetHole, reply: _Reply) -> None:
        req = reply.request
        hole = type(e) is ev.OffsetHole
        if reply.command != _READ:
            self._check(False, "SR-027", f"{type(e).__name__} in reply to {_cmd(reply.command)}", fatal=True)
            return
        n = e.length if hole or e.data is None else w.nbytes(e.data)  # type: ignore[union-attr]
        start, end = e.offset, e.offset + n
        if n <= 0:
            if hole:
                # "The hole size MUST be nonzero" (SR-039)
                self._check(False, "SR-039", "NBD_REPLY_TYPE_OFFSET_HOLE with size 0")
            else:
                # "length MUST be at least 9" i.e. at least one byte of data (SR-031)
                self._check(False, "SR-031", "NBD_REPLY_TYPE_OFFSET_DATA with no data")
        else:
            self._record("SR-039" if hole else "SR-031")
        # "The data MUST lie within the bounds of the requested range" (SR-032 / SR-036)
        if (hole or self._sender is self.role) and not (req.offset <= start and end <= req.offset + req.length):
            # (received OFFSET_DATA was checked before its data arrived)
            self._check(False, "SR-036" if hole else "SR-032", f"{start}+{n} outside request {req.offset}+{req.length}")
        elif hole:
            self._record("SR-036")
        if reply.error_offsets and n > 0:
            # "If a content chunk and an error chunk cover the same offset, the content chunk MUST be
            # sent first" (RD-040)
            late = [o for o in reply.error_offsets if start <= o < end]
            self._check(not late, "RD-040", f"content chunk {start}+{n} after an error at offset {late[:1]}")
        if n > 0:
            # "MUST NOT overlap with any earlier content or error chunk" (SR-033 / SR-037)
            if reply.overlaps(start, end):
                if hole or self._sender is self.role:  # (received OFFSET_DATA: checked before its data)
                    self._check(False, "SR-037" if hole else "SR-033", f"{start}+{n} overlaps an earlier chunk")
            else:
                if hole:
                    self._record("SR-037")
                reply.cover(start, end)
        reply.content_chunks += 1
        if reply.flags & _DF:
            if reply.content_chunks > 1:
                # "With DF the server MUST send at most one content chunk" (RD-045)
                self._check(False, "RD-045", "more than one content chunk with DF")
            else:
                self._record("RD-045")

    def _status_chunk(self, e: ev.BlockStatus, reply: _Reply) -> None:
        if reply.command != _BLOCK_STATUS:
            self._check(False, "SR-027", f"block status chunk in reply to {_cmd(reply.command)}", fatal=True)
            return
        extended = self._extended_bs(e)
        if extended:
            # "BLOCK_STATUS_EXT MUST NOT be used unless extended headers were negotiated" (EXT-045)
            self._check(self.extended_headers, "EXT-045", "BLOCK_STATUS_EXT without extended headers")
        else:
            # "With extended headers BLOCK_STATUS_EXT MUST be used" (EXT-049)
            self._check(not self.extended_headers, "EXT-049", "compact BLOCK_STATUS with extended headers")
        # "one NBD_REPLY_TYPE_BLOCK_STATUS chunk per selected context" (BS-002)
        self._check(e.context_id in self.meta_contexts, "BS-002", f"context id {e.context_id} not negotiated")
        if reply.wanted and e.context_id not in reply.wanted:
            # Payload form: the payload "informs the server to limit its replies to the metacontext id(s)
            # in the client's request payload"; "the server MUST use one reply chunk per selected
            # context id" (BS-002 / EXT-053): the payload did not select this one.
            self._check(False, "BS-002", f"context id {e.context_id} not asked in the payload {sorted(reply.wanted)}")
        self._check(e.context_id not in reply.contexts, "BS-002", f"second chunk for context {e.context_id}")
        reply.contexts.add(e.context_id)
        ext = e.extents
        # "length MUST be 4 + (a positive integer multiple of 8)": at least one descriptor (BS-055, BS-074)
        self._check(ext, "BS-055", "block status chunk without descriptors")
        self._check(len(ext) <= MAX_EXTENTS_PER_CHUNK, "BS-062", f"{len(ext)} extents in one chunk")
        if any(n == 0 for n, _ in ext):
            # "Each extent length MUST be nonzero" (BS-057 / EXT-048)
            self._check(False, "EXT-048" if extended else "BS-057", "extent of length 0")
        else:
            self._record("EXT-048" if extended else "BS-057")
        length = reply.effect  # the payload form's effect length, not the header's payload length
        if length is None:  # malformed payload form (EXT-056): no length to measure the extents by
            pass
        elif reply.flags & _REQ_ONE:
            # "With REQ_ONE ... exactly one descriptor ... not longer than the request" (BS-058/059)
            self._check(len(ext) == 1, "BS-058", f"{len(ext)} extents with REQ_ONE")
            self._check(not ext or ext[0][0] <= length, "BS-059", "REQ_ONE extent longer than the request")
        elif len(ext) > 1:
            # "the lengths of all but the last extent MUST sum to less than the requested length" (BS-060)
            head = sum(n for n, _ in ext[:-1])
            self._check(head < length, "BS-060", f"extents sum to {head} before the last, request {length}")
        name = self.meta_contexts.get(e.context_id, "")
        if name.startswith("base:"):
            if extended:
                # "For 32-bit contexts the upper 32 status bits MUST be zero" (EXT-050)
                self._check(all(f >> 32 == 0 for _, f in ext), "EXT-050", "status bits above 32 set")
            self._check(all(f & ~0x3 == 0 for _, f in ext), "BS-023", "reserved base:allocation bits set")

    def _error_chunk(self, e: ev.ErrorChunk, reply: _Reply) -> None:
        req = reply.request
        # "The error value MUST be nonzero" (SR-044 / SR-050)
        self._check(e.error != 0, "SR-044" if e.offset is None else "SR-050", "error chunk with error 0")
        # "The message length MUST NOT exceed 4096 bytes" (SR-043)
        self._check(len(w.enc_str(e.message)) <= STRING_MAX, "SR-043", "error message over 4096 bytes")
        self._string(e.message, "error message")
        effect = reply.effect  # the payload form's effect length, not the header's payload length
        if e.offset is not None and reply.command in _RANGE_COMMANDS and effect is not None:
            # "The offset MUST lie within the request's offset and length" (SR-046)
            inside = req.offset <= e.offset < req.offset + max(effect, 1)
            self._check(inside, "SR-046", f"error offset {e.offset} outside request {req.offset}+{effect}")
        if e.offset is None:
            reply.plain_errors += 1
            # "NBD_REPLY_TYPE_ERROR should not appear more than once in a reply" (SR-042)
            self._check(reply.plain_errors == 1, "SR-042", "second NBD_REPLY_TYPE_ERROR in one reply")
        else:
            # "The same error offset should not be reported twice" (SR-048)
            self._check(e.offset not in reply.error_offsets, "SR-048", f"error offset {e.offset} reported twice")
            reply.error_offsets.append(e.offset)
        reply.error = reply.error or int(e.error) or _EINVAL  # error 0 still marks the reply failed
        if e.error == _ESHUTDOWN:
            self._shutdown_seen = True

    def _on_done(self, reply: _Reply) -> None:
        req = reply.request
        if reply.error == 0 and reply.command == _READ:
            if reply.covered_bytes != req.length:
                # "Absent errors, the content chunks MUST cover the whole requested range" (RD-027)
                self._check(False, "RD-027", f"reply covers {reply.covered_bytes} of {req.length} bytes")
            else:
                self._record("RD-027")
        if reply.flags & _DF and reply.error == _EOVERFLOW:
            # "in which case it MUST NOT send any content chunk" (RD-049)
            self._check(reply.content_chunks == 0, "RD-049", "content chunk in a DF reply failed with EOVERFLOW")
        if reply.error == 0 and reply.command == _BLOCK_STATUS:
            # "A successful reply has exactly one status chunk per negotiated context ID" (BS-056); in
            # the payload form the ext-header draft narrows that to the ids the payload names: it
            # "informs the server to limit its replies to the metacontext id(s) in the client's request
            # payload".
            wanted = reply.wanted
            missing = set(self.meta_contexts if wanted is None else wanted) - reply.contexts
            self._check(not missing, "BS-056", f"no status chunk for contexts {sorted(missing)}")
        self._complete(reply)
