"""Named dirty bitmaps, exposed as ``qemu:dirty-bitmap:<name>`` (qemu-nbd-interop.txt).

"bit 0: NBD_STATE_DIRTY, set when the extent is 'dirty'".  Writes, trims and write-zeroes set the bit on
every block they touch (a partial block is dirty too); ``clear()`` starts a new backup epoch.
"""

from __future__ import annotations

from .._constants import CONTEXT_QEMU_DIRTY_BITMAP_PREFIX
from .blockmap import BlockMap

STATE_DIRTY = 1


class DirtyBitmap:
    """One bitmap; shared by every connection to the export, like qemu's (multi-conn consistent)."""

    def __init__(self, name: str, size: int, granularity: int = 65536) -> None:
        self.name = name
        self._map = BlockMap(size, granularity, 0)

    @property
    def granularity(self) -> int:
        return self._map.granularity

    @property
    def context(self) -> str:
        return CONTEXT_QEMU_DIRTY_BITMAP_PREFIX + self.name

    def mark(self, offset: int, length: int) -> None:
        self._map.set_touched(offset, length, STATE_DIRTY)

    def extents(self, offset: int, length: int) -> list[tuple[int, int]]:
        return list(self._map.runs(offset, length))

    def clear(self) -> None:
        self._map.clear(0)
