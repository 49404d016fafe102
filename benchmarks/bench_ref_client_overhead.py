"""Per-test overhead of the suites' reference client: connect (handshake with NBD_OPT_GO), one 4 KiB
read, polite disconnect -- what `ref_client` costs a test -- against the in-process reference server
and a host nbdkit (memory plugin), over a Unix socket.  Run on demand: `.venv/bin/python
benchmarks/bench_ref_client_overhead.py [--rounds 300]`.  Prints median and 90th percentile in ms.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nbdref.client import Client
from nbdref.server import Export, Server

from tests.helpers.servers import start_nbdkit


def measure(uri: str, rounds: int) -> tuple[float, float]:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        with Client(timeout=10) as c:
            c.connect_uri(uri)
            c.pread(4096, 0)
        times.append((time.perf_counter() - start) * 1000)
    times.sort()
    return statistics.median(times), times[int(len(times) * 0.9)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=300)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="nbdbench") as d:
        sock = Path(d) / "ref.sock"
        server = Server([Export.memory("exp", 16 << 20)], persona="nbdref", unix=str(sock))
        server.start()
        try:
            med, p90 = measure(f"nbd+unix:///exp?socket={sock}", args.rounds)
            print(f"nbdref in-process     median {med:6.2f} ms   p90 {p90:6.2f} ms")
        finally:
            server.stop(timeout=5)
        with start_nbdkit("memory", "16M", workdir=d) as nbdkit:
            med, p90 = measure(nbdkit.uri, args.rounds)
            print(f"nbdkit memory (host)  median {med:6.2f} ms   p90 {p90:6.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
