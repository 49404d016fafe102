"""The reference server against Debian's qemu 7.2 clients: qemu-img (info/convert/compare/map), qemu-io."""

from __future__ import annotations

import json
import os
import shutil

import pytest
from nbdref.server import Export

from .conftest import clean, run

pytestmark = pytest.mark.skipif(not shutil.which("qemu-img"), reason="qemu-utils not installed")
MiB = 1 << 20


def _image(path, size: int, data_at: dict[int, bytes]) -> None:
    with open(path, "wb") as f:
        f.truncate(size)
        for off, data in data_at.items():
            f.seek(off)
            f.write(data)


def test_qemu_img_info_and_map(serve, tmp_path):
    path = tmp_path / "disk.img"
    _image(path, 8 * MiB, {MiB: os.urandom(MiB)})
    s = serve([Export.file("exp", path)])
    info = json.loads(run(["qemu-img", "info", "--output=json", s.uri]).stdout)
    assert info["virtual-size"] == 8 * MiB
    m = json.loads(run(["qemu-img", "map", "--output=json", "-f", "raw", s.uri]).stdout)
    data = [(x["start"], x["length"]) for x in m if x["data"]]
    zero = [(x["start"], x["length"]) for x in m if not x["data"]]
    assert data == [(MiB, MiB)] and zero[0] == (0, MiB)
    clean(s)


def test_qemu_img_convert_and_compare(serve, tmp_path):
    src = tmp_path / "src.img"
    _image(src, 4 * MiB, {0: os.urandom(300_000), 3 * MiB: b"tail" * 1000})
    s = serve([Export.memory("exp", 4 * MiB)])
    run(["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(src), s.uri])
    run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(src), s.uri])
    back = tmp_path / "back.img"
    run(["qemu-img", "convert", "-f", "raw", "-O", "raw", s.uri, str(back)])
    assert back.read_bytes() == src.read_bytes()
    clean(s)


def test_qemu_io_commands(serve, tmp_path):
    path = tmp_path / "disk.img"
    _image(path, 4 * MiB, {})
    s = serve([Export.file("exp", path)])
    cmds = [
        "write -P 0xab 0 64k", "read -P 0xab 0 64k",
        "write -z 4k 4k", "read -P 0 4k 4k",
        "discard 64k 1M", "read -P 0 64k 1M",
        "write -f -P 0xcd 128k 4k", "flush", "read -P 0xcd 128k 4k",
    ]
    args = ["qemu-io", "-f", "raw"]
    for c in cmds:
        args += ["-c", c]
    r = run([*args, s.uri])
    assert "Pattern verification failed" not in r.stdout, r.stdout
    data = path.read_bytes()
    assert data[:4096] == b"\xab" * 4096 and data[4096:8192] == bytes(4096)
    assert data[128 * 1024:132 * 1024] == b"\xcd" * 4096
    clean(s)
    wire = str(s.records[-1].transcript)
    for cmd in ("NBD_CMD_WRITE_ZEROES", "NBD_CMD_TRIM", "NBD_CMD_FLUSH", "flags=FUA"):
        assert cmd in wire, cmd


def test_qemu_io_read_only_export(serve):
    s = serve([Export.memory("exp", MiB, read_only=True)])
    r = run(["qemu-io", "-r", "-f", "raw", "-c", "read 0 4k", s.uri])
    assert "read 4096/4096" in r.stdout
    clean(s)


def test_qemu_img_map_dirty_bitmap(serve):
    """qemu's x-dirty-bitmap maps qemu:dirty-bitmap:NAME onto block status: dirty shows as data=false."""
    s = serve([Export.memory("exp", 4 * MiB, bitmaps=("b0",))])
    run(["qemu-io", "-f", "raw", "-c", "write -P 1 1M 4k", s.uri])
    path = s.address
    m = json.loads(run(["qemu-img", "map", "--output=json", "--image-opts",
                        f"driver=nbd,path={path},export=exp,x-dirty-bitmap=qemu:dirty-bitmap:b0"]).stdout)
    dirty = [(x["start"], x["length"]) for x in m if not x["data"]]
    assert dirty == [(MiB, 65536)]  # one 64 KiB bitmap granule around the 4 KiB write
    clean(s, 2)
