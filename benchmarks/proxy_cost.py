"""What the validating proxy costs a bulk copy: nbdcopy of 1 GiB through nbdref.proxy vs direct, same run.

    .venv/bin/python benchmarks/proxy_cost.py [--size 1G] [--rounds 3] [--source nbdkit|nbdref]
        [--connections 1] [--requests 4]

Source: host ``nbdkit pattern`` (non-zero data, so nbdcopy really reads it; ``--no-extents`` anyway) or
the in-process reference server (a file export of random bytes, ``--source nbdref``).  Destination
``null:``.  Direct and proxied runs alternate, so both see the same machine load; the proxy runs in
this process (its threads' CPU time is reported too).  Prints seconds and MiB/s per run, the medians,
and the ratio proxied / direct.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "impl"))
sys.path.insert(0, str(ROOT))

from nbdref.proxy import Proxy  # noqa: E402

from fixtures.readiness import wait_ready  # noqa: E402

UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def parse_size(text: str) -> int:
    return int(text[:-1]) * UNITS[text[-1].upper()] if text[-1].upper() in UNITS else int(text)


def nbdcopy(uri: str, connections: int, requests: int, timeout: float = 600) -> float:
    argv = ["nbdcopy", "--no-extents", "-C", str(connections), "-R", str(requests), uri, "null:"]
    start = time.monotonic()
    r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed: {r.stderr}")
    return time.monotonic() - start


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="1G")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--source", choices=("nbdkit", "nbdref"), default="nbdkit")
    ap.add_argument("--connections", type=int, default=1)
    ap.add_argument("--requests", type=int, default=4, help="nbdcopy -R: requests in flight per connection")
    args = ap.parse_args()
    size = parse_size(args.size)
    if not shutil.which("nbdcopy"):
        raise SystemExit("nbdcopy (libnbd-bin) is not installed")
    d = Path(tempfile.mkdtemp(prefix="prxbench-", dir="/tmp"))
    sock = d / "src.sock"
    proc = server = None
    try:
        if args.source == "nbdkit":
            proc = subprocess.Popen(["nbdkit", "-f", "--exit-with-parent", "-U", str(sock), "pattern", f"size={size}"],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            wait_ready(unix=sock, timeout=15, alive=lambda: proc.poll() is None)
            upstream = f"nbd+unix:///?socket={sock}"
        else:
            from nbdref.server import Export, Server
            img = d / "img"
            with open(img, "wb") as f:
                for _ in range(size // (1 << 20)):
                    f.write(os.urandom(1 << 20))
            server = Server([Export.file("", str(img))], unix=str(sock)).start()
            upstream = f"nbd+unix:///?socket={sock}"
        p = Proxy(f"nbd+unix:///?socket={d}/proxy.sock", upstream).start()
        via = p.uri_for("")
        mib = size / (1 << 20)
        direct, proxied, cpu = [], [], []
        for i in range(args.rounds):
            t = nbdcopy(upstream, args.connections, args.requests)
            direct.append(t)
            c0 = time.process_time()
            t = nbdcopy(via, args.connections, args.requests)
            cpu.append(time.process_time() - c0)
            proxied.append(t)
            print(f"round {i + 1}: direct {direct[-1]:.2f} s ({mib / direct[-1]:.0f} MiB/s), "
                  f"proxied {proxied[-1]:.2f} s ({mib / proxied[-1]:.0f} MiB/s), proxy CPU {cpu[-1]:.2f} s",
                  flush=True)
        p.stop()
        bad = [(r.id, str(v)) for r in p.records for v in r.violations]
        md, mp = statistics.median(direct), statistics.median(proxied)
        print(f"{args.source} {args.size}, nbdcopy -C {args.connections} -R {args.requests}: direct median {md:.2f} s "
              f"({mib / md:.0f} MiB/s), through the proxy {mp:.2f} s ({mib / mp:.0f} MiB/s): "
              f"x{mp / md:.2f} the time; proxy CPU median {statistics.median(cpu):.2f} s; "
              f"{len(p.records)} proxied connections, violations {bad or 'none'}")
        return 0
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(10)
        if server is not None:
            server.stop()
        shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
