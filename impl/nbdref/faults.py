"""Named fault-injection scenarios: the reference server breaking the protocol on purpose.

Client suites use them to check that a client notices a broken server and fails cleanly.  Each fault is
plain data (``Fault``); the server driver asks it at three points:

* ``cut_handshake_at`` / ``cut_reply_at``: close the socket after N bytes of handshake / of the first
  reply (the bytes up to N are sent, the rest never is);
* ``stall_handshake`` / ``stall_reply``: stop answering (the client must time out); the stall ends after
  PARAM seconds, when the server stops, or when the client hangs up;
* ``reply_bytes(ctx)``: the raw bytes to send *instead of* the normal reply to the first request the fault
  applies to (sent with the core's ``send_raw``, so the state machine is not fooled);
* ``greeting_flags`` / ``transmission_flags``: undefined bits OR-ed into the greeting / the export's
  transmission flags (a client must ignore them: HS-005, CMD-013); ``option_error``: the first option's
  reply is this error (NBD_REP_ERR_SHUTDOWN: the client must send NBD_OPT_ABORT, DISC-014);
  ``reply_error``: the first READ gets an error reply with this value (an ordinary reply, through the core);
  ``unknown_info`` / ``reverse_info``: INFO/GO information replies with an undefined type first, or in
  reverse order (legal for a server; the client must cope: GO-011, GO-029);
* ``status_bits`` / ``split_extents`` reshape BLOCK_STATUS replies (BS-024, BS-076); ``context_ids``
  renumbers metadata context IDs (BS-042, BS-052).

Whenever a fault is applied the session marks the core's ``local_breach``: a correct client that hangs
up on the broken server is not charged with DISC-006/007/024.

Names accept one numeric parameter after a colon, e.g. ``disconnect-handshake:20``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

from . import _wire as w
from ._constants import Cmd, Err, Magic, Rep, ReplyFlag, ReplyType


@dataclass(frozen=True, slots=True, kw_only=True)
class ReplyContext:
    """What a reply fault needs to know about the request it answers."""

    cookie: int
    command: int
    offset: int
    length: int
    structured: bool
    extended: bool
    data: bytes = b""  # READ: the correct data


def _simple(ctx: ReplyContext, *, magic: int = Magic.SIMPLE_REPLY, error: int = 0, cookie: int | None = None,
            data: bytes = b"") -> bytes:
    return w.SIMPLE_REPLY.pack(magic, error, ctx.cookie if cookie is None else cookie) + data


def _chunk(ctx: ReplyContext, rtype: int, payload: bytes, *, flags: int = ReplyFlag.DONE,
           cookie: int | None = None, magic: int | None = None, length: int | None = None) -> bytes:
    cookie = ctx.cookie if cookie is None else cookie
    length = len(payload) if length is None else length
    if ctx.extended:
        return w.EXTENDED_CHUNK.pack(magic or Magic.EXTENDED_REPLY, flags, rtype, cookie, ctx.offset,
                                     length) + payload
    return w.STRUCTURED_CHUNK.pack(magic or Magic.STRUCTURED_REPLY, flags, rtype, cookie, length) + payload


def _normal_read(ctx: ReplyContext, **kw: object) -> bytes:
    """The correct reply to a READ, with header fields overridden by ``kw``."""
    if ctx.structured or ctx.extended:
        return _chunk(ctx, ReplyType.OFFSET_DATA, w.OFFSET.pack(ctx.offset) + ctx.data, **kw)  # type: ignore[arg-type]
    return _simple(ctx, data=ctx.data, **kw)  # type: ignore[arg-type]


def _wrong_reply_magic(ctx: ReplyContext) -> bytes:
    return _normal_read(ctx, magic=0xDEADBEEF)


def _unknown_cookie(ctx: ReplyContext) -> bytes:
    return _normal_read(ctx, cookie=ctx.cookie ^ 0x5A5A5A5A5A5A5A5A)


def _chunk_outside_range(ctx: ReplyContext) -> bytes:
    # proto.md: "The server MUST NOT send [OFFSET_DATA] content chunks that ... lie outside the request".
    return _chunk(ctx, ReplyType.OFFSET_DATA, w.OFFSET.pack(ctx.offset + ctx.length) + ctx.data)


def _overlapping_chunks(ctx: ReplyContext) -> bytes:
    # "The server MUST NOT send content chunks that overlap with any earlier content or error chunk".
    half = max(1, len(ctx.data) // 2)
    first = _chunk(ctx, ReplyType.OFFSET_DATA, w.OFFSET.pack(ctx.offset) + ctx.data, flags=0)
    again = _chunk(ctx, ReplyType.OFFSET_DATA, w.OFFSET.pack(ctx.offset) + ctx.data[:half])
    return first + again


def _missing_done(ctx: ReplyContext) -> bytes:
    return _chunk(ctx, ReplyType.OFFSET_DATA, w.OFFSET.pack(ctx.offset) + ctx.data, flags=0)


def _oversize_length(ctx: ReplyContext) -> bytes:
    # A chunk that claims more payload than the request could ever need (64 MiB beyond the read).
    claimed = 8 + ctx.length + (64 << 20)
    if not (ctx.structured or ctx.extended):
        return _simple(ctx, data=ctx.data + bytes(4096))  # simple replies carry no length: send extra
    return _chunk(ctx, ReplyType.OFFSET_DATA, w.OFFSET.pack(ctx.offset) + ctx.data, length=claimed)


def _structured_unnegotiated(ctx: ReplyContext) -> bytes:
    # "the server MUST NOT send structured reply chunks" unless NBD_OPT_STRUCTURED_REPLY was negotiated.
    plain = replace(ctx, extended=False)
    return _chunk(plain, ReplyType.OFFSET_DATA, w.OFFSET.pack(ctx.offset) + ctx.data)


def _error_chunk_bad_message_length(ctx: ReplyContext) -> bytes:
    msg = b"injected error"
    # message length field says 200, the chunk holds 14 bytes of message: inconsistent with its length.
    return _chunk(ctx, ReplyType.ERROR, w.ERROR_HEADER.pack(Err.EIO, 200) + msg)


def _error_chunk_zero_error(ctx: ReplyContext) -> bytes:
    # "the error field MUST be nonzero" in NBD_REPLY_TYPE_ERROR.
    return _chunk(ctx, ReplyType.ERROR, w.ERROR_HEADER.pack(0, 0))


def _unknown_chunk_type(ctx: ReplyContext) -> bytes:
    # A non-error chunk type no version defines (99): "the client MUST initiate a hard disconnect".
    return _chunk(ctx, 99, b"\0" * 8)


def _unknown_error_chunk(ctx: ReplyContext) -> bytes:
    # An undefined type with bit 15 set (0x8099) carrying an error header: the reply failed.
    return _chunk(ctx, 0x8099, w.ERROR_HEADER.pack(Err.EIO, 0))


def _unknown_reply_flag(ctx: ReplyContext) -> bytes:
    # The correct data chunk with an undefined reply flag (bit 7) beside DONE: "MUST ignore".
    return _chunk(ctx, ReplyType.OFFSET_DATA, w.OFFSET.pack(ctx.offset) + ctx.data, flags=ReplyFlag.DONE | 0x80)


def _chunks_out_of_order(ctx: ReplyContext) -> bytes:
    # The second half of the data first, then the first half (with DONE): the client must reassemble.
    half = len(ctx.data) // 2
    second = _chunk(ctx, ReplyType.OFFSET_DATA, w.OFFSET.pack(ctx.offset + half) + ctx.data[half:], flags=0)
    return second + _chunk(ctx, ReplyType.OFFSET_DATA, w.OFFSET.pack(ctx.offset) + ctx.data[:half])


def _unknown_error_value(ctx: ReplyContext) -> bytes:
    # An error value proto.md does not define (99): "treat ... as if it were NBD_EINVAL".
    if ctx.structured or ctx.extended:
        return _chunk(ctx, ReplyType.ERROR, w.ERROR_HEADER.pack(99, 0))
    return _simple(ctx, error=99)


@dataclass(frozen=True, slots=True, kw_only=True)
class Fault:
    """One scenario.  ``param`` is the number after the colon (bytes for disconnects, seconds for stalls)."""

    name: str
    description: str
    needs_structured: bool = False       # only meaningful once structured replies are negotiated
    needs_simple: bool = False           # only meaningful while structured replies are NOT negotiated
    applies_to: tuple[int, ...] = (Cmd.READ,)
    cut_handshake: bool = False
    cut_reply: bool = False
    stall_handshake: bool = False
    stall_reply: bool = False
    greeting_magic: int | None = None    # replace NBDMAGIC in the greeting
    option_reply_magic: int | None = None  # replace the option reply magic
    builder: Callable[[ReplyContext], bytes] | None = None
    greeting_flags: int = 0              # OR-ed into the newstyle greeting's handshake flags
    transmission_flags: int = 0          # OR-ed into the flags of NBD_INFO_EXPORT / EXPORT_NAME replies
    option_error: int | None = None      # the first option (not STARTTLS/ABORT) gets this error reply
    reply_error: int | None = None       # the first READ fails with this error (sent through the core)
    unknown_info: int | None = None      # INFO/GO replies start with an NBD_REP_INFO of this undefined type
    reverse_info: bool = False           # INFO/GO information replies in reverse order (EXPORT last)
    status_bits: int = 0                 # OR-ed into every base:allocation status (undefined bits)
    split_extents: bool = False          # each block-status extent sent as two equal-status descriptors
    context_ids: bool = False            # nonzero IDs in LIST_META_CONTEXT, SET IDs differing per connection
    param: int | None = None
    default_param: int | None = None

    @property
    def cut_handshake_at(self) -> int | None:
        return self._value() if self.cut_handshake else None

    @property
    def cut_reply_at(self) -> int | None:
        return self._value() if self.cut_reply else None

    @property
    def stall_seconds(self) -> float:
        return float(self._value() or 3600)

    def _value(self) -> int | None:
        return self.param if self.param is not None else self.default_param

    def applies(self, command: int, structured: bool) -> bool:
        if command not in self.applies_to:
            return False
        return (structured or not self.needs_structured) and not (structured and self.needs_simple)

    def reply_bytes(self, ctx: ReplyContext) -> bytes | None:
        return self.builder(ctx) if self.builder is not None else None

    @property
    def spec(self) -> str:
        return self.name if self.param is None else f"{self.name}:{self.param}"


FAULTS: dict[str, Fault] = {
    f.name: f
    for f in [
        Fault(name="wrong-greeting-magic", description="greeting starts with a wrong NBDMAGIC",
              greeting_magic=0x4E42444D41474945),
        Fault(name="wrong-option-reply-magic", description="option replies carry a wrong magic",
              option_reply_magic=0x0003E889045565AA),
        Fault(name="wrong-reply-magic", description="first READ reply has magic 0xdeadbeef",
              builder=_wrong_reply_magic),
        Fault(name="unknown-cookie", description="first READ reply names a cookie never sent",
              builder=_unknown_cookie),
        Fault(name="chunk-outside-range", description="OFFSET_DATA chunk placed after the requested range",
              needs_structured=True, builder=_chunk_outside_range),
        Fault(name="overlapping-chunks", description="two OFFSET_DATA chunks cover the same bytes",
              needs_structured=True, builder=_overlapping_chunks),
        Fault(name="missing-done", description="READ chunks never carry NBD_REPLY_FLAG_DONE",
              needs_structured=True, builder=_missing_done),
        Fault(name="oversize-length", description="reply claims 64 MiB more payload than requested",
              builder=_oversize_length),
        # With structured replies negotiated the compact chunk would be legal: applies only without them.
        Fault(name="structured-unnegotiated", description="structured chunk although SR was not negotiated",
              needs_simple=True, builder=_structured_unnegotiated),
        Fault(name="error-chunk-bad-message-length", description="NBD_REPLY_TYPE_ERROR message length > chunk",
              needs_structured=True, builder=_error_chunk_bad_message_length),
        Fault(name="error-chunk-zero-error", description="NBD_REPLY_TYPE_ERROR with error 0",
              needs_structured=True, builder=_error_chunk_zero_error),
        # "the client MUST initiate a soft disconnect" on NBD_ESHUTDOWN (DISC-021).  A well-formed reply sent
        # through the core, so the core knows the request was answered (no false "still in flight").
        Fault(name="eshutdown", description="first READ fails with NBD_ESHUTDOWN", reply_error=Err.ESHUTDOWN),
        # "The client MUST ignore information replies it does not understand" (GO-011/GO-030) and "MUST NOT
        # rely on any ordering of NBD_REP_INFO replies" (GO-029): neither is a server breach.
        Fault(name="unknown-info-reply", description="INFO/GO replies start with NBD_REP_INFO type 0x1234",
              unknown_info=0x1234),
        Fault(name="reversed-info-replies", description="INFO/GO information replies in reverse order",
              reverse_info=True),
        # base:allocation "clients MUST ignore unknown flags" (BS-024); "Clients SHOULD cope with consecutive
        # descriptors that have the same status" (BS-076); context IDs in LIST replies are to be disregarded
        # (BS-042) and are "transient" per connection (BS-052).
        Fault(name="unknown-status-bits", description="base:allocation statuses carry undefined bit 5",
              status_bits=0x20),
        Fault(name="split-extents", description="every extent sent as two descriptors of the same status",
              split_extents=True),
        Fault(name="shifted-context-ids", description="nonzero LIST_META_CONTEXT ids; SET ids differ per "
              "connection", context_ids=True),
        Fault(name="unknown-handshake-flag", description="greeting sets handshake flag bit 15 (undefined)",
              greeting_flags=1 << 15),
        Fault(name="unknown-transmission-flag", description="transmission flags set bit 15 (undefined)",
              transmission_flags=1 << 15),
        Fault(name="option-err-shutdown", description="first option answered NBD_REP_ERR_SHUTDOWN",
              option_error=Rep.ERR_SHUTDOWN),
        Fault(name="unknown-chunk-type", description="READ answered with chunk type 99 (not an error type)",
              needs_structured=True, builder=_unknown_chunk_type),
        Fault(name="unknown-error-chunk", description="READ answered with unknown error chunk type 0x8099",
              needs_structured=True, builder=_unknown_error_chunk),
        Fault(name="unknown-reply-flag", description="correct READ chunk with undefined reply flag bit 7 set",
              needs_structured=True, builder=_unknown_reply_flag),
        Fault(name="chunks-out-of-order", description="READ data in two chunks, the second half first",
              needs_structured=True, builder=_chunks_out_of_order),
        Fault(name="unknown-error-value", description="first READ fails with error value 99 (undefined)",
              builder=_unknown_error_value),
        Fault(name="stall-handshake", description="greeting, then silence for PARAM s (default: 3600)",
              stall_handshake=True),
        Fault(name="stall-reply", description="no reply to the first READ for PARAM s (default: 3600)",
              stall_reply=True),
        Fault(name="disconnect-handshake", description="close after PARAM bytes of handshake (default 10)",
              cut_handshake=True, default_param=10),
        Fault(name="disconnect-reply", description="close after PARAM bytes of the first READ reply (default 8)",
              cut_reply=True, default_param=8),
    ]
}


def get(spec: str | Fault | None) -> Fault | None:
    """``"name"`` or ``"name:N"`` -> Fault; None -> None.  KeyError lists the known names."""
    if spec is None or isinstance(spec, Fault):
        return spec
    name, _, param = spec.partition(":")
    if name not in FAULTS:
        raise KeyError(f"unknown fault {name!r}; known: {', '.join(FAULTS)}")
    fault = FAULTS[name]
    if param:
        fault = replace(fault, param=int(param, 0))
    return fault


def format_table() -> str:
    """Text for ``--list-faults``."""
    return "\n".join(f"{f.name:32} {f.description}" for f in FAULTS.values())
