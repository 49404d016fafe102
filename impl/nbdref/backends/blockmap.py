"""A per-block state array: the allocation map of the memory backend and the store of dirty bitmaps.

One byte per block of ``granularity`` bytes.  Runs of equal state are found with ``bytearray.find``
so that answering a block status request over a large export stays in C, not in a Python loop.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator


class BlockMap:
    """States of fixed-size blocks covering ``size`` bytes; thread-safe.

    Only blocks *fully* inside a range change state on ``set_full``; ``set_touched`` changes every block
    the range touches.  Callers pick the one that keeps the map a safe over-approximation.
    """

    def __init__(self, size: int, granularity: int, initial: int = 0) -> None:
        if granularity <= 0 or granularity & (granularity - 1):
            raise ValueError(f"granularity must be a power of 2, not {granularity}")
        self.size = size
        self.granularity = granularity
        self._states = bytearray([initial]) * (-(-size // granularity))
        self._lock = threading.Lock()

    def _blocks(self, offset: int, length: int, *, full: bool) -> tuple[int, int]:
        g = self.granularity
        end = min(offset + length, self.size)
        if full:
            first = -(-offset // g)
            last = end // g if end < self.size else -(-end // g)  # the short tail block counts as full
        else:
            first = offset // g
            last = -(-end // g)
        return first, max(first, last)

    def set_full(self, offset: int, length: int, state: int) -> None:
        """Set blocks lying wholly inside [offset, offset+length) (the export's tail block counts)."""
        first, last = self._blocks(offset, length, full=True)
        with self._lock:
            self._states[first:last] = bytes([state]) * (last - first)

    def set_touched(self, offset: int, length: int, state: int) -> None:
        """Set every block that [offset, offset+length) touches."""
        if length <= 0:
            return
        first, last = self._blocks(offset, length, full=False)
        with self._lock:
            self._states[first:last] = bytes([state]) * (last - first)

    def state_at(self, offset: int) -> int:
        return self._states[offset // self.granularity]

    def runs(self, offset: int, length: int) -> Iterator[tuple[int, int]]:
        """Yield (length, state) runs covering [offset, min(offset+length, size)), merged, in order.

        Only the blocks of the range are copied and scanned (a READ asks this for every request)."""
        end = min(offset + length, self.size)
        if offset >= end:
            return
        g = self.granularity
        first = offset // g
        with self._lock:
            states = bytes(self._states[first : -(-end // g)])
        alphabet = set(states)
        others = {s: [o for o in alphabet if o != s] for s in alphabet}
        pos = offset
        while pos < end:
            i = pos // g - first
            s = states[i]
            nxt = len(states)
            for o in others[s]:
                j = states.find(o, i + 1)
                if j != -1 and j < nxt:
                    nxt = j
            run_end = min((first + nxt) * g, end)
            yield run_end - pos, s
            pos = run_end

    def clear(self, state: int = 0) -> None:
        with self._lock:
            self._states[:] = bytes([state]) * len(self._states)
