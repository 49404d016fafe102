"""Transmission phase, server side: check a request against what the backend and negotiation allow,
run it, and build the reply events.  No I/O: the session sends what ``execute`` returns.

Error choices follow proto.md "Error values": EINVAL for unknown commands and flags, reads/trims past
the end and misalignment; ENOSPC for writes past the end; EPERM for writes to a read-only export;
EOVERFLOW for oversize effect lengths and DF reads that do not fit; ENOTSUP only for FAST_ZERO.
"""

from __future__ import annotations

import errno
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace

from .. import _wire as w
from .. import events as ev
from .. import requirements
from .._constants import (
    COMMAND_NEEDS_TXFLAG,
    CONTEXT_BASE_ALLOCATION,
    CONTEXT_QEMU_ALLOCATION_DEPTH,
    CONTEXT_QEMU_DIRTY_BITMAP_PREFIX,
    DEFAULT_MAX_PAYLOAD,
    FLAG_NEEDS_TXFLAG,
    MAX_EXTENTS_PER_CHUNK,
    VALID_CMD_FLAGS,
    Cmd,
    CmdFlag,
    Err,
)
from ..backends import STATE_ZERO, BackendError
from ._export import Export
from ._options import Negotiation

# Command flags as plain ints: IntFlag operators cost microseconds on the per-request path.
_FUA, _NO_HOLE, _DF = int(CmdFlag.FUA), int(CmdFlag.NO_HOLE), int(CmdFlag.DF)
_REQ_ONE, _FAST_ZERO, _PAYLOAD_LEN = int(CmdFlag.REQ_ONE), int(CmdFlag.FAST_ZERO), int(CmdFlag.PAYLOAD_LEN)
# Which commands and command flags need which transmission flag: the core's tables COMMAND_NEEDS_TXFLAG
# and FLAG_NEEDS_TXFLAG (CMD-008; we never advertise SEND_RESIZE, so RESIZE is never enabled).

# The core's table of requests a correct server refuses: ServerConnection.refusals.
Refusals = Callable[[ev.Request], list[tuple[str, int | None]]]

_ERRNO_TO_NBD = {
    errno.EPERM: Err.EPERM, errno.EROFS: Err.EPERM, errno.EACCES: Err.EPERM,
    errno.EIO: Err.EIO, errno.ENOMEM: Err.ENOMEM, errno.EINVAL: Err.EINVAL,
    errno.ENOSPC: Err.ENOSPC, errno.EDQUOT: Err.ENOSPC, errno.EFBIG: Err.ENOSPC,
    errno.EOVERFLOW: Err.EOVERFLOW, errno.ENOTSUP: Err.ENOTSUP, errno.ESHUTDOWN: Err.ESHUTDOWN,
}

# READ replies of this size range are read into a buffer kept per worker thread (backends with
# ``reads_into``, e.g. files: preadv, no allocation per request).  Smaller ones: a bytes object costs the
# same, and the transcript may keep it whole.  Larger ones: a kept buffer would pin that much per worker.
REUSE_MIN, REUSE_MAX = 16 << 10, 8 << 20



class RequestError(Exception):
    """Answer the request with this NBD error (and a message in structured error chunks)."""

    def __init__(self, error: int, message: str) -> None:
        super().__init__(message)
        self.error = error
        self.message = message


@dataclass(slots=True)
class ReadShape:
    """How reads are cut into chunks: test knobs for client reassembly."""

    chunk_size: int = 0          # >0: split data into chunks of at most this many bytes
    reverse: bool = False        # send content chunks last-to-first


class Executor:
    """Runs requests for one connection on one export (thread-safe: no per-request state).

    ``refusals`` is the core's ``ServerConnection.refusals`` (called under the session's lock): the
    "Error values" rules live there once; ``check`` adds only what depends on this server's choices.
    READ replies may point into a buffer kept for the calling thread: send what ``execute`` returns
    before the same thread calls it again (the session does: each worker sends its own reply).
    """

    def __init__(self, export: Export, nego: Negotiation, shape: ReadShape | None = None, *,
                 refusals: Refusals) -> None:
        self.export = export
        self.nego = nego
        self.persona = nego.persona
        self.shape = shape or ReadShape()
        self.refusals = refusals
        self.flags = nego.transmission_flags(export)
        self._allowed = {int(c): self._allowed_flags(c) for c in VALID_CMD_FLAGS if c != Cmd.DISC}
        self._enabled = {int(c): c not in COMMAND_NEEDS_TXFLAG or bool(self.flags & COMMAND_NEEDS_TXFLAG[c])
                         for c in VALID_CMD_FLAGS}
        # Enforced: the export's own constraints (advertised on every GO; agreed out of band for
        # NBD_OPT_EXPORT_NAME) and the persona's when they were advertised, i.e. requested with GO.
        # "The server SHOULD report an NBD_EINVAL error if the client's request is not aligned to
        # advertised minimum block size boundaries"; unadvertised, "a server SHOULD support a default
        # minimum block size of 1".
        self.enforced = nego.enforced_block_size(export)
        self.max_payload = self.enforced[2] if self.enforced else DEFAULT_MAX_PAYLOAD
        self._buffers = threading.local()  # .buf: this thread's READ reply buffer (see REUSE_MIN)

    @property
    def structured(self) -> bool:
        return self.nego.structured or self.nego.extended

    # ----------------------------------------------------------------- checks

    def _allowed_flags(self, cmd: int) -> int:
        """Flags documented for ``cmd`` whose transmission flag (if any) was advertised."""
        allowed = int(VALID_CMD_FLAGS[Cmd(cmd)])
        for flag, needs in FLAG_NEEDS_TXFLAG.items():
            if not self.flags & needs:
                allowed &= ~int(flag)
        if not self.nego.extended:
            allowed &= ~int(CmdFlag.PAYLOAD_LEN)
        return allowed

    def check(self, req: ev.Request) -> None:
        """Raise RequestError for anything the spec says to refuse; return if the request may run.

        First the core's table (unknown command or flag, read-only, past the end, misaligned to the
        advertised minimum, no meta context); then what only this server knows (which flags and
        commands it advertised, its payload limits).  Plain ints, not IntFlag operations: this runs
        for every request (the benchmark path)."""
        for req_id, error in self.refusals(req):
            if error is not None:  # None = "any error" (WR-001); a later rule of the list names one
                raise RequestError(error, f"{req_id}: {requirements.text(req_id)}")
        cmd, flags, off, length = int(req.command), int(req.flags), req.offset, req.length
        size = self.export.size
        allowed = self._allowed.get(cmd, 0)  # unknown commands were refused above (ERR-008)
        if flags & ~allowed:
            # Undocumented flags were refused above (ERR-009/010); FUA/DF/FAST_ZERO also need their
            # transmission flag, PAYLOAD_LEN extended headers: "SHOULD return NBD_EINVAL".
            raise RequestError(Err.EINVAL, f"flags {flags & ~allowed:#x} need a transmission flag that was "
                                           "not advertised")
        if not self._enabled.get(cmd, False):
            raise RequestError(Err.EINVAL, f"command {cmd} not advertised")
        if cmd == Cmd.FLUSH:
            # "length and offset are reserved, and MUST be set to all-zero" (the core records it).
            return
        if cmd == Cmd.BLOCK_STATUS:
            if not self.structured:
                raise RequestError(Err.EINVAL, "block status needs structured replies")
            if flags & _PAYLOAD_LEN:
                length = self._payload_form(req)[0]
        if off > size or length > size - off:
            # The core's table names READ/WRITE/TRIM/WRITE_ZEROES and BLOCK_STATUS by request length;
            # this covers CACHE and the effect length of a BLOCK_STATUS payload.  Writes past the end:
            # ENOSPC; the rest: EINVAL ("Error values").
            err = Err.ENOSPC if cmd in (Cmd.WRITE, Cmd.WRITE_ZEROES) else Err.EINVAL
            raise RequestError(err, f"offset {off} + length {length} beyond export size {size}")
        if self.enforced:
            mn = self.enforced[0]
            if off % mn or (length % mn and off + length != size):
                # The core's table checks READ/WRITE against the advertised minimum; this covers the
                # other commands and export constraints agreed out of band (NBD_OPT_EXPORT_NAME).
                # "The server SHOULD report an NBD_EINVAL error if the client's request is not aligned".
                raise RequestError(Err.EINVAL, f"request not aligned to minimum block size {mn}")
        if cmd == Cmd.WRITE or (cmd == Cmd.READ and not self.structured):
            # "the client MUST NOT request a length larger than the maximum payload size".
            if length > self.max_payload:
                raise RequestError(Err.EINVAL, f"payload {length} exceeds maximum {self.max_payload}")
        elif cmd == Cmd.READ and length > max(self.max_payload, DEFAULT_MAX_PAYLOAD):
            # Structured reads: "the server is also permitted to reject large read requests up front
            # with NBD_EOVERFLOW" (proto.md, NBD_CMD_READ); documented, so ERR-006 allows it.
            raise RequestError(Err.EOVERFLOW, f"read of {length} bytes is too large")
        if cmd == Cmd.READ and flags & _DF and length > 0xFFFFFFFF - 8:
            raise RequestError(Err.EOVERFLOW, "too large to send unfragmented")

    @staticmethod
    def _payload_form(req: ev.Request) -> tuple[int, tuple[int, ...]]:
        """(effect length, context ids) of a BLOCK_STATUS in payload form (decoded by the codec)."""
        form = w.decode_block_status_payload(req.payload if req.payload is not None else b"")
        if form is None:
            # "The payload form MUST occupy 8 + n*4 bytes" (EXT-056, the client's): "SHOULD return NBD_EINVAL".
            raise RequestError(Err.EINVAL, "block status payload must be 8 + 4n bytes")
        return form

    # ----------------------------------------------------------------- running

    def execute(self, req: ev.Request) -> list[ev.Event]:
        """The reply events for ``req`` (errors included)."""
        try:
            self.check(req)
            return self._run(req)
        except RequestError as e:
            return self.error_reply(req, e.error, e.message)
        except BackendError as e:
            return self.error_reply(req, _ERRNO_TO_NBD.get(e.errno, Err.EIO), str(e))

    def error_reply(self, req: ev.Request, error: int, message: str) -> list[ev.Event]:
        if self.structured:
            msg = message if self.persona.error_messages else ""
            return [ev.ErrorChunk(cookie=req.cookie, done=True, error=error, message=msg[:4096])]
        return [ev.SimpleReply(cookie=req.cookie, error=error)]

    def _ok(self, req: ev.Request) -> list[ev.Event]:
        if self.structured:
            return [ev.NoneChunk(cookie=req.cookie, done=True)]
        return [ev.SimpleReply(cookie=req.cookie, error=0)]

    def _run(self, req: ev.Request) -> list[ev.Event]:
        cmd, flags = int(req.command), int(req.flags)
        b, x = self.export.backend, self.export
        fua = bool(flags & _FUA)
        if cmd == Cmd.READ:
            return self._read(req)
        if cmd == Cmd.WRITE:
            b.pwrite(req.offset, req.payload if req.payload is not None else b"", fua=fua)
            x.mark_dirty(req.offset, req.length)
        elif cmd == Cmd.TRIM:
            b.trim(req.offset, req.length, fua=fua)
            x.mark_dirty(req.offset, req.length)
        elif cmd == Cmd.WRITE_ZEROES:
            may_trim = not flags & _NO_HOLE
            if flags & _FAST_ZERO and not b.fast_zero_possible(req.offset, req.length, may_trim=may_trim):
                # "MUST fail quickly with an error of NBD_ENOTSUP".
                raise RequestError(Err.ENOTSUP, "zeroing would not be faster than writing")
            b.zero(req.offset, req.length, may_trim=may_trim, fua=fua, fast=bool(flags & _FAST_ZERO))
            x.mark_dirty(req.offset, req.length)
        elif cmd == Cmd.FLUSH:
            b.flush()
        elif cmd == Cmd.CACHE:
            b.cache(req.offset, req.length)
        elif cmd == Cmd.BLOCK_STATUS:
            return self._block_status(req)
        return self._ok(req)

    # ----------------------------------------------------------------- READ

    def _reader(self, off: int, length: int) -> Callable[[int, int], bytes | memoryview]:
        """A function giving the data of [p, p+m) within the read [off, off+length): straight from
        ``pread``, or read into this thread's reused reply buffer when the backend can fill one."""
        b = self.export.backend
        if not b.reads_into or not REUSE_MIN <= length <= REUSE_MAX or self.shape.chunk_size:
            return b.pread  # (chunk_size: tiny chunks would sit in the transcript as views of the buffer)
        buf = getattr(self._buffers, "buf", None)
        if buf is None or len(buf) < length:
            buf = self._buffers.buf = bytearray(1 << (length - 1).bit_length())  # never resized: views live
        view = memoryview(buf)

        def fill(p: int, m: int) -> bytes | memoryview:
            if m < REUSE_MIN:  # a sliver between holes: bytes of its own (the transcript keeps it whole)
                return b.pread(p, m)
            v = view[p - off : p - off + m]
            b.pread_into(p, v)
            return v

        return fill

    def _read(self, req: ev.Request) -> list[ev.Event]:
        off, length, cookie = req.offset, req.length, req.cookie
        b = self.export.backend
        if not self.structured:
            return [ev.SimpleReply(cookie=cookie, error=0, data=self._reader(off, length)(off, length))]
        if length == 0:
            # "The client SHOULD NOT request a read length of 0 ... the server SHOULD NOT disconnect".
            return [ev.NoneChunk(cookie=cookie, done=True)]
        read = self._reader(off, length)
        if int(req.flags) & _DF or (not self.persona.offset_hole and not self.shape.chunk_size):
            # DF: "If this flag is set, the server MUST send at most one content chunk".  Otherwise, with
            # no holes to report and no splitting asked for, one chunk is also the fast path.
            return [ev.OffsetData(cookie=cookie, done=True, offset=off, data=read(off, length))]
        pieces: list[tuple[int, int, bool]] = []  # (offset, length, is_hole)
        if self.persona.offset_hole:
            pos = off
            for n, flags in b.extents(off, length):
                n = min(n, off + length - pos)
                hole = bool(flags & STATE_ZERO)  # reads as zeroes: an OFFSET_HOLE chunk says exactly that
                if pieces and pieces[-1][2] == hole:
                    o, m, h = pieces[-1]
                    pieces[-1] = (o, m + n, h)
                else:
                    pieces.append((pos, n, hole))
                pos += n
                if pos >= off + length:
                    break
            if pos < off + length:
                pieces.append((pos, off + length - pos, False))
        else:
            pieces.append((off, length, False))
        if len(pieces) == 1 and not pieces[0][2] and not self.shape.chunk_size:
            # All data (a fully written file): one chunk, as above.
            return [ev.OffsetData(cookie=cookie, done=True, offset=off, data=read(off, length))]
        step = self.shape.chunk_size
        chunks: list[ev.Event] = []
        for o, n, hole in pieces:
            if hole:
                chunks.extend(ev.OffsetHole(cookie=cookie, done=False, offset=p, length=m)
                              for p, m in _split(o, n, 0xFFFFFFFF))
            else:
                data = memoryview(read(o, n))  # one read per piece; its chunks are slices of it
                chunks.extend(ev.OffsetData(cookie=cookie, done=False, offset=p, data=data[p - o : p - o + m])
                              for p, m in _split(o, n, step or 0xFFFFFFF0))
        if self.shape.reverse:
            chunks.reverse()
        last = chunks[-1]
        chunks[-1] = _with_done(last)
        return chunks

    # ----------------------------------------------------------------- BLOCK_STATUS

    def _block_status(self, req: ev.Request) -> list[ev.Event]:
        off, length = req.offset, req.length
        ids = list(self.nego.contexts)
        if req.flags & _PAYLOAD_LEN:
            length, wanted = self._payload_form(req)
            # "detects duplicate or unknown metacontext ids ... MUST ... fail with NBD_EINVAL".
            if len(set(wanted)) != len(wanted) or any(i not in self.nego.contexts for i in wanted):
                raise RequestError(Err.EINVAL, "duplicate or unknown context id in payload")
            ids = wanted or ids
        length = max(length, 1) if off < self.export.size else length
        chunks: list[ev.Event] = []
        for cid in ids:
            extents = self._extents(self.nego.contexts[cid], off, length)
            if req.flags & _REQ_ONE or self.persona.block_status_single_extent:
                # REQ_ONE: "exactly one descriptor where the length ... MUST NOT be greater than the length".
                n, f = extents[0]
                extents = [(min(n, max(length, 1)), f)]
            if not self.nego.extended:
                extents = [(min(n, 0xFFFFFFFF & ~0xFFF), f) for n, f in extents[:MAX_EXTENTS_PER_CHUNK]]
            chunks.append(ev.BlockStatus(cookie=req.cookie, done=False, context_id=cid, extents=tuple(extents)))
        if not chunks:
            return self._ok(req)
        chunks[-1] = _with_done(chunks[-1])
        return chunks

    def _extents(self, context: str, off: int, length: int) -> list[tuple[int, int]]:
        b = self.export.backend
        if context == CONTEXT_BASE_ALLOCATION:
            ext = b.extents(off, length)
        elif context == CONTEXT_QEMU_ALLOCATION_DEPTH:
            ext = b.allocation_depth(off, length)
        elif context.startswith(CONTEXT_QEMU_DIRTY_BITMAP_PREFIX):
            ext = self.export.dirty_bitmaps[context[len(CONTEXT_QEMU_DIRTY_BITMAP_PREFIX):]].extents(off, length)
        else:  # pragma: no cover - contexts are only ever ours
            raise RequestError(Err.EINVAL, f"unknown context {context}")
        if not ext:  # zero-length query at the very end: one descriptor is still required
            ext = [(1, 0)]
        merged: list[tuple[int, int]] = []
        for n, f in ext:
            if merged and merged[-1][1] == f:
                merged[-1] = (merged[-1][0] + n, f)
            else:
                merged.append((n, f))
        return merged


def _split(offset: int, length: int, step: int):
    pos, end = offset, offset + length
    while pos < end:
        n = min(step, end - pos)
        yield pos, n
        pos += n


def _with_done(chunk: ev.Event) -> ev.Event:
    return replace(chunk, done=True)  # type: ignore[type-var]
