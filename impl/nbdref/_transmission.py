"""Rules and effects of the transmission phase: requests, simple replies and reply chunks."""

from __future__ import annotations

from . import _events as ev
from . import _outcome
from . import _wire as w
from ._checker import (
    _KNOWN_REPLY_TYPES,
    Checker,
    _cmd,
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
from ._errors import LocalProtocolError

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


class TransmissionRules(Checker):
    """Mixin: per-message checks and effects of requests and replies."""

    def _on_request(self, e: ev.Request) -> None:
        cmd, flags, tx = e.command, e.flags, self.transmission_flags or 0
        if cmd == Cmd.DISC:
            # "NBD_CMD_DISC offset and length MUST be zero" (DISC-027)
            self._check(e.offset == 0 and e.length == 0, "DISC-027", "NBD_CMD_DISC with offset or length")
            # "The client SHOULD wait until no requests are in flight before sending NBD_CMD_DISC" (DISC-023)
            self._check(not self._inflight, "DISC-023", f"NBD_CMD_DISC with {len(self._inflight)} requests in flight")
        elif self._shutdown_seen:
            # "A client that receives NBD_ESHUTDOWN MUST initiate a soft disconnect" (DISC-021)
            self._check(False, "DISC-021", f"{_cmd(cmd)} after NBD_ESHUTDOWN instead of NBD_CMD_DISC")
        # "a client SHOULD give each request a cookie distinct from every request in flight" (CMD-001)
        self._check(e.cookie not in self._inflight, "CMD-001", f"cookie {e.cookie} is already in flight")
        need = COMMAND_NEEDS_TXFLAG.get(cmd)  # type: ignore[call-overload]
        if need is not None:
            # "The client MUST NOT send NBD_CMD_FLUSH unless NBD_FLAG_SEND_FLUSH was set" etc. (CMD-008)
            req = COMMAND_FLAG_REQ.get(cmd, "CMD-008")
            self._check(tx & need, req, f"{Cmd(cmd).name} without {need.name}")
        for flag, txflag in FLAG_NEEDS_TXFLAG.items():
            if flags & flag:
                req = CMDFLAG_FLAG_REQ.get(flag, "CMD-008")
                self._check(tx & txflag, req, f"{flag.name} without {txflag.name}")
        valid = VALID_CMD_FLAGS.get(cmd)  # type: ignore[call-overload]
        if valid is not None:
            # "Clients MUST NOT set a command flag ... not documented for that command" (CMD-014)
            self._check(not flags & ~int(valid), "CMD-014", f"flags {flags:#x} not valid for {Cmd(cmd).name}")
        if cmd == Cmd.FLUSH:
            self._check(e.offset == 0 and e.length == 0, "FLUSH-004", "NBD_CMD_FLUSH with offset or length")
        if flags & CmdFlag.FUA and cmd not in WRITE_COMMANDS:
            self._check(False, "FUA-003", f"FUA on {_cmd(cmd)}")
        payload_len = len(e.payload) if e.payload is not None else 0
        if self.extended_headers:
            # "NBD_CMD_WRITE MUST use the flag NBD_CMD_FLAG_PAYLOAD_LEN" (EXT-002)
            if cmd == Cmd.WRITE:
                self._check(flags & CmdFlag.PAYLOAD_LEN, "EXT-002", "extended WRITE without PAYLOAD_LEN")
            if cmd == Cmd.BLOCK_STATUS and flags & CmdFlag.PAYLOAD_LEN:
                self._check(tx & TxFlag.BLOCK_STATUS_PAYLOAD, "EXT-013", "BLOCK_STATUS payload not advertised")
            self._check(
                cmd != Cmd.READ or e.length < 1 << 32, "EXT-043", f"READ length {e.length} exceeds 32 bits"
            )
        else:
            # "With compact requests the client MUST NOT use NBD_CMD_FLAG_PAYLOAD_LEN" (EXT-001)
            self._check(not flags & CmdFlag.PAYLOAD_LEN, "EXT-001", "PAYLOAD_LEN in a compact request")
        if self._sender is self.role and cmd == Cmd.WRITE:
            # "The client MUST follow a WRITE header with exactly length bytes of data" (WR-002)
            self._check(payload_len == e.length, "WR-002", f"WRITE length {e.length} with {payload_len} bytes")
        has_payload = bool(flags & CmdFlag.PAYLOAD_LEN) and self.extended_headers
        if cmd in ZERO_LENGTH_REQ and not has_payload:
            self._check(e.length > 0, ZERO_LENGTH_REQ[cmd], f"zero-length {Cmd(cmd).name}")
        if cmd in RANGE_COMMANDS and not (has_payload and cmd == Cmd.BLOCK_STATUS):
            self._range_checks(e)
        if cmd == Cmd.BLOCK_STATUS and has_payload:
            # "The BLOCK_STATUS payload MUST be 8 + 4n bytes: effect length then context ids" (EXT-056)
            n = len(e.payload) if e.payload is not None else e.length
            self._check(n >= 8 and (n - 8) % 4 == 0, "EXT-056", f"BLOCK_STATUS payload of {n} bytes")
        if cmd == Cmd.BLOCK_STATUS:
            # "The client MUST NOT send NBD_CMD_BLOCK_STATUS unless it selected at least one context"
            # (BS-003)
            self._check(self.meta_contexts, "BS-003", "NBD_CMD_BLOCK_STATUS without a negotiated context")
        if cmd != Cmd.DISC:
            view = None
            if e.read_buffer is not None and cmd == Cmd.READ:
                view = memoryview(e.read_buffer).cast("B")
                if len(view) < e.length:
                    raise LocalProtocolError(f"read_buffer of {len(view)} bytes for a {e.length}-byte READ")
            self._inflight[e.cookie] = _Reply(request=e, view=view)

    def _range_checks(self, e: ev.Request) -> None:
        if self.export_size is not None:
            # "The client MUST NOT send a request whose offset plus length exceeds the export size"
            # (BSZ-033)
            self._check(
                e.offset + e.length <= self.export_size,
                "BSZ-033",
                f"offset {e.offset} + length {e.length} beyond export size {self.export_size}",
            )
        if self.block_size is not None and self._block_size_requested:
            mn, _, mx = self.block_size
            # "the client MUST use multiples of any advertised minimum block size" (BSZ-031)
            self._check(
                e.offset % mn == 0 and e.length % mn == 0,
                "BSZ-031",
                f"offset {e.offset} / length {e.length} not multiples of minimum block size {mn}",
            )
            simple_read = e.command == Cmd.READ and not (self.structured_replies or self.extended_headers)
            if (e.command == Cmd.WRITE or simple_read) and mx != MAX_PAYLOAD_UNLIMITED:
                # "A client MUST NOT request a WRITE, or a READ with simple replies, longer than the
                # maximum payload size" (BSZ-025)
                self._check(e.length <= mx, "BSZ-025", f"length {e.length} exceeds maximum payload {mx}")

    def _reply_for(self, cookie: int, chunk: bool = False) -> _Reply | None:
        reply = self._inflight.get(cookie)
        if reply is None and chunk and cookie in self._completed:
            # "The chunk with NBD_REPLY_FLAG_DONE MUST be the last chunk sent for that cookie" (SR-011)
            self._check(False, "SR-011", f"chunk for cookie {cookie} after its final chunk", fatal=True)
            return None
        # "Every reply MUST carry the request's cookie unchanged" (CMD-003): an unknown cookie is a
        # reply to nothing we sent, or to a request that already completed.
        self._check(reply is not None, "CMD-003", f"reply for cookie {cookie}, which is not in flight", fatal=True)
        return reply

    def _on_simple_reply(self, e: ev.SimpleReply) -> None:
        reply = self._reply_for(e.cookie)
        # "If extended headers have been negotiated, a simple reply MUST NOT be used" (EXT-005)
        self._check(not self.extended_headers, "EXT-005", "simple reply after extended headers")
        if reply is None:
            return
        cmd = reply.request.command
        if cmd == Cmd.READ and self.structured_replies:
            # "MUST NOT use a simple reply for NBD_CMD_READ (even for an early NBD_EINVAL)" (SR-006)
            self._check(False, "SR-006", "simple reply to NBD_CMD_READ with structured replies")
        if cmd == Cmd.BLOCK_STATUS and e.error == 0:
            self._check(False, "BS-005", "successful simple reply to NBD_CMD_BLOCK_STATUS")
        if self._sender is self.role and cmd == Cmd.READ and e.error == 0 and not e.in_place:
            n = len(e.data) if e.data is not None else 0
            # "a READ must get a simple reply carrying exactly length bytes on success" (RD-010)
            self._check(n == reply.request.length, "RD-010", f"{n} bytes for a {reply.request.length}-byte READ")
        if self._sender is self.role and e.error != 0:
            self._check(not e.data, "RD-013", "payload after an error in a simple reply")
        reply.error = e.error
        self._complete(reply)
        if e.error == Err.ESHUTDOWN:
            self._shutdown_seen = True

    def _negotiated(self) -> _outcome.Negotiated:
        bs = self.block_size
        return _outcome.Negotiated(
            export_size=self.export_size,
            transmission_flags=self.transmission_flags or 0,
            min_block=bs[0] if bs else None,
            max_payload=bs[2] if bs else None,
            contexts=len(self.meta_contexts),
        )

    def refusals(self, request: ev.Request) -> list[tuple[str, int | None]]:
        """Why a correct server fails ``request`` now: ``[(req_id, NBD error or None = any error)]``.

        The reference server can answer with the first error; the client side judges replies with the
        same table when they complete.
        """
        return _outcome.refusals(request.command, request.flags, request.offset, request.length, self._negotiated())

    def _complete(self, reply: _Reply) -> None:
        del self._inflight[reply.request.cookie]
        self._completed.append(reply.request.cookie)
        req = reply.request
        st = self._negotiated()
        for req_id, why in _outcome.judge(req.command, req.flags, req.offset, req.length, reply.error, st):
            self._check(False, req_id, why)
        if self._sender is self.role:
            return  # ReplyComplete is for the side that receives replies
        self._queue.append(
            ev.ReplyComplete(cookie=reply.request.cookie, command=reply.request.command, error=reply.error)
        )

    def _on_chunk(self, e: ev.Chunk) -> None:
        # "The server MUST NOT send structured reply chunks unless the client negotiated
        # NBD_OPT_STRUCTURED_REPLY" (SR-004)
        self._check(
            self.structured_replies or self.extended_headers, "SR-004", "chunk without structured replies"
        )
        reply = self._reply_for(e.cookie, chunk=True)
        if reply is None:
            return
        reply.chunks += 1
        rtype = w.chunk_type(e, self._extended_bs(e))
        if isinstance(e, ev.NoneChunk):
            # "NBD_REPLY_TYPE_NONE ... MUST always carry NBD_REPLY_FLAG_DONE" (SR-030)
            self._check(e.done, "SR-030", "NBD_REPLY_TYPE_NONE without NBD_REPLY_FLAG_DONE")
        elif isinstance(e, ev.OffsetData | ev.OffsetHole):
            self._content_chunk(e, reply)
        elif isinstance(e, ev.BlockStatus):
            self._status_chunk(e, reply)
        elif isinstance(e, ev.ErrorChunk):
            self._error_chunk(e, reply)
        elif isinstance(e, ev.UnknownChunk) and rtype in _KNOWN_REPLY_TYPES:
            if self._sender is self.role:
                # Hand-made payload of a known type: hold it to the layout rules of that type.
                try:
                    w.decode_chunk(e.cookie, int(e.done), rtype, e.data)
                except w.WireError as exc:
                    self._check(False, exc.req_id or "SR-053", str(exc))
            reply.error = reply.error or (Err.EINVAL if w.is_error_type(rtype) else 0)
        elif not w.is_error_type(rtype):
            # "On an unknown or unexpected chunk type that is not an error chunk the client must
            # hard-disconnect" (SR-027)
            self._check(False, "SR-027", f"unknown chunk type {rtype:#x}", fatal=True)
        else:
            reply.error = reply.error or 0x7FFFFFFF  # unknown error chunk: the reply failed (SR-051)
        if e.done:
            self._on_done(reply)

    def _extended_bs(self, e: ev.Chunk) -> bool:
        if isinstance(e, ev.BlockStatus):
            return self.extended_headers if e.extended is None else e.extended
        return False

    def _content_chunk(self, e: ev.OffsetData | ev.OffsetHole, reply: _Reply) -> None:
        req = reply.request
        hole = isinstance(e, ev.OffsetHole)
        if req.command != Cmd.READ:
            self._check(False, "SR-027", f"{type(e).__name__} in reply to {_cmd(req.command)}", fatal=True)
            return
        n = e.length if hole or e.data is None else len(e.data)  # type: ignore[union-attr]
        start, end = e.offset, e.offset + n
        if hole:
            # "The hole size MUST be nonzero" (SR-039)
            self._check(n > 0, "SR-039", "NBD_REPLY_TYPE_OFFSET_HOLE with size 0")
        else:
            # "length MUST be at least 9" i.e. at least one byte of data (SR-031)
            self._check(n > 0, "SR-031", "NBD_REPLY_TYPE_OFFSET_DATA with no data")
        # "The data MUST lie within the bounds of the requested range" (SR-032 / SR-036)
        inside = req.offset <= start and end <= req.offset + req.length
        if hole or self._sender is self.role:  # received OFFSET_DATA was checked before its data arrived
            self._check(inside, "SR-036" if hole else "SR-032", f"{start}+{n} outside request {req.offset}+{req.length}")
        # "MUST NOT overlap with any earlier content or error chunk" (SR-033 / SR-037)
        if reply.error_offsets and n > 0:
            # "If a content chunk and an error chunk cover the same offset, the content chunk MUST be
            # sent first" (RD-040)
            late = [o for o in reply.error_offsets if start <= o < end]
            self._check(not late, "RD-040", f"content chunk {start}+{n} after an error at offset {late[:1]}")
        if n > 0:
            overlap = reply.overlaps(start, end)
            self._check(not overlap, "SR-037" if hole else "SR-033", f"{start}+{n} overlaps an earlier chunk")
            if not overlap:
                reply.cover(start, end)
        reply.content_chunks += 1
        if req.flags & CmdFlag.DF:
            # "With DF the server MUST send at most one content chunk" (RD-045)
            self._check(reply.content_chunks <= 1, "RD-045", "more than one content chunk with DF")

    def _status_chunk(self, e: ev.BlockStatus, reply: _Reply) -> None:
        req = reply.request
        if req.command != Cmd.BLOCK_STATUS:
            self._check(False, "SR-027", f"block status chunk in reply to {_cmd(req.command)}", fatal=True)
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
        self._check(e.context_id not in reply.contexts, "BS-002", f"second chunk for context {e.context_id}")
        reply.contexts.add(e.context_id)
        ext = e.extents
        # "length MUST be 4 + (a positive integer multiple of 8)": at least one descriptor (BS-055, BS-074)
        self._check(ext, "BS-055", "block status chunk without descriptors")
        self._check(len(ext) <= MAX_EXTENTS_PER_CHUNK, "BS-062", f"{len(ext)} extents in one chunk")
        if any(n == 0 for n, _ in ext):
            # "Each extent length MUST be nonzero" (BS-057 / EXT-048)
            self._check(False, "EXT-048" if extended else "BS-057", "extent of length 0")
        length = req.length
        if req.flags & CmdFlag.REQ_ONE:
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
        if e.offset is not None and req.command in RANGE_COMMANDS:
            # "The offset MUST lie within the request's offset and length" (SR-046)
            inside = req.offset <= e.offset < req.offset + max(req.length, 1)
            self._check(inside, "SR-046", f"error offset {e.offset} outside request {req.offset}+{req.length}")
        if e.offset is None:
            reply.plain_errors += 1
            # "NBD_REPLY_TYPE_ERROR should not appear more than once in a reply" (SR-042)
            self._check(reply.plain_errors == 1, "SR-042", "second NBD_REPLY_TYPE_ERROR in one reply")
        else:
            # "The same error offset should not be reported twice" (SR-048)
            self._check(e.offset not in reply.error_offsets, "SR-048", f"error offset {e.offset} reported twice")
            reply.error_offsets.append(e.offset)
        reply.error = reply.error or e.error or Err.EINVAL  # error 0 still marks the reply failed
        if e.error == Err.ESHUTDOWN:
            self._shutdown_seen = True

    def _on_done(self, reply: _Reply) -> None:
        req = reply.request
        if reply.error == 0 and req.command == Cmd.READ:
            # "Absent errors, the content chunks MUST cover the whole requested range" (RD-027)
            self._check(
                reply.covered_bytes == req.length,
                "RD-027",
                f"reply covers {reply.covered_bytes} of {req.length} bytes",
            )
        if req.flags & CmdFlag.DF and reply.error == Err.EOVERFLOW:
            # "in which case it MUST NOT send any content chunk" (RD-049)
            self._check(reply.content_chunks == 0, "RD-049", "content chunk in a DF reply failed with EOVERFLOW")
        if reply.error == 0 and req.command == Cmd.BLOCK_STATUS:
            # "A successful reply has exactly one status chunk per negotiated context ID" (BS-056)
            missing = set(self.meta_contexts) - reply.contexts
            self._check(not missing, "BS-056", f"no status chunk for contexts {sorted(missing)}")
        self._complete(reply)
