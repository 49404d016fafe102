"""Sparse-file export: allocation is whatever the filesystem says (SEEK_DATA / SEEK_HOLE).

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

# linux/falloc.h
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

_ZERO_CHUNK = bytes(1 << 20)


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

    def pwrite(self, offset: int, data: bytes | memoryview, *, fua: bool = False) -> None:
        view = memoryview(data)
        while view:
            n = self._io("pwrite", os.pwrite, self._fd, view, offset)
            view, offset = view[n:], offset + n
        if fua:
            self.flush()

    def _write_zeroes(self, offset: int, length: int) -> None:
        end = offset + length
        while offset < end:
            n = min(len(_ZERO_CHUNK), end - offset)
            self.pwrite(offset, _ZERO_CHUNK[:n])
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
                self._write_zeroes(offset, length)
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
        end = min(offset + length, self.size)
        out: list[tuple[int, int]] = []
        pos = offset
        while pos < end:
            try:
                data = os.lseek(self._fd, pos, os.SEEK_DATA)
            except OSError as e:
                if e.errno != errno.ENXIO:  # ENXIO: no data after pos
                    raise BackendError(e.errno or errno.EIO, f"SEEK_DATA: {e.strerror}") from e
                data = end
            data = min(data, end)
            if data > pos:
                out.append((data - pos, STATE_HOLE | STATE_ZERO))
                pos = data
                continue
            hole = min(os.lseek(self._fd, pos, os.SEEK_HOLE), end)
            out.append((hole - pos, 0))
            pos = hole
        return out

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
