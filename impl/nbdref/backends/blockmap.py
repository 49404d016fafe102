"""Allocation and dirty maps: a per-block state array (memory backend, dirty bitmaps) and a run list
(file backend).

``BlockMap``: one byte per block of ``granularity`` bytes.  Runs of equal state are found with
``bytearray.find`` so that answering a block status request over a large export stays in C, not in a
Python loop.  ``ExtentMap``: sorted runs, for files whose size makes a byte per block too dear.
"""

from __future__ import annotations

import threading
from bisect import bisect_right
from collections.abc import Iterable, Iterator


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


class ExtentMap:
    """States of [0, size) as sorted runs: the allocation map of the file backend.

    A per-block array (``BlockMap``) costs one byte per block, too much for a sparse multi-terabyte
    image; runs cost two list entries per extent, and a query is a bisect plus one step per run it
    returns.  ``set_full`` / ``set_touched`` round to ``granularity`` like BlockMap's, so the runs
    follow the file system's allocation blocks; ``set_exact`` takes boundaries as they are (a scan).
    """

    def __init__(self, size: int, granularity: int, initial: int = 0) -> None:
        if granularity <= 0 or granularity & (granularity - 1):
            raise ValueError(f"granularity must be a power of 2, not {granularity}")
        self.size = size
        self.granularity = granularity
        self._starts: list[int] = [0]   # run i covers [_starts[i], _starts[i+1]) (the last: up to size)
        self._states: list[int] = [initial]
        self._lock = threading.Lock()

    @classmethod
    def from_runs(cls, size: int, granularity: int, runs: Iterable[tuple[int, int]], rest: int = 0) -> ExtentMap:
        """A map of (length, state) runs laid end to end from 0; whatever they leave uncovered is ``rest``."""
        m = cls(size, granularity, rest)
        pos = 0
        for n, state in runs:
            m.set_exact(pos, pos + n, state)
            pos += n
        return m

    @property
    def run_count(self) -> int:
        return len(self._starts)

    def _full(self, offset: int, length: int, tail_full: bool = True) -> tuple[int, int]:
        g, end = self.granularity, offset + length
        first = -(-offset // g) * g
        # The short tail block counts as full if tail_full; else only if the range covers it, past EOF.
        last = self.size if tail_full and end >= self.size else min(end // g * g, self.size)
        return first, max(first, last)

    def _touched(self, offset: int, length: int) -> tuple[int, int]:
        g, end = self.granularity, min(offset + length, self.size)
        return offset // g * g, min(-(-end // g) * g, self.size)

    def set_full(self, offset: int, length: int, state: int, *, tail_full: bool = True) -> None:
        """Set the blocks lying wholly inside [offset, offset+length).  The export's short tail block
        counts as full when the range reaches EOF, unless ``tail_full`` is false: then it counts only
        if the range covers the whole block, past EOF (a punch ending at an unaligned EOF frees no
        block there, so a HOLE update must not claim it)."""
        self.set_exact(*self._full(offset, length, tail_full), state)

    def set_touched(self, offset: int, length: int, state: int) -> None:
        """Set every block that [offset, offset+length) touches."""
        if length > 0:
            self.set_exact(*self._touched(offset, length), state)

    def set_exact(self, start: int, end: int, state: int) -> None:
        """Set [start, end) (clipped to the map) to ``state``, merging with equal neighbours."""
        with self._lock:
            self._set(start, end, state)

    def replace_touched(self, offset: int, length: int, old: int, new: int) -> None:
        """Every block [offset, offset+length) touches that is in state ``old`` goes to ``new``."""
        if length <= 0:
            return
        start, end = self._touched(offset, length)
        with self._lock:
            for n, state in self._runs(start, end - start):
                if state == old:
                    self._set(start, start + n, new)
                start += n

    def _set(self, start: int, end: int, state: int) -> None:
        start, end = max(start, 0), min(end, self.size)
        if start >= end:
            return
        starts, states = self._starts, self._states
        i = bisect_right(starts, start) - 1          # the run holding ``start``
        j = bisect_right(starts, end) - 1            # the last run starting at or before ``end``
        lo = i + 1 if starts[i] < start else i
        new_starts, new_states = [start], [state]
        if end < self.size and starts[j] < end:      # ``end`` falls inside run j: keep its tail
            new_starts.append(end)
            new_states.append(states[j])
        hi = j + 1 if end >= self.size or starts[j] < end else j
        starts[lo:hi] = new_starts
        states[lo:hi] = new_states
        # Merge equal neighbours around the replaced stretch (everywhere else runs already differ).
        k = min(lo + len(new_starts), len(starts) - 1)
        while k > max(lo - 1, 0):
            if states[k] == states[k - 1]:
                del starts[k], states[k]
            k -= 1

    def runs(self, offset: int, length: int) -> list[tuple[int, int]]:
        """(length, state) runs covering [offset, min(offset+length, size)), merged, in order."""
        with self._lock:
            return self._runs(offset, length)

    def _runs(self, offset: int, length: int) -> list[tuple[int, int]]:
        end = min(offset + length, self.size)
        out: list[tuple[int, int]] = []
        starts, states = self._starts, self._states
        i = bisect_right(starts, offset) - 1
        pos, last = offset, len(starts) - 1
        while pos < end:
            run_end = min(starts[i + 1] if i < last else self.size, end)
            out.append((run_end - pos, states[i]))
            pos = run_end
            i += 1
        return out
