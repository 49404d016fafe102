"""Sequential 1 GiB reads with ``nbdcopy --no-extents ... null:`` from three servers, same run:

* the reference server (``python -m nbdref serve``, memory backend; once sending zeroes as data like
  nbdkit does, once with its default sparse OFFSET_HOLE replies),
* ``nbdkit memory 1G`` (Debian 1.32: a child of this process; it exits with its parent),
* both memory servers again after filling them with random data (real pages, not the zero page),
* ``qemu-nbd`` on a 1 GiB raw file in /dev/shm filled with data (so qemu sends data, not holes),

with 1 and 4 connections.  Prints MiB/s, the ratio to nbdkit, and the reference server's peak RSS.
Run on demand: ``.venv/bin/python benchmarks/bench_server_read.py [--size 1G] [--repeat 2]``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager, suppress

GiB = 1 << 30


def _wait_socket(path: str, proc: subprocess.Popen, timeout: float = 30) -> None:
    """Ready when a connect succeeds and NBDMAGIC arrives (research/docker-spike.md: readiness)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode}")
        with suppress(OSError), socket.socket(socket.AF_UNIX) as s:
            s.settimeout(2)
            s.connect(path)
            if s.recv(8) == b"NBDMAGIC":
                return
        time.sleep(0.05)
    raise TimeoutError(f"{path} not ready")


def _fill(path: str, size: int) -> None:
    """Write real (non-zero) data: a fallocate'd tmpfs file made qemu-nbd 7.2 crawl (~60 MiB/s)."""
    block = os.urandom(1 << 20)
    with open(path, "wb") as f:
        for _ in range(size // len(block)):
            f.write(block)
        f.write(block[: size % len(block)])


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
        _wait_socket(sock, proc)
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
    args = ap.parse_args(argv)
    size = int(args.size[:-1]) * {"G": GiB, "M": 1 << 20}[args.size[-1]] if args.size[-1] in "GM" else int(args.size)
    conns = [int(c) for c in args.connections.split(",")]
    for tool in ("nbdcopy", "nbdkit", "qemu-nbd"):
        if not shutil.which(tool):
            print(f"missing {tool}", file=sys.stderr)
            return 2
    work = tempfile.mkdtemp(prefix="nbdbench-", dir="/tmp")
    image = os.path.join("/dev/shm" if os.path.isdir("/dev/shm") else work, f"nbdbench-{os.getpid()}.img")
    py = [sys.executable, "-m", "nbdref", "serve", "--size", str(size), "--no-transcript", "--threads", "4"]
    results: dict[tuple[str, int], float] = {}
    rss: dict[str, int] = {}
    try:
        _fill(image, size)
        nbdkit = ["nbdkit", "-f", "-U", "{sock}", "memory", str(size)]
        as_nbdkit = [*py, "--persona", "nbdkit-1.32", "--unix", "{sock}"]  # zeroes sent as data, like nbdkit
        # (name, argv, filled first with the image's random data?)
        servers: list[tuple[str, list[str], bool]] = [
            ("nbdkit memory", nbdkit, False),
            ("nbdkit filled", nbdkit, True),
            ("qemu-nbd", ["qemu-nbd", "-k", "{sock}", "-f", "raw", "-r", "--shared=8", "--persistent", "-x", "",
                          image], False),
            ("nbdref (data)", as_nbdkit, False),
            ("nbdref filled", as_nbdkit, True),
            ("nbdref (holes)", [*py, "--unix", "{sock}"], False),
        ]
        for name, template, fill in servers:
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
    mib = size / (1 << 20)
    print(f"sequential read of {mib:.0f} MiB with nbdcopy --no-extents to null: (best of {args.repeat})")
    print(f"{'server':16} {'conns':>5} {'MiB/s':>8} {'vs nbdkit':>9}   (filled rows compare with nbdkit filled)")
    for (name, c), secs in results.items():
        base = results[("nbdkit filled" if "filled" in name else "nbdkit memory", c)]
        ratio = base / secs
        print(f"{name:16} {c:5d} {mib / secs:8.0f} {ratio:9.2f}")
    for name, kib in rss.items():
        print(f"peak RSS of {name}: {kib / 1024:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
