"""The events of the core: one frozen, keyword-only dataclass per NBD message.

``send(event)`` turns an event into bytes; ``next_event()`` turns bytes into events. Fields use the
spec's names; flags are the IntFlag classes of ``_constants``. Only ``Request.read_buffer`` is
local (never on the wire): where the data of a READ reply should land (zero-copy receive).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from ._constants import (
    DEFAULT_MAX_PAYLOAD,
    DEFAULT_MIN_BLOCK,
    DEFAULT_PREF_BLOCK,
    ClientFlag,
    Cmd,
    HandshakeFlag,
    Info,
    Opt,
    Rep,
    ReplyType,
    TxFlag,
)

_ev = dataclass(frozen=True, slots=True, kw_only=True)

Buffer = bytes | bytearray | memoryview


@_ev
class Event:
    """Base class of every event."""


# --------------------------------------------------------------------------- handshake


@_ev
class OldstyleGreeting(Event):
    """Server: NBDMAGIC, cliserv_magic, size, 32-bit flags, 124 zeroes (152 bytes)."""

    export_size: int
    transmission_flags: int = TxFlag.HAS_FLAGS
    handshake_flags: int = 0  # upper 16 bits of the 32-bit flags field; must be 0 (OLD-003)


@_ev
class NewstyleGreeting(Event):
    """Server: NBDMAGIC, IHAVEOPT, 16-bit handshake flags (18 bytes)."""

    flags: int = HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES


@_ev
class ClientFlags(Event):
    """Client: 32-bit client flags answering the newstyle greeting."""

    flags: int = ClientFlag.FIXED_NEWSTYLE | ClientFlag.NO_ZEROES


# --------------------------------------------------------------------------- options (client)


@_ev
class Option(Event):
    """Base of every option request; ``option`` is the code sent on the wire."""

    option: ClassVar[int]


@_ev
class OptExportName(Option):
    option: ClassVar[int] = Opt.EXPORT_NAME
    name: str = ""


@_ev
class OptAbort(Option):
    option: ClassVar[int] = Opt.ABORT
    data: bytes = b""  # should be empty (OPT-012)


@_ev
class OptList(Option):
    option: ClassVar[int] = Opt.LIST
    data: bytes = b""  # must be empty (OPT-017)


@_ev
class OptStartTLS(Option):
    option: ClassVar[int] = Opt.STARTTLS
    data: bytes = b""  # must be empty (TLS-052)


@_ev
class OptInfo(Option):
    """NBD_OPT_INFO: export name and the NBD_INFO_* types requested."""

    option: ClassVar[int] = Opt.INFO
    name: str = ""
    info: tuple[int, ...] = ()


@_ev
class OptGo(Option):
    """NBD_OPT_GO: export name and the NBD_INFO_* types requested."""

    option: ClassVar[int] = Opt.GO
    name: str = ""
    info: tuple[int, ...] = ()


@_ev
class OptStructuredReply(Option):
    option: ClassVar[int] = Opt.STRUCTURED_REPLY
    data: bytes = b""  # must be empty (SR-015)


@_ev
class OptListMetaContext(Option):
    option: ClassVar[int] = Opt.LIST_META_CONTEXT
    name: str = ""
    queries: tuple[str, ...] = ()


@_ev
class OptSetMetaContext(Option):
    option: ClassVar[int] = Opt.SET_META_CONTEXT
    name: str = ""
    queries: tuple[str, ...] = ()


@_ev
class OptExtendedHeaders(Option):
    option: ClassVar[int] = Opt.EXTENDED_HEADERS
    data: bytes = b""  # must be empty (EXT-029)


@_ev
class OptUnknown(Option):
    """Any other option code, or a known option whose data could not be decoded (``reason``)."""

    option: int = 0  # type: ignore[misc]
    data: bytes = b""
    reason: str = ""


# --------------------------------------------------------------------------- option replies (server)


@_ev
class ExportNameReply(Event):
    """Server's answer to NBD_OPT_EXPORT_NAME: size, flags, and 124 zeroes unless NO_ZEROES was agreed.

    ``zeroes=None`` when sending means "as negotiated".
    """

    export_size: int
    transmission_flags: int = TxFlag.HAS_FLAGS
    zeroes: bool | None = None


@_ev
class OptionReply(Event):
    """Base of every option reply; ``option`` echoes the option being answered."""

    option: int
    reply_type: ClassVar[int]


@_ev
class RepAck(OptionReply):
    reply_type: ClassVar[int] = Rep.ACK


@_ev
class RepServer(OptionReply):
    """One export of an NBD_OPT_LIST answer (``details`` is the optional trailing string)."""

    reply_type: ClassVar[int] = Rep.SERVER
    name: str = ""
    details: str = ""


@_ev
class RepInfo(OptionReply):
    """Base of NBD_REP_INFO replies; ``info_type`` is the NBD_INFO_* code."""

    reply_type: ClassVar[int] = Rep.INFO
    info_type: ClassVar[int]


@_ev
class RepInfoExport(RepInfo):
    info_type: ClassVar[int] = Info.EXPORT
    export_size: int = 0
    transmission_flags: int = TxFlag.HAS_FLAGS


@_ev
class RepInfoName(RepInfo):
    info_type: ClassVar[int] = Info.NAME
    name: str = ""


@_ev
class RepInfoDescription(RepInfo):
    info_type: ClassVar[int] = Info.DESCRIPTION
    description: str = ""


@_ev
class RepInfoBlockSize(RepInfo):
    info_type: ClassVar[int] = Info.BLOCK_SIZE
    minimum: int = DEFAULT_MIN_BLOCK
    preferred: int = DEFAULT_PREF_BLOCK
    maximum: int = DEFAULT_MAX_PAYLOAD


@_ev
class RepInfoUnknown(RepInfo):
    """An NBD_INFO_* type we do not know (the client must ignore it, GO-011)."""

    info_type: int = 0xFFFF  # type: ignore[misc]
    data: bytes = b""


@_ev
class RepMetaContext(OptionReply):
    reply_type: ClassVar[int] = Rep.META_CONTEXT
    context_id: int = 0
    name: str = ""


@_ev
class RepError(OptionReply):
    """Any reply type with bit 31 set, with its optional human-readable message."""

    reply_type: int = Rep.ERR_UNSUP  # type: ignore[misc]
    message: str = ""


@_ev
class RepUnknown(OptionReply):
    """A non-error reply type we do not know."""

    reply_type: int = 0  # type: ignore[misc]
    data: bytes = b""


# --------------------------------------------------------------------------- transmission


@_ev
class Request(Event):
    """A request (28-byte compact or 32-byte extended header, plus WRITE / BLOCK_STATUS payload).

    ``read_buffer`` is local only: for a READ, a writable buffer of ``length`` bytes where the reply data
    is delivered in place (events then carry offset/length, not bytes).
    """

    cookie: int
    command: int
    flags: int = 0
    offset: int = 0
    length: int = 0
    payload: Buffer | None = field(default=None, compare=True, repr=False)
    read_buffer: memoryview | bytearray | None = field(default=None, compare=False, repr=False)


@_ev
class SimpleReply(Event):
    """Simple reply: error and, for a successful READ, ``length`` bytes of data.

    ``data`` is None when the data was delivered in place into the request's ``read_buffer``.
    """

    cookie: int
    error: int = 0
    data: Buffer | None = field(default=None, repr=False)
    in_place: bool = False


@_ev
class Chunk(Event):
    """Base of structured / extended reply chunks. ``done`` is the NBD_REPLY_FLAG_DONE bit of the reply
    flags (the only reply flag defined); ``reply_type`` is the chunk type of each subclass."""

    cookie: int
    done: bool = True
    reply_type: ClassVar[int]


@_ev
class OffsetData(Chunk):
    """Data at export ``offset``; ``data`` is None when delivered in place (see Request.read_buffer)."""

    reply_type: ClassVar[int] = ReplyType.OFFSET_DATA
    offset: int = 0
    data: Buffer | None = field(default=None, repr=False)
    length: int = -1  # number of data bytes; -1 = len(data) when sending
    in_place: bool = False


@_ev
class OffsetHole(Chunk):
    reply_type: ClassVar[int] = ReplyType.OFFSET_HOLE
    offset: int = 0
    length: int = 0  # hole size


@_ev
class BlockStatus(Chunk):
    """Extents (length, status flags) of one context; ``extended`` selects BLOCK_STATUS_EXT.

    ``extended=None`` when sending means "as negotiated" (BLOCK_STATUS_EXT with extended headers).
    """

    reply_type: ClassVar[int] = ReplyType.BLOCK_STATUS
    context_id: int = 0
    extents: tuple[tuple[int, int], ...] = ()
    extended: bool | None = None


@_ev
class ErrorChunk(Chunk):
    """NBD_REPLY_TYPE_ERROR (``offset is None``) or NBD_REPLY_TYPE_ERROR_OFFSET."""

    reply_type: ClassVar[int] = ReplyType.ERROR
    error: int = 0
    message: str = ""
    offset: int | None = None


@_ev
class NoneChunk(Chunk):
    reply_type: ClassVar[int] = ReplyType.NONE


@_ev
class UnknownChunk(Chunk):
    """Any other chunk type (an error chunk when bit 15 is set)."""

    reply_type: int = 0  # type: ignore[misc]
    data: bytes = b""


@_ev
class ReplyComplete(Event):
    """Emitted after the last chunk / simple reply of a request: no more replies for ``cookie``.

    ``error`` is the first error reported for the request (0 on success).
    """

    cookie: int
    command: int = Cmd.READ
    error: int = 0


# --------------------------------------------------------------------------- both


@_ev
class StartTLS(Event):
    """The STARTTLS ACK went by: the driver must run the TLS handshake, then call tls_established()."""


@_ev
class ConnectionClosed(Event):
    """The peer closed its side (EOF)."""


__all__ = [
    "BlockStatus",
    "Buffer",
    "Chunk",
    "ClientFlags",
    "ConnectionClosed",
    "ErrorChunk",
    "Event",
    "ExportNameReply",
    "NewstyleGreeting",
    "NoneChunk",
    "OffsetData",
    "OffsetHole",
    "OldstyleGreeting",
    "OptAbort",
    "OptExportName",
    "OptExtendedHeaders",
    "OptGo",
    "OptInfo",
    "OptList",
    "OptListMetaContext",
    "OptSetMetaContext",
    "OptStartTLS",
    "OptStructuredReply",
    "OptUnknown",
    "Option",
    "OptionReply",
    "RepAck",
    "RepError",
    "RepInfo",
    "RepInfoBlockSize",
    "RepInfoDescription",
    "RepInfoExport",
    "RepInfoName",
    "RepInfoUnknown",
    "RepMetaContext",
    "RepServer",
    "RepUnknown",
    "ReplyComplete",
    "Request",
    "SimpleReply",
    "StartTLS",
    "UnknownChunk",
]

# Registries: code -> event class, for the codec.
OPTION_CLASSES: dict[int, type[Option]] = {
    c.option: c
    for c in (
        OptExportName,
        OptAbort,
        OptList,
        OptStartTLS,
        OptInfo,
        OptGo,
        OptStructuredReply,
        OptListMetaContext,
        OptSetMetaContext,
        OptExtendedHeaders,
    )
}
INFO_CLASSES: dict[int, type[RepInfo]] = {
    c.info_type: c for c in (RepInfoExport, RepInfoName, RepInfoDescription, RepInfoBlockSize)
}
