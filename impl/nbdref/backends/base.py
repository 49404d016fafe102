"""The interface every backend implements, and the error a backend raises to become an NBD error.

A backend knows bytes and allocation, nothing of the protocol: the server turns ``BackendError`` into an
``NBD_E*`` reply and base:allocation / qemu:allocation-depth extents into block status chunks.
"""

from __future__ import annotations

import errno
from abc import ABC, abstractmethod

# base:allocation flags (proto.md "base:allocation metadata context").
STATE_HOLE = 1
STATE_ZERO = 2


class BackendError(Exception):
    """An I/O failure the client should see as an error reply; ``errno`` is a host errno value."""

    def __init__(self, err: int, message: str = "") -> None:
        super().__init__(message or errno.errorcode.get(err, str(err)))
        self.errno = err


class Backend(ABC):
    """Bytes of one export.  Offsets and lengths are already checked against ``size`` by the server."""

    size: int
    #: Whether ``zero(may_trim=True)`` and ``trim`` really create holes (reported by block status).
    sparse: bool = True

    #: Whether ``pread_into`` beats ``pread``: the server then reads into buffers it reuses.
    reads_into: bool = False

    @abstractmethod
    def pread(self, offset: int, length: int) -> bytes | memoryview:
        """Data at [offset, offset+length); a memoryview of the store where possible (zero copy)."""

    def pread_into(self, offset: int, buf: memoryview) -> None:
        """Fill ``buf`` with the data at ``offset``: for stores that can read into memory the caller
        owns and reuses (a file: preadv), instead of allocating a fresh buffer per request."""
        memoryview(buf).cast("B")[:] = self.pread(offset, memoryview(buf).nbytes)

    @abstractmethod
    def pwrite(self, offset: int, data: bytes | memoryview, *, fua: bool = False) -> None: ...

    @abstractmethod
    def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        """Discard: afterwards the range reads as zeroes or as its old content (the spec allows both)."""

    @abstractmethod
    def zero(self, offset: int, length: int, *, may_trim: bool, fua: bool = False, fast: bool = False) -> None:
        """Make the range read as zeroes; ``may_trim`` False is NBD_CMD_FLAG_NO_HOLE (keep it allocated).
        ``fast`` is NBD_CMD_FLAG_FAST_ZERO: raise ``BackendError(ENOTSUP)`` rather than fall back to
        anything as slow as writing zeroes ("MUST fail quickly with NBD_ENOTSUP")."""

    def fast_zero_possible(self, offset: int, length: int, *, may_trim: bool) -> bool:
        """NBD_CMD_FLAG_FAST_ZERO: can ``zero`` be done without falling back to writing zeroes?"""
        return may_trim and self.sparse

    def flush(self) -> None:  # noqa: B027 - a no-op is the right default for volatile stores
        """Make every completed write durable (and visible to every connection: multi-conn)."""

    def cache(self, offset: int, length: int) -> None:  # noqa: B027 - a hint; ignoring it is correct
        """NBD_CMD_CACHE: prefetch."""

    @abstractmethod
    def extents(self, offset: int, length: int) -> list[tuple[int, int]]:
        """base:allocation: (length, STATE_* flags) covering [offset, ...), at least up to offset+length
        or the export end, whichever comes first.  Lengths are never zero."""

    def allocation_depth(self, offset: int, length: int) -> list[tuple[int, int]]:
        """qemu:allocation-depth: 0 unallocated, 1 this layer (no backing chains here)."""
        return [(n, 0 if flags & STATE_HOLE else 1) for n, flags in self.extents(offset, length)]

    def close(self) -> None:  # noqa: B027
        """Release OS resources."""
