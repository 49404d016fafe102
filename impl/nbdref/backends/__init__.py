"""Storage behind the reference server's exports: RAM and sparse files, plus dirty bitmaps.

Backends know bytes and allocation only; the server maps them onto the protocol.
"""

from .base import STATE_HOLE, STATE_ZERO, Backend, BackendError
from .bitmap import DirtyBitmap
from .blockmap import BlockMap
from .file import FileBackend
from .memory import MemoryBackend

__all__ = [
    "STATE_HOLE",
    "STATE_ZERO",
    "Backend",
    "BackendError",
    "BlockMap",
    "DirtyBitmap",
    "FileBackend",
    "MemoryBackend",
]
