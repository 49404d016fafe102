"""Receive buffer with ``get_buffer()``/``buffer_updated()`` (like ``asyncio.BufferedProtocol``).

The bytearray is never resized while a memoryview of it may be alive (a driver commonly keeps the
last view in a local variable): compacting moves the unread bytes to the front with an equal-length
slice assignment, and growing allocates a new bytearray, so an old view stays valid and harmless.

It grows only for bytes that arrived or for the free space a caller asks for: the connection caps
what it asks for ahead of the data (``Connection.get_buffer``), so a length announced in a header
does not reserve memory here.  It starts small (64 KiB): a connection that only says hello costs that.
"""

from __future__ import annotations

from struct import Struct

_MIN_FREE = 64 * 1024


class ReceiveBuffer:
    """Unread bytes live in ``_buf[_start:_end]``; ``_buf[_end:]`` is free space."""

    __slots__ = ("_buf", "_end", "_start")

    def __init__(self, capacity: int = _MIN_FREE) -> None:
        self._buf = bytearray(capacity)
        self._start = 0
        self._end = 0

    def __len__(self) -> int:
        return self._end - self._start

    def _reserve(self, free: int) -> None:
        """Make sure ``free`` bytes are writable after ``_end`` (new bytearray if needed)."""
        if len(self._buf) - self._end >= free:
            return
        unread = self._end - self._start
        cap = len(self._buf)
        if unread + free <= cap:
            # Compact in place: a slice assignment of equal length never resizes, so live views of
            # the bytearray stay valid (they only see stale bytes, which nobody reads any more).
            self._buf[:unread] = self._buf[self._start : self._end]
            self._start, self._end = 0, unread
            return
        cap = max(cap * 2, unread + free)
        new = bytearray(cap)
        new[:unread] = memoryview(self._buf)[self._start : self._end]
        self._buf, self._start, self._end = new, 0, unread

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        n = len(data)
        self._reserve(n)
        self._buf[self._end : self._end + n] = data
        self._end += n

    def get_buffer(self, sizehint: int = -1) -> memoryview:
        """Writable free space of at least ``sizehint`` bytes (64 KiB when no hint)."""
        want = _MIN_FREE if sizehint is None or sizehint <= 0 else sizehint
        self._reserve(want)
        return memoryview(self._buf)[self._end :]

    def buffer_updated(self, nbytes: int) -> None:
        if nbytes < 0 or self._end + nbytes > len(self._buf):
            raise ValueError(f"buffer_updated({nbytes}) beyond the buffer handed out")
        self._end += nbytes

    def unpack(self, layout: Struct) -> tuple:
        """Unpack ``layout`` from the unread bytes without consuming them (caller checks the length)."""
        return layout.unpack_from(self._buf, self._start)

    def peek(self, n: int) -> bytes:
        return bytes(self._buf[self._start : self._start + min(n, len(self))])

    def take(self, n: int) -> bytes:
        """Consume and return ``n`` bytes (caller checks the length)."""
        out = bytes(self._buf[self._start : self._start + n])
        self.skip(n)
        return out

    def skip(self, n: int) -> None:
        self._start += n
        if self._start == self._end:
            self._start = self._end = 0

    def copy_into(self, target: memoryview, n: int) -> int:
        """Move up to ``n`` unread bytes into ``target``; returns how many were moved."""
        n = min(n, len(self))
        if n:
            target[:n] = memoryview(self._buf)[self._start : self._start + n]
            self.skip(n)
        return n

    def take_all(self) -> bytes:
        return self.take(len(self))
