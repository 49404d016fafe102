"""Sparse-file export: allocation as the filesystem reports it, read once at open and then kept.

SEEK_DATA / SEEK_HOLE run at open only (at most ``MAX_SCAN_RUNS`` runs; the rest counts as data),
into an ``ExtentMap`` that this backend's own writes, trims and zeroes keep up to date.  Asking the
file system per request was quadratic on tmpfs, where each seek walks the page cache from the offset
to the next boundary (6 ms per seek on a fully written 1 GiB file, two seeks per READ).  The map
follows the file system's block size, so it agrees with a fresh scan (tested on tmpfs and ext4):
writes allocate every block they touch, punching frees only whole blocks.  Where it cannot agree it
errs on the safe side (data where the file may have a hole, never a hole where it has data).  NO_HOLE zeroes
are reported as allocated zeroes (STATE_ZERO), whatever the filesystem did to make them.  Changes
other processes make to the file are not seen until ``refresh()``.

Trim and write-zeroes without NO_HOLE punch holes with fallocate(FALLOC_FL_PUNCH_HOLE), so
base:allocation reports real holes, which is what clients like ``qemu-img map`` and ``nbdinfo --map``
are tested against.  Where the filesystem cannot punch (or, with NO_HOLE, zero a range: tmpfs has no
FALLOC_FL_ZERO_RANGE), zeroes are written (still correct, less sparse), except for NBD_CMD_FLAG_FAST_ZERO,
which fails with ENOTSUP instead; a mode the filesystem refused once is refused quickly after that.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import threading

from .base import STATE_HOLE, STATE_ZERO, Backend, BackendError
from .blockmap import ExtentMap

# linux/falloc.h
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

_ZERO_CHUNK = bytes(1 << 20)

# Allocation map states (as in the memory backend) and the base:allocation flags they stand for.
_HOLE, _DATA, _ZERO = 0, 1, 2
_FLAGS = {_HOLE: STATE_HOLE | STATE_ZERO, _DATA: 0, _ZERO: STATE_ZERO}
# Bound on the scan at open: a file fragmented beyond this many runs counts as data after them.
MAX_SCAN_RUNS = 1 << 20


def _libc_fallocate():  # -> callable | None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.fallocate
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong]
    fn.restype = ctypes.c_int
    return fn


_fallocate = _libc_fallocate()


def fallocate(fd: int, mode: int, offset: int, length: int) -> bool:
    """fallocate(2); False when the filesystem or libc cannot do ``mode`` (caller falls back)."""
    if _fallocate is None or length <= 0:
        return length <= 0
    if _fallocate(fd, mode, offset, length) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
        return False
    raise BackendError(err, f"fallocate: {os.strerror(err)}")


def _block_size(fd: int) -> int:
    """The file system's allocation unit (the map's granularity): f_bsize, if a sane power of 2."""
    try:
        bs = os.fstatvfs(fd).f_bsize
    except OSError:
        return 4096
    return bs if 512 <= bs <= 1 << 20 and not bs & (bs - 1) else 4096


def scan_allocation(fd: int, size: int, *, limit: int = MAX_SCAN_RUNS) -> list[tuple[int, int]]:
    """(length, _HOLE or _DATA) runs of [0, size) by SEEK_DATA / SEEK_HOLE: at most ``limit`` of them
    from the file system, then one data run for the rest (data is never wrong, only less sparse).
    Without SEEK_DATA support everything is data."""
    seek_data, seek_hole = getattr(os, "SEEK_DATA", None), getattr(os, "SEEK_HOLE", None)
    if seek_data is None or seek_hole is None:
        return [(size, _DATA)] if size else []
    runs: list[tuple[int, int]] = []
    pos = 0
    while pos < size:
        if len(runs) >= limit:
            runs.append((size - pos, _DATA))
            break
        try:
            data = os.lseek(fd, pos, seek_data)
        except OSError as e:
            if e.errno != errno.ENXIO:  # ENXIO: no data after pos; anything else: assume data
                runs.append((size - pos, _DATA))
                break
            data = size
        data = min(data, size)
        if data > pos:
            runs.append((data - pos, _HOLE))
            pos = data
            continue
        try:
            hole = min(os.lseek(fd, pos, seek_hole), size)
        except OSError:
            hole = size
        hole = max(hole, pos + 1)  # never loop on a file system that answers pos for both
        runs.append((hole - pos, _DATA))
        pos = hole
    return runs


class FileBackend(Backend):
    """A file opened for the lifetime of the backend; ``size`` creates or extends it sparsely (never
    shrinks it)."""

    def __init__(self, path: str | os.PathLike[str], *, size: int | None = None, read_only: bool = False) -> None:
        self.path = os.fspath(path)
        flags = os.O_RDONLY if read_only else os.O_RDWR | os.O_CREAT
        self._fd = os.open(self.path, flags | getattr(os, "O_CLOEXEC", 0), 0o644)
        current = os.fstat(self._fd).st_size
        if size is not None and not read_only and current != size:
            if current > size:  # never cut an existing image short
                os.close(self._fd)
                raise ValueError(f"{self.path} is {current} bytes, larger than the requested size {size}")
            os.ftruncate(self._fd, size)  # sparse: the new tail is a hole
        self.size = os.fstat(self._fd).st_size
        self.read_only = read_only
        self._lock = threading.Lock()
        self._unsupported: set[int] = set()  # fallocate modes this file's filesystem refused
        self.granularity = _block_size(self._fd)  # the map's unit: the file system's block
        self._map = self._scan()

    def _scan(self) -> ExtentMap:
        runs = scan_allocation(self._fd, self.size, limit=MAX_SCAN_RUNS)
        return ExtentMap.from_runs(self.size, self.granularity, runs, _DATA)

    def refresh(self) -> None:
        """Scan the file again: after another process changed it behind this backend's back."""
        self._map = self._scan()

    def _io(self, what: str, fn, *args):
        try:
            return fn(*args)
        except OSError as e:
            raise BackendError(e.errno or errno.EIO, f"{what}: {e.strerror}") from e

    def pread(self, offset: int, length: int) -> bytes:
        data = self._io("pread", os.pread, self._fd, length, offset)
        if len(data) < length:  # the file shrank under us: the rest reads as zeroes
            data += bytes(length - len(data))
        return data

    reads_into = True

    def pread_into(self, offset: int, buf: memoryview) -> None:
        """preadv(2) straight into the caller's (reused) buffer: no allocation, no copy in Python."""
        view = memoryview(buf).cast("B")
        while view:
            n = self._io("preadv", os.preadv, self._fd, [view], offset)
            if n == 0:  # the file shrank under us: the rest reads as zeroes
                view[:] = bytes(len(view))
                return
            view, offset = view[n:], offset + n

    def pwrite(self, offset: int, data: bytes | memoryview, *, fua: bool = False) -> None:
        # Every mutation does its system call and its map update under ``self._lock``: otherwise a
        # zero's HOLE / ZERO update could land after an overlapping write's DATA, over real data.
        with self._lock:
            self._pwrite_locked(offset, data)
        if fua:
            self.flush()

    def _pwrite_locked(self, offset: int, data: bytes | memoryview) -> None:
        view = memoryview(data).cast("B")
        start, n = offset, view.nbytes
        try:
            while view:
                done = self._io("pwrite", os.pwrite, self._fd, view, offset)
                view, offset = view[done:], offset + done
        finally:
            # Even a failed write may have allocated blocks: data is the safe answer for all it touched.
            if not self.read_only:
                self._map.set_touched(start, n, _DATA)

    def _write_zeroes(self, offset: int, length: int) -> None:
        end = offset + length
        while offset < end:
            n = min(len(_ZERO_CHUNK), end - offset)
            self._pwrite_locked(offset, _ZERO_CHUNK[:n])  # the caller holds self._lock
            offset += n

    def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        self.zero(offset, length, may_trim=True, fua=fua)

    @staticmethod
    def _zero_mode(may_trim: bool) -> int:
        return (FALLOC_FL_PUNCH_HOLE if may_trim else FALLOC_FL_ZERO_RANGE) | FALLOC_FL_KEEP_SIZE

    def zero(self, offset: int, length: int, *, may_trim: bool, fua: bool = False, fast: bool = False) -> None:
        mode = self._zero_mode(may_trim)
        with self._lock:
            done = mode not in self._unsupported and fallocate(self._fd, mode, offset, length)
            if not done and length > 0:
                self._unsupported.add(mode)
                if fast:
                    # "MUST fail quickly with an error of NBD_ENOTSUP unless the request can be serviced in
                    # less time than a corresponding NBD_CMD_WRITE": writing zeroes is not that.
                    raise BackendError(errno.ENOTSUP, "fast zero: the file system cannot zero this range")
                self._write_zeroes(offset, length)  # marks what it touches as data
            # Whole blocks only: a punch frees no partial block, and a partial block may hold data
            # outside the range.  A punched range is a hole.  Zeroes written or ZERO_RANGE'd are
            # allocated zeroes (ext4 calls unwritten extents holes; NO_HOLE asked for allocation), and
            # so is a partial block that was a hole (ext4's ZERO_RANGE allocates it, writing does too).
            # A punch up to an unaligned EOF does not cover the short tail block: it stays as it was.
            if done and may_trim:
                self._map.set_full(offset, length, _HOLE, tail_full=False)
            else:
                self._map.set_full(offset, length, _ZERO)
                self._map.replace_touched(offset, length, _HOLE, _ZERO)
        if fua:
            self.flush()

    def fast_zero_possible(self, offset: int, length: int, *, may_trim: bool) -> bool:
        # Optimistic until the file system refuses the mode once; zero(fast=True) then fails quickly.
        return _fallocate is not None and self._zero_mode(may_trim) not in self._unsupported

    def flush(self) -> None:
        self._io("fdatasync", os.fdatasync, self._fd)

    def cache(self, offset: int, length: int) -> None:
        if hasattr(os, "posix_fadvise"):
            self._io("posix_fadvise", os.posix_fadvise, self._fd, offset, length, os.POSIX_FADV_WILLNEED)

    def extents(self, offset: int, length: int) -> list[tuple[int, int]]:
        # From the map: no system call, the same cost on every file system (a READ asks this too).
        return [(n, _FLAGS[s]) for n, s in self._map.runs(offset, length)]

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
