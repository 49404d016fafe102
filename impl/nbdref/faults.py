"""Named fault-injection scenarios: the reference server breaking the protocol on purpose.

Client suites use them to check that a client notices a broken server and fails cleanly.  Each fault is
plain data (``Fault``); the server driver asks it at three points:

* ``cut_handshake_at`` / ``cut_reply_at``: close the socket after N bytes of handshake / of the first
  reply (the bytes up to N are sent, the rest never is);
* ``stall_handshake`` / ``stall_reply``: stop answering (the client must time out); the stall ends after
  PARAM seconds, when the server stops, or when the client hangs up;
* ``reply_bytes(ctx)``: the raw bytes to send *instead of* the normal reply to the first request the fault
  applies to (sent with the core's ``send_raw``, so the state machine is not fooled).

Whenever a fault is applied the session marks the core's ``local_breach``: a correct client that hangs
up on the broken server is not charged with DISC-006/007/024.

Names accept one numeric parameter after a colon, e.g. ``disconnect-handshake:20``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

from . import _wire as w
from ._constants import Cmd, Err, Magic, ReplyFlag, ReplyType


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
