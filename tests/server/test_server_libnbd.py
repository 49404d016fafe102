"""The reference server against Debian's libnbd tools: nbdinfo, nbdcopy, nbdsh (real clients)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import pytest
from nbdref.server import Export

from .conftest import NBDSH, clean, run

pytestmark = pytest.mark.skipif(not shutil.which("nbdinfo"), reason="libnbd-bin not installed")
MiB = 1 << 20


def test_nbdinfo_json_reports_what_we_advertise(serve):
    s = serve([Export.memory("exp", 16 * MiB, description="test export", bitmaps=("b0",),
                             block_size=(512, 4096, 8 * MiB))])
    info = json.loads(run(["nbdinfo", "--json", s.uri]).stdout)
    assert info["protocol"] == "newstyle-fixed" and info["structured"] is True
    (e,) = info["exports"]
    assert e["export-name"] == "exp" and e["description"] == "test export"
    assert e["export-size"] == 16 * MiB
    assert (e["block_size_minimum"], e["block_size_preferred"], e["block_size_maximum"]) == (512, 4096, 8 * MiB)
    assert set(e["contexts"]) == {"base:allocation", "qemu:allocation-depth", "qemu:dirty-bitmap:b0"}
    for flag in ("can_flush", "can_fua", "can_trim", "can_zero", "can_fast_zero", "can_df", "can_cache",
                 "can_multi_conn"):
        assert e[flag] is True, flag
    clean(s, 1)


def test_nbdinfo_list_shows_every_export(serve):
    s = serve([Export.memory("a", MiB, description="first"), Export.memory("b", 2 * MiB, description="second"),
               Export.memory("ro", MiB, read_only=True)])
    info = json.loads(run(["nbdinfo", "--json", "--list", s.uri]).stdout)
    by_name = {e["export-name"]: e for e in info["exports"]}
    assert set(by_name) == {"a", "b", "ro"}
    assert by_name["b"]["export-size"] == 2 * MiB and by_name["a"]["description"] == "first"
    assert by_name["ro"]["is_read_only"] is True and by_name["ro"]["can_trim"] is False
    clean(s)


def test_nbdinfo_map_shows_real_holes_of_a_file(serve, tmp_path):
    path = tmp_path / "disk.img"
    with open(path, "wb") as f:
        f.truncate(8 * MiB)
        f.seek(2 * MiB)
        f.write(os.urandom(MiB))
    s = serve([Export.file("exp", path)])
    out = run(["nbdinfo", "--map", "--json", s.uri]).stdout
    extents = [(x["offset"], x["length"], x["type"]) for x in json.loads(out)]
    assert extents == [(0, 2 * MiB, 3), (2 * MiB, MiB, 0), (3 * MiB, 5 * MiB, 3)]
    clean(s)


def test_nbdinfo_map_dirty_bitmap_and_allocation_depth(serve):
    s = serve()
    run([*NBDSH, "-u", s.uri, "-c", "h.pwrite(b'x' * 4096, 5 * 65536); h.shutdown()"])
    dirty = json.loads(run(["nbdinfo", "--map=qemu:dirty-bitmap:b0", "--json", s.uri]).stdout)
    assert [(x["offset"], x["length"], x["type"]) for x in dirty] == [
        (0, 5 * 65536, 0), (5 * 65536, 65536, 1), (6 * 65536, 16 * MiB - 6 * 65536, 0)]
    depth = json.loads(run(["nbdinfo", "--map=qemu:allocation-depth", "--json", s.uri]).stdout)
    assert [(x["offset"], x["type"]) for x in depth] == [(0, 0), (5 * 65536, 1), (5 * 65536 + 4096, 0)]
    clean(s)


@pytest.mark.parametrize("connections", [1, 4])
def test_nbdcopy_round_trip(serve, tmp_path, connections):
    src = tmp_path / "src.img"
    data = os.urandom(6 * MiB) + bytes(2 * MiB)  # data then a zero tail (nbdcopy may zero/trim it)
    src.write_bytes(data)
    s = serve([Export.memory("exp", len(data))])
    run(["nbdcopy", f"--connections={connections}", str(src), s.uri])
    dst = tmp_path / "dst.img"
    run(["nbdcopy", f"--connections={connections}", s.uri, str(dst)])
    assert hashlib.sha256(dst.read_bytes()).hexdigest() == hashlib.sha256(data).hexdigest()
    clean(s, 2)


def test_nbdsh_every_command(serve):
    s = serve()
    script = r"""
import nbd
assert h.get_size() == 16 << 20
h.pwrite(b"A" * 65536, 0, nbd.CMD_FLAG_FUA)
assert h.pread(65536, 0) == b"A" * 65536
# libnbd argument order: zero/trim/cache(count, offset, flags)
h.zero(4096, 4096, nbd.CMD_FLAG_NO_HOLE)
h.zero(4096, 8192, nbd.CMD_FLAG_FAST_ZERO)
h.trim((1 << 20) - 65536, 65536)
h.flush()
h.cache(4096, 0)
chunks = []
def chunk(sub, offset, status, err):
    chunks.append((offset, len(sub), status))
# DF is a flag of pread_structured in libnbd: "the server MUST send at most one content chunk".
buf = h.pread_structured(16384, 0, chunk, nbd.CMD_FLAG_DF)
assert chunks == [(0, 16384, nbd.READ_DATA)], chunks
assert buf[:4096] == b"A" * 4096 and buf[4096:12288] == bytes(8192) and buf[12288:] == b"A" * 4096
seen = {}
def cb(metacontext, offset, entries, err):
    seen[metacontext] = list(entries)
h.block_status(1 << 20, 0, cb)
# data, zero-but-allocated (NO_HOLE), hole (zero without NO_HOLE), data, trimmed hole
assert seen["base:allocation"][:10] == [4096, 0, 4096, 2, 4096, 3, 53248, 0, (1 << 20) - 65536, 3], seen
assert seen["qemu:dirty-bitmap:b0"][:2] == [1 << 20, 1], seen
seen.clear()
h.block_status(1 << 20, 0, cb, nbd.CMD_FLAG_REQ_ONE)
assert all(len(v) == 2 for v in seen.values()), seen
h.set_strict_mode(0)  # let the bad request reach the server
try:
    h.pread(4096, (16 << 20) - 10)
except nbd.Error as e:
    assert e.errno in (22, "EINVAL"), e  # EINVAL past the end
else:
    raise AssertionError("read past the end succeeded")
h.shutdown()
print("ok")
"""
    connect = f"h.add_meta_context('base:allocation'); h.add_meta_context('qemu:dirty-bitmap:b0'); h.connect_uri({s.uri!r})"
    r = run([*NBDSH, "-c", connect, "-c", script], check=False)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr
    # The read past the end is a client MUST NOT (BSZ-033): the only violation we accept here.
    assert s.wait_closed(10)
    assert [v.req_id for v in s.violations] == ["BSZ-033"], s.violations


def test_read_only_export_refuses_writes_with_eperm(serve):
    s = serve([Export.memory("exp", MiB, read_only=True)])
    script = """
import nbd
assert h.is_read_only()
h.set_strict_mode(0)
try:
    h.pwrite(b"x", 0)
except nbd.Error as e:
    print("errno", e.errno)
h.shutdown()
"""
    r = run([*NBDSH, "-u", s.uri, "-c", script])
    assert "errno EPERM" in r.stdout or "errno 1" in r.stdout  # NBD_EPERM
    assert s.wait_closed(10)


def test_split_and_reversed_read_chunks_are_reassembled(serve):
    s = serve([Export.memory("exp", 4 * MiB)], read_chunk_size=4096, reverse_chunks=True)
    script = """
data = bytes(range(256)) * 4096
h.pwrite(data, 0)
assert h.pread(len(data), 0) == data
h.shutdown()
print("ok")
"""
    assert "ok" in run([*NBDSH, "-u", s.uri, "-c", script]).stdout
    clean(s)
    chunks = [e for e in s.records[0].transcript if "OFFSET_DATA" in str(e)]
    assert len(chunks) >= 256
