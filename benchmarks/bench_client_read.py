"""Sequential read throughput: the reference client against nbdcopy, same server, same run.

    python benchmarks/bench_client_read.py [--size 1G] [--request-size 4M] [--in-flight 8] [--profile]

Starts ``nbdkit memory SIZE`` on a Unix socket, reads the whole export with `nbdref.client.Client`
(``aio_pread`` into a ring of preallocated buffers, several requests in flight, transcript off), then
copies it with ``nbdcopy --no-extents -C 1`` to ``null:`` and prints both throughputs and their ratio
(goal: >= 0.5).  ``--profile`` runs the client pass under cProfile and prints the top functions.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "impl"))

from nbdref.client import Client  # noqa: E402

from tests.helpers.servers import start_nbdkit  # noqa: E402

UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def parse_size(text: str) -> int:
    return int(text[:-1]) * UNITS[text[-1].upper()] if text[-1].upper() in UNITS else int(text)


def read_with_client(uri: str, size: int, request_size: int, in_flight: int) -> float:
    """Read [0, size) with up to `in_flight` requests outstanding; return seconds."""
    client = Client(timeout=60, transcript=False)
    client.connect_uri(uri)
    try:
        buffers = [bytearray(request_size) for _ in range(in_flight)]
        start = time.perf_counter()
        pending: list[int] = []
        offset = 0
        slot = 0
        while offset < size or pending:
            while offset < size and len(pending) < in_flight:
                view = memoryview(buffers[slot % in_flight])[: min(request_size, size - offset)]
                pending.append(client.aio_pread(view, offset))
                offset += len(view)
                slot += 1
            client.wait(pending.pop(0))
        elapsed = time.perf_counter() - start
        assert not client.violations, client.violations
        return elapsed
    finally:
        client.close()


def read_with_nbdcopy(uri: str) -> float:
    start = time.perf_counter()
    subprocess.run(["nbdcopy", "--no-extents", "-C", "1", uri, "null:"], check=True, timeout=600)
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="1G")
    parser.add_argument("--request-size", default="4M")
    parser.add_argument("--in-flight", type=int, default=8)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    size, request_size = parse_size(args.size), parse_size(args.request_size)
    profile = cProfile.Profile()
    with tempfile.TemporaryDirectory(prefix="nbdbench") as tmp, start_nbdkit("memory", str(size), workdir=tmp) as server:
        if args.profile:
            profile.enable()
        t_client = read_with_client(server.uri, size, request_size, args.in_flight)
        if args.profile:
            profile.disable()
        t_copy = read_with_nbdcopy(server.uri)
    mib = size / (1 << 20)
    client_rate, copy_rate = mib / t_client, mib / t_copy
    print(f"nbdref client: {mib:.0f} MiB in {t_client:.3f} s = {client_rate:.0f} MiB/s "
          f"(requests {request_size >> 10} KiB, {args.in_flight} in flight)")  # fmt: skip
    print(f"nbdcopy -C 1:  {mib:.0f} MiB in {t_copy:.3f} s = {copy_rate:.0f} MiB/s")
    print(f"ratio client/nbdcopy: {client_rate / copy_rate:.2f} (goal >= 0.5)")
    if args.profile:
        pstats.Stats(profile).sort_stats("cumulative").print_stats(20)
    return 0


if __name__ == "__main__":
    sys.exit(main())
