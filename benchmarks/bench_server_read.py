"""Sequential 1 GiB reads with ``nbdcopy --no-extents ... null:`` from three servers, same run:

* the reference server (``python -m nbdref serve``, memory backend; once sending zeroes as data like
  nbdkit does, once with its default sparse OFFSET_HOLE replies),
* ``nbdkit memory 1G`` (Debian 1.32: a child of this process; it exits with its parent),
* both memory servers again after filling them with random data (real pages, not the zero page),
* ``qemu-nbd`` on a 1 GiB raw file in /dev/shm filled with data (so qemu sends data, not holes),
* file exports of a fully written 1 GiB file, once on tmpfs (/dev/shm) and once on the disk (a directory
  under /var/tmp, the root file system): ``python -m nbdref serve --file`` (default persona, so every
  read asks the backend for holes) against ``nbdkit file`` on the same file,

with 1 and 4 connections.  Prints MiB/s, the ratio to the matching nbdkit row (memory, filled, or the
file plugin on the same file system), and the reference server's peak RSS.  Run on demand:
``.venv/bin/python benchmarks/bench_server_read.py [--size 1G] [--repeat 2] [--cases memory,qemu,file]``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager, suppress

from fixtures.readiness import wait_ready

GiB = 1 << 30


def _fill(path: str, size: int) -> None:
    """Write real (non-zero) data: a fallocate'd tmpfs file made qemu-nbd 7.2 crawl (~60 MiB/s)."""
    block = os.urandom(1 << 20)
    with open(path, "wb") as f:
        for _ in range(size // len(block)):
            f.write(block)
        f.write(block[: size % len(block)])


def _fs_type(path: str) -> str:
    """The file system type of ``path`` as ``stat -f`` names it (tmpfs, ext2/ext3 for ext4, xfs, ...)."""
    out = subprocess.run(["stat", "-f", "-c", "%T", path], capture_output=True, text=True, check=False)
    return out.stdout.strip() or "?"


def _peak_rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


@contextmanager
def _server(argv: list[str], sock: str, env: dict[str, str] | None = None):
    with suppress(FileNotFoundError):
        os.unlink(sock)
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    try:
        wait_ready(unix=sock, timeout=30, alive=lambda: proc.poll() is None)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def _copy(uri: str, connections: int, size: int) -> float:
    """Seconds for one nbdcopy of the whole export to null:."""
    t0 = time.perf_counter()
    subprocess.run(["nbdcopy", "--no-extents", f"--connections={connections}", uri, "null:"],
                   check=True, timeout=600)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="1G", help="export size (default 1G)")
    ap.add_argument("--repeat", type=int, default=2, help="runs per case; the best is kept")
    ap.add_argument("--connections", default="1,4")
    ap.add_argument("--cases", default="memory,qemu,file", help="which groups of servers to run")
    ap.add_argument("--disk-dir", default="/var/tmp", help="where the on-disk file export lives")
    args = ap.parse_args(argv)
    size = int(args.size[:-1]) * {"G": GiB, "M": 1 << 20}[args.size[-1]] if args.size[-1] in "GM" else int(args.size)
    conns = [int(c) for c in args.connections.split(",")]
    cases = set(args.cases.split(","))
    for tool in ("nbdcopy", "nbdkit", "qemu-nbd"):
        if not shutil.which(tool):
            print(f"missing {tool}", file=sys.stderr)
            return 2
    work = tempfile.mkdtemp(prefix="nbdbench-", dir="/tmp")
    disk_work = tempfile.mkdtemp(prefix="nbdbench-", dir=args.disk_dir)
    shm = "/dev/shm" if os.path.isdir("/dev/shm") else work
    image = os.path.join(shm, f"nbdbench-{os.getpid()}.img")
    disk_image = os.path.join(disk_work, "disk.img")
    py = [sys.executable, "-m", "nbdref", "serve", "--no-transcript", "--threads", "4"]
    results: dict[tuple[str, int], float] = {}
    baseline: dict[str, str] = {}
    rss: dict[str, int] = {}
    try:
        _fill(image, size)
        nbdkit = ["nbdkit", "-f", "-U", "{sock}", "memory", str(size)]
        mem = [*py, "--size", str(size)]
        as_nbdkit = [*mem, "--persona", "nbdkit-1.32", "--unix", "{sock}"]  # zeroes sent as data, like nbdkit
        # (group, name, argv, filled first with the image's random data?, row it is compared with)
        servers: list[tuple[str, str, list[str], bool, str]] = [
            ("memory", "nbdkit memory", nbdkit, False, "nbdkit memory"),
            ("memory", "nbdkit filled", nbdkit, True, "nbdkit filled"),
            ("qemu", "qemu-nbd", ["qemu-nbd", "-k", "{sock}", "-f", "raw", "-r", "--shared=8", "--persistent",
                                  "-x", "", image], False, "nbdkit filled"),
            ("memory", "nbdref (data)", as_nbdkit, False, "nbdkit memory"),
            ("memory", "nbdref filled", as_nbdkit, True, "nbdkit filled"),
            ("memory", "nbdref (holes)", [*mem, "--unix", "{sock}"], False, "nbdkit memory"),
        ]
        if "file" in cases:
            _fill(disk_image, size)
            for label, path in ((_fs_type(shm), image), (_fs_type(disk_work), disk_image)):
                kit = f"nbdkit file {label}"
                servers += [
                    ("file", kit, ["nbdkit", "-f", "-U", "{sock}", "file", path], False, kit),
                    ("file", f"nbdref file {label}", [*py, "--file", path, "--unix", "{sock}"], False, kit),
                ]
        for group, name, template, fill, base in servers:
            if group not in cases:
                continue
            baseline[name] = base
            sock = os.path.join(work, "s.sock")
            argv_ = [a.replace("{sock}", sock) for a in template]
            uri = f"nbd+unix:///?socket={sock}"
            with _server(argv_, sock) as proc:
                if fill:  # real pages instead of the kernel's shared zero page / a memset buffer
                    subprocess.run(["nbdcopy", image, uri], check=True, timeout=600)
                for c in conns:
                    best = min(_copy(uri, c, size) for _ in range(args.repeat))
                    results[(name, c)] = best
                if name.startswith("nbdref"):
                    rss[name] = _peak_rss_kib(proc.pid)
    finally:
        with suppress(FileNotFoundError):
            os.unlink(image)
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(disk_work, ignore_errors=True)
    mib = size / (1 << 20)
    print(f"sequential read of {mib:.0f} MiB with nbdcopy --no-extents to null: (best of {args.repeat})")
    print(f"{'server':24} {'conns':>5} {'MiB/s':>8} {'ratio':>6}  compared with")
    for (name, c), secs in results.items():
        base = baseline[name]
        ratio = results[(base, c)] / secs if (base, c) in results else float("nan")
        print(f"{name:24} {c:5d} {mib / secs:8.0f} {ratio:6.2f}  {base}")
    for name, kib in rss.items():
        print(f"peak RSS of {name}: {kib / 1024:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
