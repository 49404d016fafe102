"""The codec layer: struct layouts and encode/decode of every NBD message and payload.

No state and no checks of protocol rules here (``_negotiation``/``_transmission`` do that): a decoder only refuses
bytes that cannot be split into the fields of the message (``WireError``, naming the requirement
id the sender broke when there is one). Layouts are precompiled ``struct.Struct`` objects named by
what they hold; every integer is big-endian ("network byte order", proto.md Conventions).
"""

from __future__ import annotations

from struct import Struct, unpack_from

from . import _events as ev
from ._constants import REP_FLAG_ERROR, REPLY_TYPE_ERROR_BIT, Info, Magic, Opt, Rep, ReplyType

# --------------------------------------------------------------------------- layouts
U16 = Struct(">H")
U32 = Struct(">I")
U64 = Struct(">Q")
# Handshake.
GREETING_MAGICS = Struct(">QQ")  # NBDMAGIC, IHAVEOPT | cliserv_magic
OLDSTYLE_GREETING = Struct(">QQQI124x")  # 152 bytes
OLDSTYLE_REST = Struct(">QI124x")  # after the two magics
NEWSTYLE_GREETING = Struct(">QQH")  # 18 bytes
HANDSHAKE_FLAGS = U16
CLIENT_FLAGS = U32
OPTION_HEADER = Struct(">QII")  # IHAVEOPT, option, length (16)
OPTION_REPLY_HEADER = Struct(">QIII")  # magic, option, reply type, length (20)
EXPORT_NAME_REPLY = Struct(">QH")  # size, transmission flags (10; +124 zeroes unless NO_ZEROES)
EXPORT_NAME_REPLY_ZEROES = Struct(">QH124x")  # 134
# Option payload pieces.
INFO_EXPORT = Struct(">HQH")  # type, size, flags (12)
INFO_BLOCK_SIZE = Struct(">HIII")  # type, minimum, preferred, maximum (14)
META_CONTEXT_ID = U32
# Transmission.
REQUEST = Struct(">IHHQQI")  # magic, flags, type, cookie, offset, length (28)
EXTENDED_REQUEST = Struct(">IHHQQQ")  # magic, flags, type, cookie, offset, length (32)
SIMPLE_REPLY = Struct(">IIQ")  # magic, error, cookie (16)
STRUCTURED_CHUNK = Struct(">IHHQI")  # magic, flags, type, cookie, length (20)
EXTENDED_CHUNK = Struct(">IHHQQQ")  # magic, flags, type, cookie, offset, length (32)
REPLY_MAGIC = U32  # the first 4 bytes decide which reply header follows
# Chunk payloads.
OFFSET = U64  # OFFSET_DATA: offset, then data
OFFSET_HOLE = Struct(">QI")  # offset, hole size (12)
BLOCK_STATUS_HEADER = U32  # context id
BLOCK_STATUS_EXTENT = Struct(">II")  # length, status flags
BLOCK_STATUS_EXT_HEADER = Struct(">II")  # context id, descriptor count
BLOCK_STATUS_EXT_EXTENT = Struct(">QQ")  # length, status flags
ERROR_HEADER = Struct(">IH")  # error, message length (6)
# Transmission magics as plain ints: they are packed for every request and reply, and reading an enum
# member off its class costs several times a global lookup.
_REQUEST_MAGIC, _EXTENDED_REQUEST_MAGIC = int(Magic.REQUEST), int(Magic.EXTENDED_REQUEST)
_SIMPLE_REPLY_MAGIC = int(Magic.SIMPLE_REPLY)
_STRUCTURED_REPLY_MAGIC, _EXTENDED_REPLY_MAGIC = int(Magic.STRUCTURED_REPLY), int(Magic.EXTENDED_REPLY)
BLOCK_STATUS_PAYLOAD_HEADER = U64  # extended BLOCK_STATUS request payload: effect length, then ids


class WireError(ValueError):
    """Bytes that cannot be decoded as the message they claim to be."""

    def __init__(self, message: str, req_id: str | None = None) -> None:
        super().__init__(message)
        self.req_id = req_id


# The rules a decoder below holds a message to, by its wire code: a successful decode observed them
# (a failed one raises WireError naming the broken one).  The parser adds them to ``checked``.
# (Only rules that bind the sender: BS-028 names the server's duty to refuse a malformed meta-context
# request, so a well-formed one shows nothing about the client; BS-040 is checked on LIST/SET replies in
# _negotiation.py, not by the decoder.)
OPTION_DECODE_RULES: dict[int, tuple[str, ...]] = {Opt.INFO: ("GO-002",), Opt.GO: ("GO-002",)}
REPLY_DECODE_RULES: dict[int, tuple[str, ...]] = {Rep.SERVER: ("OPT-019",)}
INFO_DECODE_RULES: dict[int, tuple[str, ...]] = {
    Info.EXPORT: ("GO-031",), Info.NAME: ("GO-034",), Info.DESCRIPTION: ("GO-035",), Info.BLOCK_SIZE: ("GO-037",),
}
CHUNK_DECODE_RULES: dict[int, tuple[str, ...]] = {
    ReplyType.NONE: ("SR-029",), ReplyType.OFFSET_HOLE: ("SR-035",), ReplyType.BLOCK_STATUS: ("BS-055",),
    ReplyType.BLOCK_STATUS_EXT: ("EXT-044", "EXT-046"),
    ReplyType.ERROR: ("SR-040", "SR-043"), ReplyType.ERROR_OFFSET: ("SR-045", "SR-043"),
}


# --------------------------------------------------------------------------- strings


def enc_str(s: str) -> bytes:
    """UTF-8; surrogate escapes pass through so fault injection can send invalid bytes."""
    return s.encode("utf-8", "surrogateescape")


def dec_str(b: bytes | memoryview) -> str:
    """Decode a protocol string, keeping invalid bytes as surrogates (checked by the connection)."""
    return bytes(b).decode("utf-8", "surrogateescape")


def nbytes(b: bytes | bytearray | memoryview) -> int:
    """Size of a buffer in bytes: ``len`` counts items, so it miscounts a memoryview of another format."""
    return len(b) if type(b) is bytes or type(b) is bytearray else memoryview(b).nbytes


def is_valid_utf8(s: str) -> bool:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _len_str(s: str, width: Struct = U32) -> bytes:
    b = enc_str(s)
    return width.pack(len(b)) + b


# --------------------------------------------------------------------------- handshake


def encode_oldstyle_greeting(e: ev.OldstyleGreeting) -> bytes:
    flags = ((e.handshake_flags & 0xFFFF) << 16) | (e.transmission_flags & 0xFFFF)
    return OLDSTYLE_GREETING.pack(Magic.NBDMAGIC, Magic.CLISERV, e.export_size, flags)


def decode_oldstyle_rest(data: bytes | memoryview) -> ev.OldstyleGreeting:
    size, flags = OLDSTYLE_REST.unpack(data)
    return ev.OldstyleGreeting(export_size=size, transmission_flags=flags & 0xFFFF, handshake_flags=flags >> 16)


def encode_newstyle_greeting(e: ev.NewstyleGreeting) -> bytes:
    return NEWSTYLE_GREETING.pack(Magic.NBDMAGIC, Magic.IHAVEOPT, e.flags)


def encode_client_flags(e: ev.ClientFlags) -> bytes:
    return CLIENT_FLAGS.pack(e.flags)


def encode_export_name_reply(e: ev.ExportNameReply, zeroes: bool) -> bytes:
    layout = EXPORT_NAME_REPLY_ZEROES if zeroes else EXPORT_NAME_REPLY
    return layout.pack(e.export_size, e.transmission_flags)


# --------------------------------------------------------------------------- options


def option_payload(e: ev.Option) -> bytes:
    """The data of an option request (what follows the 16-byte header)."""
    if isinstance(e, ev.OptExportName):
        return enc_str(e.name)  # the name fills the whole option data, no length prefix
    if isinstance(e, ev.OptInfo | ev.OptGo):
        # "32 bits, length of name (unsigned); MUST be no larger than the option data length - 6"
        return _len_str(e.name) + U16.pack(len(e.info)) + b"".join(U16.pack(i) for i in e.info)
    if isinstance(e, ev.OptListMetaContext | ev.OptSetMetaContext):
        return _len_str(e.name) + U32.pack(len(e.queries)) + b"".join(_len_str(q) for q in e.queries)
    return bytes(e.data)  # type: ignore[attr-defined]


def encode_option(e: ev.Option) -> bytes:
    payload = option_payload(e)
    return OPTION_HEADER.pack(Magic.IHAVEOPT, e.option, len(payload)) + payload


def decode_option(option: int, data: bytes) -> ev.Option:
    """Decode option data; a malformed known option becomes OptUnknown with a ``reason`` (WireError)."""
    cls = ev.OPTION_CLASSES.get(option)
    if cls is None:
        return ev.OptUnknown(option=option, data=data)
    if cls is ev.OptExportName:
        return ev.OptExportName(name=dec_str(data))
    if cls in (ev.OptInfo, ev.OptGo):
        name, pos = _take_len_str(data, 0, "GO-002", "export name")
        if pos + 2 > len(data):
            raise WireError("INFO/GO data too short for the number of information requests", "GO-002")
        (n,) = U16.unpack_from(data, pos)
        pos += 2
        if pos + 2 * n != len(data):
            raise WireError(f"INFO/GO announces {n} information requests in {len(data) - pos} bytes", "GO-002")
        info = tuple(i for (i,) in U16.iter_unpack(data[pos:]))
        return cls(name=name, info=info)  # type: ignore[call-arg]
    if cls in (ev.OptListMetaContext, ev.OptSetMetaContext):
        req = "BS-028"
        name, pos = _take_len_str(data, 0, req, "export name")
        if pos + 4 > len(data):
            raise WireError("meta context data too short for the number of queries", req)
        (n,) = U32.unpack_from(data, pos)
        pos += 4
        if n > (len(data) - pos) // 4:
            raise WireError(f"meta context request announces {n} queries in {len(data) - pos} bytes", req)
        queries = []
        for _ in range(n):
            q, pos = _take_len_str(data, pos, req, "query")
            queries.append(q)
        if pos != len(data):
            raise WireError(f"{len(data) - pos} bytes after the last meta context query", req)
        return cls(name=name, queries=tuple(queries))  # type: ignore[call-arg]
    return cls(data=data)  # type: ignore[call-arg]


def _take_len_str(data: bytes, pos: int, req_id: str, what: str) -> tuple[str, int]:
    if pos + 4 > len(data):
        raise WireError(f"no room for the length of the {what}", req_id)
    (n,) = U32.unpack_from(data, pos)
    pos += 4
    if n > len(data) - pos:
        raise WireError(f"{what} length {n} runs past the option data ({len(data) - pos} bytes left)", req_id)
    return dec_str(data[pos : pos + n]), pos + n


# --------------------------------------------------------------------------- option replies


def option_reply_payload(e: ev.OptionReply) -> bytes:
    if isinstance(e, ev.RepAck):
        return b""
    if isinstance(e, ev.RepServer):
        return _len_str(e.name) + enc_str(e.details)
    if isinstance(e, ev.RepInfoExport):
        return INFO_EXPORT.pack(Info.EXPORT, e.export_size, e.transmission_flags)
    if isinstance(e, ev.RepInfoName):
        return U16.pack(Info.NAME) + enc_str(e.name)
    if isinstance(e, ev.RepInfoDescription):
        return U16.pack(Info.DESCRIPTION) + enc_str(e.description)
    if isinstance(e, ev.RepInfoBlockSize):
        return INFO_BLOCK_SIZE.pack(Info.BLOCK_SIZE, e.minimum, e.preferred, e.maximum)
    if isinstance(e, ev.RepInfoUnknown):
        return U16.pack(e.info_type) + bytes(e.data)
    if isinstance(e, ev.RepMetaContext):
        return META_CONTEXT_ID.pack(e.context_id) + enc_str(e.name)
    if isinstance(e, ev.RepError):
        return enc_str(e.message)
    if isinstance(e, ev.RepUnknown):
        return bytes(e.data)
    raise TypeError(f"not an option reply: {e!r}")


def encode_option_reply(e: ev.OptionReply) -> bytes:
    payload = option_reply_payload(e)
    return OPTION_REPLY_HEADER.pack(Magic.OPT_REPLY, e.option, e.reply_type, len(payload)) + payload


def decode_option_reply(option: int, reply_type: int, data: bytes) -> ev.OptionReply:
    """Decode an option reply payload (the header was already split off)."""
    if reply_type & REP_FLAG_ERROR:
        return ev.RepError(option=option, reply_type=reply_type, message=dec_str(data))
    if reply_type == Rep.ACK:
        if data:
            raise WireError(f"NBD_REP_ACK with {len(data)} bytes of data")
        return ev.RepAck(option=option)
    if reply_type == Rep.SERVER:
        if len(data) < 4:
            raise WireError("NBD_REP_SERVER shorter than 4 bytes", "OPT-019")
        (n,) = U32.unpack_from(data, 0)
        # "32 bits, length of name (unsigned); MUST be no larger than the reply packet header length - 4"
        if n > len(data) - 4:
            raise WireError(f"NBD_REP_SERVER name length {n} exceeds reply length - 4", "OPT-019")
        return ev.RepServer(option=option, name=dec_str(data[4 : 4 + n]), details=dec_str(data[4 + n :]))
    if reply_type == Rep.INFO:
        return decode_info(option, data)
    if reply_type == Rep.META_CONTEXT:
        if len(data) < 4:
            raise WireError("NBD_REP_META_CONTEXT shorter than 4 bytes", "BS-040")
        (cid,) = META_CONTEXT_ID.unpack_from(data, 0)
        return ev.RepMetaContext(option=option, context_id=cid, name=dec_str(data[4:]))
    return ev.RepUnknown(option=option, reply_type=reply_type, data=data)


def decode_info(option: int, data: bytes) -> ev.RepInfo:
    if len(data) < 2:
        raise WireError("NBD_REP_INFO shorter than its 2-byte type", "GO-034")
    (t,) = U16.unpack_from(data, 0)
    if t == Info.EXPORT:
        # "length MUST be 12" (GO-031)
        if len(data) != INFO_EXPORT.size:
            raise WireError(f"NBD_INFO_EXPORT length {len(data)} != 12", "GO-031")
        _, size, flags = INFO_EXPORT.unpack(data)
        return ev.RepInfoExport(option=option, export_size=size, transmission_flags=flags)
    if t == Info.NAME:
        return ev.RepInfoName(option=option, name=dec_str(data[2:]))
    if t == Info.DESCRIPTION:
        return ev.RepInfoDescription(option=option, description=dec_str(data[2:]))
    if t == Info.BLOCK_SIZE:
        if len(data) != INFO_BLOCK_SIZE.size:
            raise WireError(f"NBD_INFO_BLOCK_SIZE length {len(data)} != 14", "GO-037")
        _, mn, pref, mx = INFO_BLOCK_SIZE.unpack(data)
        return ev.RepInfoBlockSize(option=option, minimum=mn, preferred=pref, maximum=mx)
    return ev.RepInfoUnknown(option=option, info_type=t, data=data[2:])


# --------------------------------------------------------------------------- requests


def encode_request_header(e: ev.Request, extended: bool) -> bytes:
    """Request header; with extended headers and PAYLOAD_LEN, ``e.length`` is the payload length."""
    if extended:
        return EXTENDED_REQUEST.pack(_EXTENDED_REQUEST_MAGIC, e.flags, e.command, e.cookie, e.offset, e.length)
    return REQUEST.pack(_REQUEST_MAGIC, e.flags, e.command, e.cookie, e.offset, e.length)


def encode_block_status_payload(effect_length: int, context_ids: tuple[int, ...]) -> bytes:
    """Extended BLOCK_STATUS payload: 64-bit effect length then 32-bit context ids (EXT-056)."""
    return BLOCK_STATUS_PAYLOAD_HEADER.pack(effect_length) + b"".join(U32.pack(i) for i in context_ids)


def decode_block_status_payload(data: bytes | bytearray | memoryview) -> tuple[int, tuple[int, ...]] | None:
    """(effect length, context ids) of an extended BLOCK_STATUS payload; None if not 8 + 4n bytes.

    In that form the header's length is the payload's: "The payload form MUST occupy 8 + n*4 bytes ...
    C: 64 bits, effect length / C: n * 32 bits, list of metacontext ids to use" (EXT-056).
    """
    n = nbytes(data)
    if n < 8 or (n - 8) % 4:
        return None
    (effect,) = BLOCK_STATUS_PAYLOAD_HEADER.unpack_from(data)
    ids = unpack_from(f">{(n - 8) // 4}I", data, 8)
    return effect, ids


# --------------------------------------------------------------------------- replies


def encode_simple_reply_header(cookie: int, error: int) -> bytes:
    return SIMPLE_REPLY.pack(_SIMPLE_REPLY_MAGIC, error, cookie)


def encode_chunk_header(
    flags: int, reply_type: int, cookie: int, length: int, extended: bool, offset: int = 0
) -> bytes:
    if extended:
        return EXTENDED_CHUNK.pack(_EXTENDED_REPLY_MAGIC, flags, reply_type, cookie, offset, length)
    return STRUCTURED_CHUNK.pack(_STRUCTURED_REPLY_MAGIC, flags, reply_type, cookie, length)


def chunk_payload(e: ev.Chunk, extended_bs: bool) -> bytes:
    """Payload of every chunk except OFFSET_DATA's data (see ``offset_data_prefix``)."""
    if isinstance(e, ev.NoneChunk):
        return b""
    if isinstance(e, ev.OffsetHole):
        return OFFSET_HOLE.pack(e.offset, e.length)
    if isinstance(e, ev.BlockStatus):
        if extended_bs:
            head = BLOCK_STATUS_EXT_HEADER.pack(e.context_id, len(e.extents))
            return head + b"".join(BLOCK_STATUS_EXT_EXTENT.pack(n, f) for n, f in e.extents)
        return BLOCK_STATUS_HEADER.pack(e.context_id) + b"".join(
            BLOCK_STATUS_EXTENT.pack(n, f) for n, f in e.extents
        )
    if isinstance(e, ev.ErrorChunk):
        msg = enc_str(e.message)
        out = ERROR_HEADER.pack(e.error, len(msg)) + msg
        return out if e.offset is None else out + U64.pack(e.offset)
    if isinstance(e, ev.UnknownChunk):
        return bytes(e.data)
    raise TypeError(f"no fixed payload for {e!r}")


def chunk_type(e: ev.Chunk, extended_bs: bool) -> int:
    if isinstance(e, ev.BlockStatus):
        return ReplyType.BLOCK_STATUS_EXT if extended_bs else ReplyType.BLOCK_STATUS
    if isinstance(e, ev.ErrorChunk):
        return ReplyType.ERROR if e.offset is None else ReplyType.ERROR_OFFSET
    return e.reply_type


def decode_chunk(cookie: int, flags: int, rtype: int, data: bytes) -> ev.Chunk:
    """Decode a chunk payload other than OFFSET_DATA; WireError names the requirement broken."""
    done = bool(flags & 1)
    n = len(data)
    if rtype == ReplyType.NONE:
        # "The length MUST be 0" (SR-029)
        if n:
            raise WireError(f"NBD_REPLY_TYPE_NONE with length {n}", "SR-029")
        return ev.NoneChunk(cookie=cookie, done=done)
    if rtype == ReplyType.OFFSET_HOLE:
        # "length MUST be exactly 12" (SR-035)
        if n != OFFSET_HOLE.size:
            raise WireError(f"NBD_REPLY_TYPE_OFFSET_HOLE with length {n}", "SR-035")
        off, size = OFFSET_HOLE.unpack(data)
        return ev.OffsetHole(cookie=cookie, done=done, offset=off, length=size)
    if rtype == ReplyType.BLOCK_STATUS:
        # "length MUST be 4 + (a positive integer multiple of 8)" (BS-055)
        if n < 12 or (n - 4) % 8:
            raise WireError(f"NBD_REPLY_TYPE_BLOCK_STATUS with length {n}", "BS-055")
        (cid,) = BLOCK_STATUS_HEADER.unpack_from(data, 0)
        extents = tuple(BLOCK_STATUS_EXTENT.iter_unpack(memoryview(data)[4:]))
        return ev.BlockStatus(cookie=cookie, done=done, context_id=cid, extents=extents, extended=False)
    if rtype == ReplyType.BLOCK_STATUS_EXT:
        # "length MUST be 8 + (a positive multiple of 16)" (EXT-044)
        if n < 24 or (n - 8) % 16:
            raise WireError(f"NBD_REPLY_TYPE_BLOCK_STATUS_EXT with length {n}", "EXT-044")
        cid, count = BLOCK_STATUS_EXT_HEADER.unpack_from(data, 0)
        # "the descriptor count MUST match the number of descriptors" (EXT-046)
        if count != (n - 8) // 16:
            raise WireError(f"BLOCK_STATUS_EXT count {count} but {(n - 8) // 16} descriptors", "EXT-046")
        extents = tuple(BLOCK_STATUS_EXT_EXTENT.iter_unpack(memoryview(data)[8:]))
        return ev.BlockStatus(cookie=cookie, done=done, context_id=cid, extents=extents, extended=True)
    if rtype in (ReplyType.ERROR, ReplyType.ERROR_OFFSET):
        minimum, req = (6, "SR-040") if rtype == ReplyType.ERROR else (14, "SR-045")
        if n < minimum:
            raise WireError(f"error chunk with length {n} < {minimum}", req)
        err, mlen = ERROR_HEADER.unpack_from(data, 0)
        tail = 0 if rtype == ReplyType.ERROR else 8
        # "message length (no more than header length - 6)" (- 14 for ERROR_OFFSET, whose offset follows
        # the message): bytes after them are allowed, a message past the chunk is not (SR-043).
        if 6 + mlen + tail > n:
            raise WireError(f"error message length {mlen} inconsistent with chunk length {n}", "SR-043")
        msg = dec_str(data[6 : 6 + mlen])
        off = None if rtype == ReplyType.ERROR else U64.unpack_from(data, 6 + mlen)[0]
        return ev.ErrorChunk(cookie=cookie, done=done, error=err, message=msg, offset=off)
    return ev.UnknownChunk(cookie=cookie, done=done, reply_type=rtype, data=bytes(data))


def is_error_type(rtype: int) -> bool:
    return bool(rtype & REPLY_TYPE_ERROR_BIT)


# --------------------------------------------------------------------------- one-shot helpers


def encode_request(e: ev.Request, extended: bool = False) -> bytes:
    """Whole request (header + payload) as bytes: handy in tests and fault injection."""
    payload = bytes(e.payload) if e.payload is not None else b""
    return encode_request_header(e, extended) + payload


__all__ = [n for n in dir() if n.isupper() or n.startswith(("encode_", "decode_"))]

