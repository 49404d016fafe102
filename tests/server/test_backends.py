"""Backends: data round trips and *real* allocation (holes the OS agrees with)."""

from __future__ import annotations

import os

import pytest
from nbdref.backends import (
    STATE_HOLE,
    STATE_ZERO,
    BackendError,
    BlockMap,
    DirtyBitmap,
    FileBackend,
    MemoryBackend,
)

HZ = STATE_HOLE | STATE_ZERO
MiB = 1 << 20


def test_blockmap_runs_merge_and_clip():
    m = BlockMap(10 * 4096 + 100, 4096)
    m.set_touched(4096, 1, 1)          # block 1
    m.set_full(3 * 4096, 2 * 4096, 2)  # blocks 3-4
    m.set_full(9 * 4096, 4096 + 100, 1)  # tail block counts as full
    assert list(m.runs(0, m.size)) == [
        (4096, 0), (4096, 1), (4096, 0), (8192, 2), (4 * 4096, 0), (4096 + 100, 1)]
    assert list(m.runs(4096 + 10, 100)) == [(100, 1)]
    assert list(m.runs(m.size, 10)) == []
    m.set_full(100, 4000, 1)  # covers no full block
    assert m.state_at(0) == 0


def test_memory_roundtrip_and_extents():
    b = MemoryBackend(4 * MiB)
    assert b.extents(0, b.size) == [(4 * MiB, HZ)]
    b.pwrite(MiB, b"x" * 10)
    assert bytes(b.pread(MiB, 12)) == b"x" * 10 + b"\0\0"
    assert b.extents(0, b.size) == [(MiB, HZ), (4096, 0), (3 * MiB - 4096, HZ)]
    b.zero(MiB, 4096, may_trim=False)  # NO_HOLE: allocated, reads zero
    assert b.extents(MiB, 4096) == [(4096, STATE_ZERO)]
    assert bytes(b.pread(MiB, 10)) == bytes(10)
    b.pwrite(0, b"y" * MiB)
    b.trim(4096, 8192)
    assert bytes(b.pread(4096, 8192)) == bytes(8192)
    assert b.extents(0, 3 * 4096) == [(4096, 0), (8192, HZ)]
    assert b.allocation_depth(0, 3 * 4096) == [(4096, 1), (8192, 0)]
    b.close()


def test_memory_read_is_zero_copy_view():
    b = MemoryBackend(MiB)
    v = b.pread(0, 4096)
    assert isinstance(v, memoryview)
    b.pwrite(0, b"z")
    assert v[0] == ord("z")  # a view of the store, not a copy


def test_file_backend_real_holes(tmp_path):
    path = tmp_path / "disk.img"
    b = FileBackend(path, size=8 * MiB)
    assert os.stat(path).st_size == 8 * MiB
    assert b.extents(0, b.size) == [(8 * MiB, HZ)]
    b.pwrite(2 * MiB, os.urandom(MiB))
    ext = b.extents(0, b.size)
    assert ext[0] == (2 * MiB, HZ) and ext[1] == (MiB, 0) and sum(n for n, _ in ext) == 8 * MiB
    before = os.stat(path).st_blocks
    b.trim(2 * MiB, MiB)  # punches a hole: the file system must agree
    assert os.stat(path).st_blocks < before
    assert b.extents(0, b.size) == [(8 * MiB, HZ)]
    assert b.pread(2 * MiB, 16) == bytes(16)
    b.pwrite(0, b"a" * 8192)
    b.zero(0, 8192, may_trim=False)  # NO_HOLE keeps it allocated
    assert b.pread(0, 8192) == bytes(8192)
    assert b.extents(0, 8192)[0][1] & STATE_HOLE == 0
    b.zero(0, 8192, may_trim=True)
    assert b.extents(0, 8192) == [(8192, HZ)]
    b.flush()
    b.close()


def test_file_backend_never_shrinks(tmp_path):
    path = tmp_path / "big.img"
    path.write_bytes(b"x" * 8192)
    with pytest.raises(ValueError):
        FileBackend(path, size=4096)
    assert path.stat().st_size == 8192


def test_file_backend_read_only(tmp_path):
    path = tmp_path / "ro.img"
    path.write_bytes(b"hello" + bytes(4091))
    b = FileBackend(path, read_only=True)
    assert b.size == 4096 and b.pread(0, 5) == b"hello"
    with pytest.raises(BackendError):
        b.pwrite(0, b"x")
    b.close()


def test_dirty_bitmap_marks_touched_blocks():
    bm = DirtyBitmap("b0", 1 << 20, granularity=65536)
    assert bm.context == "qemu:dirty-bitmap:b0"
    bm.mark(65536 + 1, 2)
    assert bm.extents(0, 1 << 20) == [(65536, 0), (65536, 1), ((1 << 20) - 2 * 65536, 0)]
    bm.clear()
    assert bm.extents(0, 1 << 20) == [(1 << 20, 0)]


def _zero_range_works(directory) -> bool:
    """Whether this file system can FALLOC_FL_ZERO_RANGE (ext4/xfs yes, tmpfs no)."""
    from nbdref.backends import file as fb

    probe = os.path.join(directory, ".zero-range-probe")
    fd = os.open(probe, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.ftruncate(fd, 8192)
        return fb.fallocate(fd, fb.FALLOC_FL_ZERO_RANGE | fb.FALLOC_FL_KEEP_SIZE, 0, 4096)
    finally:
        os.close(fd)
        os.unlink(probe)


@pytest.fixture(params=["shm", "tmp"])
def zero_dir(request, tmp_path):
    if request.param == "tmp":
        return tmp_path
    if not os.path.isdir("/dev/shm") or not os.access("/dev/shm", os.W_OK):
        pytest.skip("no writable /dev/shm")
    import tempfile

    d = tempfile.mkdtemp(prefix="nbdref-fz-", dir="/dev/shm")
    request.addfinalizer(lambda: __import__("shutil").rmtree(d, ignore_errors=True))
    return d


def test_file_fast_zero_never_falls_back_to_writing(zero_dir):
    """NBD_CMD_FLAG_FAST_ZERO: the zeroing is fast (fallocate) or refused with ENOTSUP, never written."""
    import errno

    b = FileBackend(os.path.join(zero_dir, "disk.img"), size=MiB)
    b.pwrite(0, b"a" * 8192)
    if _zero_range_works(zero_dir):
        assert b.fast_zero_possible(0, 8192, may_trim=False)
        b.zero(0, 8192, may_trim=False, fast=True)
        assert b.pread(0, 8192) == bytes(8192)
    else:  # tmpfs
        with pytest.raises(BackendError) as info:
            b.zero(0, 8192, may_trim=False, fast=True)
        assert info.value.errno == errno.ENOTSUP
        assert b.pread(0, 8192) == b"a" * 8192  # untouched: nothing was written
        assert not b.fast_zero_possible(0, 8192, may_trim=False)  # and refused quickly from now on
        b.zero(0, 8192, may_trim=False)  # without FAST_ZERO: zeroes are written
        assert b.pread(0, 8192) == bytes(8192)
    b.pwrite(0, b"b" * 8192)
    b.zero(0, 8192, may_trim=True, fast=True)  # punching holes works on both
    assert b.pread(0, 8192) == bytes(8192)
    b.close()
