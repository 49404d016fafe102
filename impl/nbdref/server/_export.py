"""Exports: what the server offers under a name.  Plain config objects, shared by every connection.

Sharing one ``Export`` (and so one backend and one set of dirty bitmaps) across connections is what
makes NBD_FLAG_CAN_MULTI_CONN honest: "a flush on one connection makes all writes visible on all".
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field

from ..backends import Backend, DirtyBitmap, FileBackend, MemoryBackend


@dataclass(kw_only=True, eq=False)
class Export:
    """One named export.

    ``block_size`` (minimum, preferred, maximum payload) overrides the persona's NBD_INFO_BLOCK_SIZE and
    is *enforced*: unaligned or oversize requests get NBD_EINVAL.  ``block_size_required`` (needs
    ``block_size``) refuses NBD_OPT_GO without an NBD_INFO_BLOCK_SIZE request (NBD_REP_ERR_BLOCK_SIZE_REQD)
    and NBD_OPT_EXPORT_NAME (hard disconnect).  ``tls_only`` matters in SELECTIVETLS mode
    (``TLSConfig(mode="on")``).
    """

    name: str
    backend: Backend
    description: str = ""
    read_only: bool = False
    tls_only: bool = False
    block_size: tuple[int, int, int] | None = None
    block_size_required: bool = False
    bitmaps: Sequence[str] = ()
    bitmap_granularity: int = 65536
    multi_conn: bool = True
    rotational: bool = False
    dirty_bitmaps: dict[str, DirtyBitmap] = field(init=False)

    def __post_init__(self) -> None:
        if self.block_size is not None:
            check_block_size(self.block_size)
        elif self.block_size_required:
            # "The server SHOULD NOT send this error if it is using default size constraints".
            raise ValueError("block_size_required needs block_size (default constraints need no request)")
        self.dirty_bitmaps = {
            b: DirtyBitmap(b, self.backend.size, self.bitmap_granularity) for b in self.bitmaps
        }

    @property
    def size(self) -> int:
        return self.backend.size

    def mark_dirty(self, offset: int, length: int) -> None:
        for bitmap in self.dirty_bitmaps.values():
            bitmap.mark(offset, length)

    @classmethod
    def memory(cls, name: str = "", size: int = 64 << 20, **kw: object) -> Export:
        return cls(name=name, backend=MemoryBackend(size), **kw)  # type: ignore[arg-type]

    @classmethod
    def file(cls, name: str, path: str | os.PathLike[str], *, size: int | None = None, **kw: object) -> Export:
        ro = bool(kw.get("read_only", False))
        return cls(name=name, backend=FileBackend(path, size=size, read_only=ro), **kw)  # type: ignore[arg-type]


def check_block_size(bs: tuple[int, int, int]) -> None:
    """Refuse constraints the spec forbids a server to advertise (proto.md "Size constraints")."""
    mn, pref, mx = bs
    # "If advertised, this value MUST be a power of 2, MUST NOT be larger than 2^16"
    if mn < 1 or mn & (mn - 1) or mn > 1 << 16:
        raise ValueError(f"minimum block size {mn} must be a power of 2 <= 65536")
    # "this MUST be a power of 2 at least as large as the maximum of the minimum block size and 2^9"
    if pref & (pref - 1) or pref < max(mn, 512):
        raise ValueError(f"preferred block size {pref} must be a power of 2 >= max(minimum, 512)")
    # "MUST be at least as large as the preferred block size"
    if mx < pref or mx > 0xFFFFFFFF:
        raise ValueError(f"maximum payload {mx} must be >= preferred and fit in 32 bits")
