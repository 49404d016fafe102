"""RAM-backed export whose allocation is real: anonymous mmap pages, dropped with MADV_DONTNEED.

Reads return memoryview slices of the mapping, so the server can hand them to ``socket.sendmsg``
without a copy (the benchmark path).  Untouched pages read as zero and take no memory.
"""

from __future__ import annotations

import mmap
import threading

from .base import STATE_HOLE, STATE_ZERO, Backend
from .blockmap import BlockMap

# Allocation map states.
_HOLE, _DATA, _ZERO = 0, 1, 2
_FLAGS = {_HOLE: STATE_HOLE | STATE_ZERO, _DATA: 0, _ZERO: STATE_ZERO}
_ZERO_CHUNK = bytes(1 << 20)


class MemoryBackend(Backend):
    """``size`` bytes of zeroes to start with; every block starts as a hole."""

    def __init__(self, size: int, *, granularity: int = mmap.PAGESIZE, data: bytes | None = None) -> None:
        if size < 0:
            raise ValueError("size must be >= 0")
        self.size = size
        # MAP_PRIVATE: MADV_DONTNEED on a private anonymous mapping gives back zero pages (madvise(2)).
        flags = mmap.MAP_PRIVATE | getattr(mmap, "MAP_ANONYMOUS", 0x20)
        self._map = mmap.mmap(-1, size, flags=flags) if size else None
        self._view = memoryview(self._map) if self._map is not None else memoryview(b"")
        self._alloc = BlockMap(size, granularity, _HOLE)
        self._lock = threading.Lock()
        if data:
            self.pwrite(0, data[:size])

    def pread(self, offset: int, length: int) -> memoryview:
        return self._view[offset : offset + length]

    def pwrite(self, offset: int, data: bytes | memoryview, *, fua: bool = False) -> None:
        n = len(data)
        self._view[offset : offset + n] = data
        self._alloc.set_touched(offset, n, _DATA)

    def _zero_bytes(self, offset: int, length: int, *, release: bool) -> None:
        """Zero the range; with ``release``, page-aligned parts are handed back to the kernel."""
        end = offset + length
        if release and self._map is not None and hasattr(mmap, "MADV_DONTNEED"):
            p = mmap.PAGESIZE
            a, b = -(-offset // p) * p, (end // p) * p
            if b > a:
                # For private anonymous mappings the next access sees zero-filled pages (madvise(2)).
                self._map.madvise(mmap.MADV_DONTNEED, a, b - a)
                self._zero_bytes(offset, a - offset, release=False)
                self._zero_bytes(b, end - b, release=False)
                return
        pos = offset
        while pos < end:
            n = min(len(_ZERO_CHUNK), end - pos)
            self._view[pos : pos + n] = _ZERO_CHUNK[:n]
            pos += n

    def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        # Zeroing on trim is allowed ("the server MAY ... read as zeroes") and keeps reads predictable.
        self.zero(offset, length, may_trim=True)

    def zero(self, offset: int, length: int, *, may_trim: bool, fua: bool = False, fast: bool = False) -> None:
        with self._lock:
            self._zero_bytes(offset, length, release=may_trim)
            self._alloc.set_full(offset, length, _HOLE if may_trim else _ZERO)

    def fast_zero_possible(self, offset: int, length: int, *, may_trim: bool) -> bool:
        return True  # zeroing RAM never falls back to anything slower

    def extents(self, offset: int, length: int) -> list[tuple[int, int]]:
        return [(n, _FLAGS[s]) for n, s in self._alloc.runs(offset, length)]

    def close(self) -> None:
        try:
            self._view.release()
            if self._map is not None:
                self._map.close()
        except BufferError:  # a reply still holds a slice; the GC frees the mapping later
            pass
