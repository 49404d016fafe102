"""The file backend's extent map: built once at open, kept by its own writes, trims and zeroes.

It must agree with what the file system says (a fresh SEEK_DATA / SEEK_HOLE scan) on tmpfs and on the
disk, and READ / BLOCK_STATUS must not ask the file system (on tmpfs each seek walks the page cache).
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
import threading
from collections.abc import Iterator

import pytest
from nbdref.backends import STATE_HOLE, STATE_ZERO, FileBackend
from nbdref.backends import file as file_backend
from nbdref.client import Client
from nbdref.server import Export

from .conftest import clean

HZ = STATE_HOLE | STATE_ZERO
KiB, MiB = 1 << 10, 1 << 20


@pytest.fixture(params=["tmpfs", "disk"])
def fs_dir(request, tmp_path) -> Iterator[str]:
    """A directory on tmpfs (/dev/shm) and one on the disk (/var/tmp, else pytest's tmp_path: /tmp
    may be a tmpfs)."""
    if request.param == "disk":
        if not os.access("/var/tmp", os.W_OK):
            yield str(tmp_path)
            return
        d = tempfile.mkdtemp(prefix="nbdref-em-", dir="/var/tmp")
        yield d
        shutil.rmtree(d, ignore_errors=True)
        return
    if not os.access("/dev/shm", os.W_OK):
        pytest.skip("no writable /dev/shm")
    d = tempfile.mkdtemp(prefix="nbdref-em-", dir="/dev/shm")
    yield d
    shutil.rmtree(d, ignore_errors=True)


def fresh_scan(path: str) -> list[tuple[int, int]]:
    """Data intervals [start, end) as the file system reports them now (independent of the backend)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size, pos, out = os.fstat(fd).st_size, 0, []
        while pos < size:
            try:
                data = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:  # ENXIO: only a hole is left
                break
            hole = os.lseek(fd, data, os.SEEK_HOLE)
            out.append((data, min(hole, size)))
            pos = hole
        return out
    finally:
        os.close(fd)


def data_blocks(path: str, block: int) -> set[int]:
    return {i for s, e in fresh_scan(path) for i in range(s // block, -(-e // block))}


def check_against_scan(b: FileBackend, path: str, model: bytearray) -> None:
    """Hole in the map => hole in the file; data in the map => data in the file; STATE_ZERO alone
    (NO_HOLE zeroes: ext4 may call them holes) => either, reading as zeroes.  Contents = model."""
    g = b.granularity
    scanned = data_blocks(path, g)
    pos = 0
    for n, flags in b.extents(0, b.size):
        assert pos % g == 0 and n > 0
        blocks = set(range(pos // g, -(-(pos + n) // g)))
        if flags == HZ:
            assert not blocks & scanned, f"map says hole at {pos}+{n}, the file has data there"
        elif flags == 0:
            assert blocks <= scanned, f"map says data at {pos}+{n}, the file has a hole there"
        else:
            assert flags == STATE_ZERO
        if flags & STATE_ZERO:
            assert model[pos : pos + n] == bytes(n)
        pos += n
    assert pos == b.size
    assert b.pread(0, b.size) == model


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_map_matches_a_fresh_scan_after_random_writes_trims_and_zeroes(fs_dir, seed):
    rng = random.Random(seed)
    path = os.path.join(fs_dir, "disk.img")
    size = 4 * MiB
    b = FileBackend(path, size=size)
    model = bytearray(size)
    g = b.granularity
    for step in range(150):
        # Unaligned about half the time: partial blocks are where a map goes wrong.
        off = rng.randrange(0, size // g) * g + (rng.randrange(g) if rng.random() < 0.5 else 0)
        off = min(off, size - 1)
        n = min(rng.randrange(1, 96 * KiB), size - off)
        op = rng.choice(["write", "write", "trim", "zero", "zero-no-hole"])
        if op == "write":
            data = rng.randbytes(n).replace(b"\0", b"\1")
            b.pwrite(off, data)
            model[off : off + n] = data
        elif op == "trim":
            b.trim(off, n)
            model[off : off + n] = bytes(n)
        else:
            b.zero(off, n, may_trim=op == "zero")
            model[off : off + n] = bytes(n)
        if step % 10 == 9:
            check_against_scan(b, path, model)
    check_against_scan(b, path, model)
    # The map after all that equals the one a new open builds, where the two can agree at all.
    b.close()
    reopened = FileBackend(path, read_only=True)
    check_against_scan(reopened, path, model)
    reopened.close()


def test_a_file_with_holes_is_mapped_right_at_open(fs_dir):
    path = os.path.join(fs_dir, "holes.img")
    with open(path, "wb") as f:
        f.truncate(8 * MiB)
        for start, n in ((MiB, 64 * KiB), (3 * MiB, MiB), (8 * MiB - 4 * KiB, 4 * KiB)):
            f.seek(start)
            f.write(b"\xaa" * n)
    b = FileBackend(path)
    assert b.extents(0, b.size) == [
        (MiB, HZ), (64 * KiB, 0), (2 * MiB - 64 * KiB, HZ), (MiB, 0), (4 * MiB - 4 * KiB, HZ), (4 * KiB, 0)]
    assert b.extents(MiB + 4 * KiB, 8 * KiB) == [(8 * KiB, 0)]  # clipped to the query
    assert b.extents(b.size, 1) == []
    assert b.allocation_depth(0, 2 * MiB) == [(MiB, 0), (64 * KiB, 1), (MiB - 64 * KiB, 0)]
    b.close()


def test_the_scan_at_open_is_bounded(tmp_path, monkeypatch):
    """A badly fragmented file costs at most MAX_SCAN_RUNS runs of seeks; the rest counts as data."""
    path = tmp_path / "frag.img"
    with open(path, "wb") as f:
        f.truncate(MiB)
        for i in range(0, MiB, 128 * KiB):
            f.seek(i + 64 * KiB)
            f.write(b"x" * 4096)
    monkeypatch.setattr(file_backend, "MAX_SCAN_RUNS", 3)
    b = FileBackend(path)
    assert b.extents(0, b.size) == [(64 * KiB, HZ), (4 * KiB, 0), (124 * KiB, HZ), (MiB - 192 * KiB, 0)]
    b.close()


def test_a_huge_sparse_file_is_one_run(tmp_path):
    b = FileBackend(tmp_path / "huge.img", size=1 << 40)
    assert b.extents(0, b.size) == [(1 << 40, HZ)]
    b.pwrite((1 << 39) + 5, b"z")
    assert b.extents((1 << 39) - 4096, 3 * 4096) == [(4096, HZ), (b.granularity, 0), (8192 - b.granularity, HZ)]
    b.close()


class _CountSeeks:
    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        real = os.lseek

        def lseek(fd: int, pos: int, how: int) -> int:
            self.calls += 1
            return real(fd, pos, how)

        monkeypatch.setattr(os, "lseek", lseek)


def test_reads_and_block_status_do_not_seek(serve, fs_dir, monkeypatch):
    """Every READ of the default persona asks for holes (OFFSET_HOLE chunks); the map answers, not
    lseek (old code: two seeks per read on a fully written file, 6 ms each on a 1 GiB tmpfs file)."""
    path = os.path.join(fs_dir, "d.img")
    content = bytearray(os.urandom(4 * MiB))
    content[MiB : 2 * MiB] = bytes(MiB)
    with open(path, "wb") as f:
        f.write(content[:MiB])
        f.seek(2 * MiB)
        f.write(content[2 * MiB :])
    seeks = _CountSeeks(monkeypatch)
    s = serve([Export.file("exp", path)], workers=4)
    assert seeks.calls <= 8  # the scan at open: a few seeks per extent, once
    seeks.calls = 0
    c = Client()
    c.set_timeout(10)
    c.add_meta_context("base:allocation")
    c.connect_uri(s.uri)
    # Many reads in flight on four workers: each reply buffer is reused only after its reply went out.
    bufs = [bytearray(256 * KiB) for _ in range(16)]
    cookies = [c.aio_pread(buf, i * len(buf)) for i, buf in enumerate(bufs)]
    for ck in cookies:
        c.wait(ck)
    assert b"".join(bufs) == content
    assert c.pread(100, MiB - 50) == content[MiB - 50 : MiB + 50]  # data, then a hole
    seen: list[int] = []
    c.block_status(4 * MiB, 0, lambda ctx, off, entries, err: seen.extend(entries))
    assert seen == [MiB, 0, MiB, HZ, 2 * MiB, 0]
    c.pwrite(b"w" * 4096, MiB + 8192)
    c.trim(2 * MiB, MiB)  # (count, offset), as libnbd
    assert c.pread(8192, MiB + 8192) == bytes(8192)
    c.shutdown()
    assert seeks.calls == 0
    clean(s)


def test_reads_of_other_shapes_fill_the_buffer_right(serve, tmp_path):
    """Simple replies and nbdkit's persona (data, no holes) read into reused buffers too."""
    path = tmp_path / "d.img"
    content = os.urandom(2 * MiB)
    path.write_bytes(content)
    for persona, structured in (("nbdkit-1.32", True), ("nbdref", False)):
        s = serve([Export.file("exp", path, read_only=True)], persona=persona, workers=2)
        c = Client()
        c.set_timeout(10)
        c.set_request_structured_replies(structured)
        c.connect_uri(s.uri)
        for off, n in ((0, 64 * KiB), (12345, 300 * KiB), (MiB, MiB), (3, 17 * KiB)):
            assert c.pread(n, off) == content[off : off + n], (persona, off, n)
        c.shutdown()
        clean(s)


@pytest.mark.parametrize("may_trim", [True, False], ids=["trim", "no-hole"])
def test_a_write_after_a_zeros_syscall_is_mapped_as_data(fs_dir, monkeypatch, may_trim):
    """A write that starts once a zero's fallocate returned must not be undone in the map by that
    zero's later update (old code: the write, not under the lock, marked DATA in between and the
    zero then marked HOLE / ZERO over real data)."""
    path = os.path.join(fs_dir, "race.img")
    b = FileBackend(path, size=MiB)
    b.pwrite(0, b"\xaa" * MiB)
    model = bytearray(b"\xaa" * MiB)
    zeroed, written = threading.Event(), threading.Event()
    real, paused = file_backend.fallocate, []

    def fallocate(fd: int, mode: int, offset: int, length: int) -> bool:
        done = real(fd, mode, offset, length)
        if not paused:  # pause once, between the zero's system call and its map update
            paused.append(1)
            zeroed.set()
            written.wait(0.3)  # old code: the write lands here; fixed: it waits for the lock
        return done

    monkeypatch.setattr(file_backend, "fallocate", fallocate)
    zero = threading.Thread(target=b.zero, args=(0, MiB), kwargs={"may_trim": may_trim})
    zero.start()
    assert zeroed.wait(10)
    off, data = 64 * KiB + 100, os.urandom(8 * KiB).replace(b"\0", b"\1")
    b.pwrite(off, data)
    written.set()
    zero.join(10)
    model[:] = bytes(MiB)
    model[off : off + len(data)] = data
    g = b.granularity
    first, last = off // g * g, -(-(off + len(data)) // g) * g
    assert b.extents(first, last - first) == [(last - first, 0)]
    check_against_scan(b, path, model)
    b.close()


def test_a_trim_up_to_an_unaligned_eof_leaves_the_tail_block_data(fs_dir):
    """Punching up to an unaligned EOF frees no partial block (ext4, tmpfs): the map must not call
    the short tail block a hole (old code: "the short tail block counts as full")."""
    path = os.path.join(fs_dir, "tail.img")
    size = 10000
    b = FileBackend(path, size=size)
    g = b.granularity
    if size % g == 0 or size < 2 * g:
        pytest.skip(f"block size {g}: {size} is no unaligned EOF after two blocks")
    tail = size // g * g
    b.pwrite(0, b"\xbb" * size)
    model = bytearray(b"\xbb" * size)
    b.trim(tail, size - tail)
    model[tail:] = bytes(size - tail)
    check_against_scan(b, path, model)
    assert b.extents(tail, size - tail) != [(size - tail, HZ)]
    b.trim(tail - g, size - tail + g)  # a whole block then the tail: only the whole block is freed
    model[tail - g :] = bytes(size - tail + g)
    check_against_scan(b, path, model)
    assert b.extents(tail - g, g) == [(g, HZ)]
    b.pwrite(tail, b"\xcc" * (size - tail))
    model[tail:] = b"\xcc" * (size - tail)
    b.zero(tail, size - tail, may_trim=False)  # NO_HOLE: allocated zeroes (or data), never a hole
    model[tail:] = bytes(size - tail)
    check_against_scan(b, path, model)
    assert b.extents(tail, size - tail) != [(size - tail, HZ)]
    b.close()
    reopened = FileBackend(path, read_only=True)
    check_against_scan(reopened, path, model)
    reopened.close()
