"""Byte parsers: turn the peer's bytes into events, one message at a time.

``Parsers`` is a mixin of ``Connection``: it decides from the state which message the peer may send
next, waits for enough bytes (NEED_DATA), catches what cannot be framed (``_fail``) and hands each
decoded message to ``_receive``, which runs the shared checks. READ data goes through the sink, so
it lands in the caller's buffer without a copy.

A length in a header is the peer's word, not data: nothing is allocated from it before the bytes
arrive.  A payload without a caller's buffer (a WRITE's data, OFFSET_DATA without ``read_buffer``) is
received into a bytearray that holds what is already here and grows as the bytes arrive, at most
one step (``PAYLOAD_STEP``) ahead of them (``_grow_sink``).
"""

from __future__ import annotations

from . import _events as ev
from . import _wire as w
from ._checker import _DATA_CAP, Checker, _Reply
from ._constants import (
    DEFAULT_MAX_PAYLOAD,
    MAX_EXTENTS_PER_CHUNK,
    REP_FLAG_ERROR,
    STRING_MAX,
    Cmd,
    CmdFlag,
    Magic,
    Opt,
    Rep,
    ReplyFlag,
    ReplyType,
)
from ._state import NEED_DATA, State, _NeedData

_SINK_THRESHOLD = 64 * 1024  # WRITE payloads from this size on are received in place
_PAYLOAD_FIRST = 256 * 1024  # first step of a payload buffer when get_buffer() has no size hint
PAYLOAD_STEP = 1 << 20  # a growing payload buffer runs at most this far ahead of the bytes received
_ZEROS = memoryview(bytes(PAYLOAD_STEP))  # bytes(n) is calloc'ed: untouched pages cost no memory
_NOWHERE = memoryview(b"")  # the sink target of a discarded payload (never written)

# Plain ints for the per-message path (an enum class attribute costs several times a global).
_REQUEST_MAGIC, _EXTENDED_REQUEST_MAGIC = int(Magic.REQUEST), int(Magic.EXTENDED_REQUEST)
_SIMPLE_REPLY_MAGIC = int(Magic.SIMPLE_REPLY)
_STRUCTURED_REPLY_MAGIC, _EXTENDED_REPLY_MAGIC = int(Magic.STRUCTURED_REPLY), int(Magic.EXTENDED_REPLY)
_READ, _WRITE = int(Cmd.READ), int(Cmd.WRITE)
_PAYLOAD_LEN = int(CmdFlag.PAYLOAD_LEN)
_DONE = int(ReplyFlag.DONE)
_OFFSET_DATA = int(ReplyType.OFFSET_DATA)
_COMMANDS: dict[int, Cmd] = {int(c): c for c in Cmd}
# Events carry CmdFlag values (the API); building one costs ~0.4 µs, so each value seen is built once.
# 16 bits of flags bound the cache (a hostile peer cannot grow it past 65536 entries).
_CMD_FLAGS: dict[int, CmdFlag] = {}


def _cmd_flags(flags: int) -> CmdFlag:
    f = _CMD_FLAGS.get(flags)
    if f is None:
        f = _CMD_FLAGS[flags] = CmdFlag(flags)
    return f


_UNKNOWN_CHUNK_CAP = 65536 + 4096


def _chunk_cap(rtype: int, request_length: int) -> int:
    """Largest plausible length of a chunk of ``rtype`` answering a request of ``request_length`` bytes.

    Block status needs at least one byte of the export per descriptor, error chunks carry at most a
    4096-byte message; anything longer cannot be a correct reply and is not buffered.
    """
    if rtype == ReplyType.BLOCK_STATUS:
        return 4 + 8 * max(min(request_length, MAX_EXTENTS_PER_CHUNK * 2), 1)
    if rtype == ReplyType.BLOCK_STATUS_EXT:
        return 8 + 16 * max(min(request_length, MAX_EXTENTS_PER_CHUNK * 2), 1)
    if rtype in (ReplyType.ERROR, ReplyType.ERROR_OFFSET):
        return 6 + STRING_MAX + 8
    return _UNKNOWN_CHUNK_CAP


_REPLY_SECTIONS = "Simple reply message / Structured reply chunk message"
# proto.md "Reserved Magic values": named in the error so a historic peer is recognisable.
_RESERVED_MAGICS = {
    int(Magic.HISTORIC_REQUEST): "historic NBD_REQUEST_MAGIC",
    int(Magic.HISTORIC_REPLY): "historic NBD_REPLY_MAGIC",
    int(Magic.TRACELOG): "nbd-server transaction log magic",
}


def _reserved(magic: int) -> str:
    name = _RESERVED_MAGICS.get(magic)
    return f' ({name}, reserved: proto.md "Reserved Magic values")' if name else ""


# Options whose data length is fixed by a catalogued rule, so an over-long one breaks that rule.
_OPTION_LENGTH_RULES: dict[int, str] = {
    int(Opt.EXPORT_NAME): "GEN-003",  # the data is the name: "Strings must never exceed 4096 bytes"
    int(Opt.ABORT): "OPT-012",  # "The client SHOULD NOT send data with NBD_OPT_ABORT"
    int(Opt.LIST): "OPT-017",  # "The client MUST NOT send data with NBD_OPT_LIST"
    int(Opt.STARTTLS): "TLS-052",
    int(Opt.STRUCTURED_REPLY): "SR-015",
    int(Opt.EXTENDED_HEADERS): "EXT-029",
}


class Parsers(Checker):
    """Mixin: parsing of both directions (attributes come from Connection)."""

    def _chunk_length_rule(self, rtype: int, length: int, reply: _Reply) -> str | None:
        """The catalogued rule an over-cap chunk length breaks, if any (see ``_chunk_cap``)."""
        if rtype == ReplyType.NONE:
            return "SR-029"  # "NBD_REPLY_TYPE_NONE must have length 0"
        if rtype == ReplyType.OFFSET_HOLE:
            return "SR-035"  # "NBD_REPLY_TYPE_OFFSET_HOLE length must be exactly 12"
        if rtype in (ReplyType.ERROR, ReplyType.ERROR_OFFSET):
            return "SR-043"  # "The error message length must not exceed 4096 bytes"
        if rtype in (ReplyType.BLOCK_STATUS, ReplyType.BLOCK_STATUS_EXT):
            size = 8 if rtype == ReplyType.BLOCK_STATUS else 16
            count = length // size
            if reply.flags & CmdFlag.REQ_ONE:
                return "BS-058"  # "With REQ_ONE ... exactly one descriptor"
            # Extents are nonzero (BS-057), so more descriptors than requested bytes means the ones
            # before the last sum to the requested length or more (BS-060); otherwise there are more
            # than 2^20 of them (BS-062).
            # The requested length is the effect length (inside the payload in the payload form).
            effect = reply.effect
            return "BS-060" if effect is not None and count > effect else "BS-062"
        if not w.is_error_type(rtype):
            # Unknown (or, like OFFSET_DATA to a non-READ, unexpected) type: "the client MUST
            # hard-disconnect" (SR-027).
            return "SR-027"
        mx = self.block_size[2] if self.block_size else None
        # "No variable-length part of a chunk may exceed the advertised maximum payload" (SR-028)
        return "SR-028" if mx is not None and length > mx else None

    def _payload_length_rule(self, plen: int) -> str | None:
        """The catalogued rule an over-cap request payload breaks, if any."""
        if self.block_size is not None and self._block_size_requested and plen > self.block_size[2]:
            # "A client MUST NOT request a WRITE ... longer than the maximum payload size" (BSZ-025)
            return "BSZ-025"
        if plen > DEFAULT_MAX_PAYLOAD:
            # "Absent advertised constraints, a client SHOULD use ... payloads of at most 2^25" (BSZ-008)
            return "BSZ-008"
        return None

    def _have(self, n: int) -> bool:
        if len(self._buf) >= n:
            self._want = 0
            return True
        self._want = n
        return False

    def _receive(self, e: ev.Event, nbytes: int, raw: bytes) -> ev.Event:
        """Run the shared checks/effects on a decoded peer message and record it."""
        if self._parse_noted:
            self._parse_noted.clear()
        if self.transcript.enabled:
            self.transcript.record(self._peer_dir, e, nbytes)
        self._process(self.peer, e, raw)
        return e

    # -- bytes from the server
    def _parse_from_server(self) -> ev.Event | _NeedData:
        st = self._state
        buf = self._buf
        if self._sink is not None:
            return self._drain_sink()
        if st is State.GREETING:
            if not self._have(16):
                return NEED_DATA
            m1, m2 = buf.unpack(w.GREETING_MAGICS)
            if m1 != Magic.NBDMAGIC:
                raise self._fail(f"greeting starts with {m1:#018x}, not NBDMAGIC", "Newstyle negotiation")
            if m2 == Magic.IHAVEOPT:
                if not self._have(w.NEWSTYLE_GREETING.size):
                    return NEED_DATA
                raw = buf.take(w.NEWSTYLE_GREETING.size)
                (flags,) = w.HANDSHAKE_FLAGS.unpack_from(raw, 16)
                return self._receive(ev.NewstyleGreeting(flags=flags), len(raw), raw)
            if m2 == Magic.CLISERV:
                if not self._have(w.OLDSTYLE_GREETING.size):
                    return NEED_DATA
                raw = buf.take(w.OLDSTYLE_GREETING.size)
                return self._receive(w.decode_oldstyle_rest(raw[16:]), len(raw), raw)
            raise self._fail(
                f"second greeting magic {m2:#018x} is neither IHAVEOPT nor cliserv_magic",
                "Newstyle negotiation / Oldstyle negotiation",
            )
        if st is State.OPTIONS:
            if self._pending is None:
                if len(buf):
                    # An option reply carries "the option as sent by the client to which this is a reply": with
                    # no option pending there is nothing it can answer.
                    raise self._fail(
                        f"{len(buf)} bytes from the server while no option is pending",
                        "Fixed newstyle negotiation",
                    )
                return NEED_DATA
            if isinstance(self._pending, ev.OptExportName):
                return self._parse_export_name_reply()
            return self._parse_option_reply()
        if st in (State.TRANSMISSION, State.DISCONNECTING):
            return self._parse_reply()
        if len(buf) and st is State.CLIENT_FLAGS:
            raise self._fail("server sent data before the client flags", "Newstyle negotiation")
        return NEED_DATA

    def _parse_export_name_reply(self) -> ev.Event | _NeedData:
        size = w.EXPORT_NAME_REPLY.size if self.no_zeroes else w.EXPORT_NAME_REPLY_ZEROES.size
        if not self._have(size):
            return NEED_DATA
        raw = self._buf.take(size)
        export_size, flags = w.EXPORT_NAME_REPLY.unpack_from(raw)
        e = ev.ExportNameReply(export_size=export_size, transmission_flags=flags, zeroes=size > 10)
        # Stray zero padding would show up as a zero reply magic.
        self._zeroes_suspect = "HS-009" if size == 10 else ""
        return self._receive(e, size, raw)

    def _parse_option_reply(self) -> ev.Event | _NeedData:
        hdr = w.OPTION_REPLY_HEADER
        if not self._have(hdr.size):
            return NEED_DATA
        magic, option, rtype, length = self._buf.unpack(hdr)
        if magic != Magic.OPT_REPLY:
            raise self._fail(
                f"option reply magic {magic:#x} is not {Magic.OPT_REPLY:#x}", "Fixed newstyle negotiation"
            )
        if length > self.strictness.max_option_length:
            # An over-long reply of a string-carrying type breaks the 4096-byte string limit (GEN-003).
            strings = rtype & REP_FLAG_ERROR or rtype in (Rep.SERVER, Rep.META_CONTEXT, Rep.INFO)
            raise self._refuse_length(
                "GEN-003" if strings else None,
                f"option reply of {length} bytes exceeds the {self.strictness.max_option_length}-byte cap",
                self._buf.peek(hdr.size),
                "Option haggling / Size constraints",
            )
        if not self._have(hdr.size + length):
            return NEED_DATA
        raw = self._buf.take(hdr.size + length)
        try:
            e = w.decode_option_reply(option, rtype, raw[hdr.size :])
            self.checked.update(w.REPLY_DECODE_RULES.get(rtype, ()))
            if isinstance(e, ev.RepInfo):
                self.checked.update(w.INFO_DECODE_RULES.get(e.info_type, ()))
        except w.WireError as exc:
            if exc.req_id:
                self._violation_now(exc.req_id, str(exc), raw, fatal=False)
            e = ev.RepUnknown(option=option, reply_type=rtype, data=raw[hdr.size :])
            if not exc.req_id:
                raise self._fail(str(exc), "Option reply types") from None
        return self._receive(e, len(raw), raw)

    def _parse_reply(self) -> ev.Event | _NeedData:
        buf = self._buf
        if not self._have(4):
            return NEED_DATA
        (magic,) = buf.unpack(w.REPLY_MAGIC)
        if magic == 0 and self._zeroes_suspect:
            # "the server MUST NOT send the 124 bytes of zeroes" after NO_ZEROES was agreed (HS-009);
            # "MUST NOT send zero padding after the NBD_REP_ACK to NBD_OPT_GO" (GO-025)
            self._violation_now(
                self._zeroes_suspect, "zero padding before the first reply", buf.peek(64), fatal=True
            )
        self._zeroes_suspect = ""
        if magic == _SIMPLE_REPLY_MAGIC:
            return self._parse_simple_reply()
        if magic == _STRUCTURED_REPLY_MAGIC:
            if not self._have(w.STRUCTURED_CHUNK.size):
                return NEED_DATA
            _, flags, rtype, cookie, length = buf.unpack(w.STRUCTURED_CHUNK)
            if self.extended_headers:
                # "With extended headers every reply must be an extended reply chunk" (EXT-006)
                self._violation_now(
                    "EXT-006", "compact structured chunk after extended headers", buf.peek(20)
                )
            return self._parse_chunk(w.STRUCTURED_CHUNK.size, flags, rtype, cookie, length, None)
        if magic == _EXTENDED_REPLY_MAGIC:
            if not self._have(w.EXTENDED_CHUNK.size):
                return NEED_DATA
            _, flags, rtype, cookie, offset, length = buf.unpack(w.EXTENDED_CHUNK)
            if not self.extended_headers:
                req = "EXT-051" if self.structured_replies else "SR-001"
                self._violation_now(req, "extended reply chunk without extended headers", buf.peek(32))
            return self._parse_chunk(w.EXTENDED_CHUNK.size, flags, rtype, cookie, length, offset)
        raise self._fail(
            f"reply magic {magic:#010x} is not a known reply magic{_reserved(magic)}", _REPLY_SECTIONS
        )

    def _parse_simple_reply(self) -> ev.Event | _NeedData:
        buf = self._buf
        if not self._have(w.SIMPLE_REPLY.size):
            return NEED_DATA
        _, error, cookie = buf.unpack(w.SIMPLE_REPLY)
        reply = self._inflight.get(cookie)
        if reply is None:
            # The length of what follows depends on the request: without it the stream is lost.
            self._violation_now(
                "CMD-003", f"simple reply for cookie {cookie}, not in flight", buf.peek(16), fatal=True
            )
            raise self._fail(f"simple reply for unknown cookie {cookie}", "Simple reply message")
        req = reply.request
        if reply.command != _READ or error != 0:
            raw = buf.take(w.SIMPLE_REPLY.size)
            return self._receive(ev.SimpleReply(cookie=cookie, error=error), len(raw), raw)
        length = req.length
        if reply.view is not None:
            raw = buf.take(w.SIMPLE_REPLY.size)
            e = ev.SimpleReply(cookie=cookie, error=0, data=None, in_place=True)
            return self._start_sink(reply.view[:length], e, w.SIMPLE_REPLY.size + length, raw)
        if self.discard_payloads:
            raw = buf.take(w.SIMPLE_REPLY.size)
            e = ev.SimpleReply(cookie=cookie, error=0, data=None, in_place=True)
            return self._start_discard(length, e, w.SIMPLE_REPLY.size + length, raw)
        if length > self.strictness.max_payload:
            # Not the server's fault: the client asked for more than it may buffer (Strictness.max_payload).
            raise self._fail(
                f"READ of {length} bytes without read_buffer exceeds the {self.strictness.max_payload}-byte "
                "buffering cap (give the request a read_buffer)",
                "Simple reply message",
            )
        if not self._have(w.SIMPLE_REPLY.size + length):
            return NEED_DATA
        raw = buf.take(w.SIMPLE_REPLY.size)
        data = buf.take(length)
        return self._receive(ev.SimpleReply(cookie=cookie, error=0, data=data), len(raw) + length, raw)

    def _start_sink(
        self, target: memoryview, e: ev.Event, nbytes: int, raw: bytes, total: int | None = None
    ) -> ev.Event | _NeedData:
        """Deliver the payload of ``e`` straight into ``target``; the checks of ``e`` run once it is complete.

        The checks that guard ``target`` (range SR-032, overlap SR-033 of OFFSET_DATA) are made by the
        caller before it starts the sink.  ``total`` (growing sinks only) is the payload's length when
        ``target`` covers only its first part.
        """
        self._sink_raw = (nbytes, raw)
        self._sink = target
        self._sink_total = self._sink_left = len(target) if total is None else total
        self._sink_event = e
        return self._drain_sink()

    def _start_discard(self, length: int, e: ev.Event, nbytes: int, raw: bytes) -> ev.Event | _NeedData:
        """Count a ``length``-byte payload past without storing it (``discard_payloads``: an observer)."""
        self._discarding = True
        return self._start_sink(_NOWHERE, e, nbytes, raw, total=length)

    def _discard_room(self, hint: int) -> memoryview:
        """Scratch memory for get_buffer while a payload is discarded (its bytes are not read again)."""
        if self._scratch is None:
            self._scratch = memoryview(bytearray(PAYLOAD_STEP))
        n = min(self._sink_left, hint if hint > 0 else _PAYLOAD_FIRST, PAYLOAD_STEP)
        return self._scratch[:n]

    def _start_payload(self, length: int, e: ev.Event, field: str, nbytes: int, raw: bytes) -> ev.Event | _NeedData:
        """Receive a ``length``-byte payload into a bytearray of its own that grows as the bytes arrive.

        ``length`` comes from a header: allocating it at once let 28 bytes of WRITE header cost 64 MiB.
        The buffer starts empty when no byte of the payload is here yet (a header alone costs nothing),
        else with those bytes and one step; ``_grow_sink`` keeps it at most one step ahead of the data.
        Once complete it becomes the event's ``field``.
        """
        if self.discard_payloads:
            return self._start_discard(length, e, nbytes, raw)
        have = len(self._buf)
        payload = bytearray(min(length, have + _PAYLOAD_FIRST) if have else 0)
        self._sink_grow = payload
        self._sink_field = field
        return self._start_sink(memoryview(payload), e, nbytes, raw, total=length)

    def _sink_room(self, n: int, hint: int = 0) -> memoryview:
        """Sink memory at the write position, with room for ``min(n, left)`` bytes (at least one)."""
        off = self._sink_total - self._sink_left
        if self._sink_grow is not None and len(self._sink) - off < max(min(n, self._sink_left), 1):  # type: ignore[arg-type]
            self._grow_sink(off, n, hint)
        return self._sink[off:]  # type: ignore[index]

    def _grow_sink(self, off: int, n: int, hint: int) -> None:
        """Grow the payload buffer (``off`` bytes received) for ``n`` bytes at hand, plus one step.

        The step is ``get_buffer``'s size hint (256 KiB without one) at first, then the buffer's size,
        never more than ``PAYLOAD_STEP``: the buffer holds at most what arrived, what is at hand and one
        step (and doubles meanwhile, so it is resized O(log n) times).  It is resized in place (realloc:
        large blocks are remapped, not copied) once our own view is released.  If a driver still holds
        a view of it (its last ``get_buffer``), it cannot be resized: the bytes move to a new buffer of
        twice the size, so that such copies stay linear in the payload, and the old view stays valid
        (nobody reads it any more).
        """
        payload = self._sink_grow
        assert payload is not None and self._sink is not None
        cap = len(payload)
        step = min(PAYLOAD_STEP, max(hint if hint > 0 else _PAYLOAD_FIRST, cap))
        new = min(self._sink_total, max(off + n, cap + step))
        try:
            self._sink.release()
            extra = new - cap
            payload += _ZEROS[:extra] if extra <= len(_ZEROS) else bytes(extra)
        except BufferError:
            grown = bytearray(min(self._sink_total, max(new, 2 * cap)))
            grown[:off] = memoryview(payload)[:off]
            self._sink_grow = payload = grown
        self._sink = memoryview(payload)

    def _drain_sink(self) -> ev.Event | _NeedData:
        assert self._sink is not None
        left = self._sink_left
        if left and len(self._buf):
            n = min(left, len(self._buf))
            if self._discarding:
                self._buf.skip(n)
                self._sink_left -= n
            else:
                self._sink_left -= self._buf.copy_into(self._sink_room(n), n)
        if self._sink_left:
            self._want = 0
            return NEED_DATA
        e, (nbytes, raw) = self._sink_event, self._sink_raw
        assert e is not None
        payload = self._sink_grow
        if payload is not None:
            # The event has not left the core yet: give it the buffer the payload ended up in.
            object.__setattr__(e, self._sink_field, payload)
            self._sink_grow = None
        self._sink = self._sink_event = None
        self._sink_handed = 0
        self._discarding = False
        return self._receive(e, nbytes, raw)

    def _parse_chunk(
        self, hsize: int, flags: int, rtype: int, cookie: int, length: int, hdr_offset: int | None
    ) -> ev.Event | _NeedData:
        buf = self._buf
        head = buf.peek(hsize)
        reply = self._inflight.get(cookie)
        if reply is None:
            if cookie in self._completed:
                # "The chunk with NBD_REPLY_FLAG_DONE MUST be the last chunk sent for that cookie" (SR-011)
                self._violation_now(
                    "SR-011", f"chunk for cookie {cookie} after its final chunk", head, fatal=True
                )
            self._violation_now(
                "CMD-003", f"chunk for cookie {cookie}, which is not in flight", head, fatal=True
            )
            raise self._fail(f"chunk for unknown cookie {cookie}", "Structured reply chunk message")
        req = reply.request
        # "The extended reply's offset field MUST equal the request offset" (EXT-007)
        if hdr_offset is not None and hdr_offset != req.offset:
            self._violation_now("EXT-007", f"header offset {hdr_offset} != request offset {req.offset}", head)
        done = bool(flags & _DONE)
        if rtype == _OFFSET_DATA and reply.command == _READ:
            return self._parse_offset_data(hsize, cookie, done, length, reply, head)
        # The effect length bounds the extents (in the payload form req.length is the payload's size);
        # a malformed payload form has none: fall back to the generic bound.
        effect = reply.effect
        measure = effect if effect is not None else MAX_EXTENTS_PER_CHUNK * 2
        cap = min(_chunk_cap(rtype, measure), self.strictness.max_payload)
        if length > cap:
            # Refused before buffering: a hostile length must not make us reserve memory for it.
            message = f"chunk type {rtype:#x} of {length} bytes exceeds its {cap}-byte cap"
            raise self._refuse_length(
                self._chunk_length_rule(rtype, length, reply), message, head, "Structured reply types"
            )
        if not self._have(hsize + length):
            return NEED_DATA
        buf.skip(hsize)
        payload = buf.take(length)
        raw = head + payload[: _DATA_CAP - len(head)]
        try:
            e = w.decode_chunk(cookie, flags, rtype, payload)
            self.checked.update(w.CHUNK_DECODE_RULES.get(rtype, ()))
        except w.WireError as exc:
            # Inconsistent chunk contents: "the client must hard-disconnect" (SR-053) unless the
            # check is off or its level is not fatal; then the chunk goes on as UnknownChunk.
            self._violation_now(exc.req_id or "SR-053", str(exc), raw)
            e = ev.UnknownChunk(cookie=cookie, done=done, reply_type=rtype, data=payload)
        return self._receive(e, hsize + length, raw)

    def _parse_offset_data(
        self, hsize: int, cookie: int, done: bool, length: int, reply: _Reply, head: bytes
    ) -> ev.Event | _NeedData:
        buf = self._buf
        req = reply.request
        if length < 9:
            # "length MUST be at least 9" (SR-031): framing is intact, but nothing to deliver
            self._violation_now("SR-031", f"NBD_REPLY_TYPE_OFFSET_DATA with length {length}", head)
            if not self._have(hsize + length):
                return NEED_DATA
            buf.skip(hsize)
            payload = buf.take(length)
            return self._receive(
                ev.UnknownChunk(cookie=cookie, done=done, reply_type=1, data=payload), hsize + length, head
            )
        if not self._have(hsize + 8):
            return NEED_DATA
        buf.skip(hsize)
        (offset,) = buf.unpack(w.OFFSET)
        buf.skip(8)
        n = length - 8
        raw = head + w.OFFSET.pack(offset)
        inside = req.offset <= offset and offset + n <= req.offset + req.length
        self.checked.add("SR-032")
        if not inside:
            # Checked here, before any byte is delivered, so data never lands outside read_buffer.
            self._violation_now("SR-032", f"data {offset}+{n} outside request {req.offset}+{req.length}", raw)
        # "MUST NOT overlap with any earlier content or error chunk" (SR-033): also checked before any
        # byte is delivered, so the data does not overwrite what an earlier chunk put in read_buffer.
        overlap = inside and reply.overlaps(offset, offset + n)
        if inside:
            self.checked.add("SR-033")
        if overlap:
            self._violation_now("SR-033", f"{offset}+{n} overlaps an earlier chunk", raw)
        if reply.view is not None and inside and not overlap:
            e = ev.OffsetData(cookie=cookie, done=done, offset=offset, data=None, length=n, in_place=True)
            start = offset - req.offset
            return self._start_sink(reply.view[start : start + n], e, hsize + length, raw)
        if self.discard_payloads:
            e = ev.OffsetData(cookie=cookie, done=done, offset=offset, data=None, length=n, in_place=True)
            return self._start_discard(n, e, hsize + length, raw)
        if n > self.strictness.max_payload:
            mx = self.block_size[2] if self.block_size else None
            raise self._refuse_length(
                # "No variable-length part of a chunk may exceed the advertised maximum payload" (SR-028)
                "SR-028" if mx is not None and n > mx else None,
                f"OFFSET_DATA of {n} bytes without read_buffer exceeds the {self.strictness.max_payload}-byte "
                "buffering cap",
                raw,
                "Structured reply types / NBD_REPLY_TYPE_OFFSET_DATA",
            )
        # Small leftover or no read_buffer: collect the bytes (the parser state must survive NEED_DATA),
        # in a buffer that grows as they arrive (n is the server's word).
        e = ev.OffsetData(cookie=cookie, done=done, offset=offset, data=None, length=n)
        return self._start_payload(n, e, "data", hsize + length, raw)

    # -- bytes from the client
    def _parse_from_client(self) -> ev.Event | _NeedData:
        st = self._state
        buf = self._buf
        if self._sink is not None:
            return self._drain_sink()
        if st is State.CLIENT_FLAGS:
            if not self._have(4):
                return NEED_DATA
            raw = buf.take(4)
            (flags,) = w.CLIENT_FLAGS.unpack(raw)
            return self._receive(ev.ClientFlags(flags=flags), 4, raw)
        if st is State.OPTIONS:
            return self._parse_option()
        if st is State.TRANSMISSION:
            return self._parse_request()
        if st is State.DISCONNECTING and len(buf):
            # "The client MUST NOT send anything after NBD_CMD_DISC" (DISC-026)
            raw = buf.take_all()
            self._violation_now("DISC-026", f"{len(raw)} bytes after NBD_CMD_DISC", raw, fatal=False)
            return NEED_DATA
        return NEED_DATA

    def _parse_option(self) -> ev.Event | _NeedData:
        buf = self._buf
        hdr = w.OPTION_HEADER
        if not self._have(hdr.size):
            return NEED_DATA
        magic, option, length = buf.unpack(hdr)
        if magic != Magic.IHAVEOPT:
            raise self._fail(f"option magic {magic:#018x} is not IHAVEOPT", "Newstyle negotiation")
        if length > self.strictness.max_option_length:
            raise self._refuse_length(
                _OPTION_LENGTH_RULES.get(option),
                f"option {option} with {length} bytes exceeds the {self.strictness.max_option_length}-byte cap",
                buf.peek(hdr.size),
                "Option haggling / Size constraints",
            )
        if not self._have(hdr.size + length):
            return NEED_DATA
        raw = buf.take(hdr.size + length)
        data = raw[hdr.size :]
        try:
            e = w.decode_option(option, data)
            self.checked.update(w.OPTION_DECODE_RULES.get(option, ()))
        except w.WireError as exc:
            self._violation_now(exc.req_id or "BS-028", str(exc), raw, fatal=False)
            e = ev.OptUnknown(option=option, data=data, reason=str(exc))
        return self._receive(e, len(raw), raw)

    def _parse_request(self) -> ev.Event | _NeedData:
        buf = self._buf
        if not self._have(4):
            return NEED_DATA
        (magic,) = buf.unpack(w.REPLY_MAGIC)
        if magic == _REQUEST_MAGIC:
            if self.extended_headers:
                # "After NBD_REP_ACK the client must use 32-byte extended request headers" (EXT-037)
                self._violation_now("EXT-037", "compact request after extended headers", buf.peek(28))
            layout = w.REQUEST
        elif magic == _EXTENDED_REQUEST_MAGIC:
            if self.extended_headers:
                self.checked.add("EXT-037")     # an extended header, as EXT-037 asks (only peer bytes parse here)
            if not self.extended_headers:
                # The compact header is used "when extended transactions are not in use"; the draft has
                # no MUST for the reverse, and the header length decides how to read on.
                raise self._fail(
                    "extended request header without extended headers negotiated (NBD_OPT_EXTENDED_HEADERS)",
                    "Request message",
                )
            layout = w.EXTENDED_REQUEST
        else:
            raise self._fail(
                f"request magic {magic:#010x} is not NBD_REQUEST_MAGIC{_reserved(magic)}", "Request message"
            )
        if not self._have(layout.size):
            return NEED_DATA
        _, flags, cmd, cookie, offset, length = buf.unpack(layout)
        if layout is w.EXTENDED_REQUEST:
            # "The command NBD_CMD_WRITE MUST use the flag NBD_CMD_FLAG_PAYLOAD_LEN in this mode"
            # (EXT-002, recorded by the request rules like any other breach). A WRITE without it is
            # still framed: a write always carries its data ("NBD_CMD_WRITE (as the write command always
            # sends a payload of the length given)"), so length bytes of data follow, as qemu-nbd 11.1
            # reads them from qemu-io 10.0/11.1.
            has_payload = bool(flags & _PAYLOAD_LEN) or cmd == _WRITE
        else:
            has_payload = cmd == _WRITE
        plen = length if has_payload else 0
        if plen > self.strictness.max_payload:
            raise self._refuse_length(
                self._payload_length_rule(plen),
                f"request payload of {plen} bytes exceeds the {self.strictness.max_payload}-byte cap",
                buf.peek(layout.size),
                "Request message / Size constraints",
            )
        command = _COMMANDS.get(cmd, cmd)  # the Cmd member when known, without Cmd(cmd)'s cost
        cmd_flags = _cmd_flags(flags)
        if plen >= _SINK_THRESHOLD and self._have(layout.size):
            # A large WRITE payload is received straight into its own buffer (get_buffer hands out
            # that buffer), instead of accumulating in the receive buffer and being copied out; the
            # buffer grows as the data arrives (plen is only the client's word so far).
            raw = buf.take(layout.size)
            e = ev.Request(
                cookie=cookie, command=command, flags=cmd_flags, offset=offset, length=length, payload=None
            )
            return self._start_payload(plen, e, "payload", layout.size + plen, raw)
        if not self._have(layout.size + plen):
            return NEED_DATA
        raw = buf.take(layout.size)
        small = buf.take(plen) if has_payload else None
        e = ev.Request(
            cookie=cookie, command=command, flags=cmd_flags, offset=offset, length=length, payload=small
        )
        return self._receive(e, layout.size + plen, raw)
