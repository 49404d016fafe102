"""Peer start-up costs: python benchmarks/bench_peers.py [--pool N] [--repeat N]

1. warm start of every docker server peer (4 suites x 4 servers) in parallel, bounded pool;
2. per-test overhead of a fresh export (start + stop), docker and local, per server kind;
3. one client command through docker exec into a warm container, and locally.

Images must already be built (python -m fixtures.images); everything started is removed at the end.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fixtures.exports import ExportRequest
from fixtures.images import SUITES, docker_available, ensure_image
from fixtures.launch import client_runner, export_workdir, start_server
from fixtures.peerspec import PeerSpec
from fixtures.runs import cleanup_on_exit, cleanup_run, current_run, sweep_stale

SERVERS = ("qemu-nbd", "qemu-storage-daemon", "nbdkit", "nbd-server")


def spec(impl: str, launcher: str, suite: str | None = None) -> PeerSpec:
    return PeerSpec(id=f"{impl}@{suite or launcher}", implementation=impl, role="server", version="",
                    launcher=launcher, suite=suite)


def timed_start(s: PeerSpec, req: ExportRequest):
    t0 = time.monotonic()
    srv = start_server(s, req, workdir=export_workdir(s.id))
    return srv, time.monotonic() - t0


def try_start(s: PeerSpec, req: ExportRequest):
    try:
        return timed_start(s, req)
    except Exception as e:
        print(f"    FAILED {s.id}: {str(e).splitlines()[0]}")
        return None


def bench_parallel(pool: int) -> None:
    specs = [spec(i, "docker", s) for s in SUITES for i in SERVERS]
    req = ExportRequest(size=64 << 20, read_only=True, content="zero")
    # warm: the version probe of each image/binary is cached on disk by the first start
    t0 = time.monotonic()
    with ThreadPoolExecutor(pool) as ex:
        results = [r for r in ex.map(lambda s: try_start(s, req), specs) if r is not None]
    wall = time.monotonic() - t0
    each = [d for _, d in results]
    print(f"[parallel] {len(results)}/{len(specs)} docker servers, pool {pool}: all ready in {wall:.2f} s "
          f"(each {min(each):.2f}-{max(each):.2f} s, median {statistics.median(each):.2f} s)")
    for srv, d in results:
        print(f"    {srv.spec.id:32s} {d:5.2f} s  {srv.transport}  {srv.versions.get('binary', '?')}")
    t0 = time.monotonic()
    with ThreadPoolExecutor(pool) as ex:
        list(ex.map(lambda r: r[0].stop(), results))
    print(f"[parallel] stopped and removed all in {time.monotonic() - t0:.2f} s")


def bench_fresh(launcher: str, suite: str | None, repeat: int) -> None:
    req = ExportRequest(size=64 << 20)
    for impl in SERVERS:
        starts, stops = [], []
        for _ in range(repeat):
            srv, d = timed_start(spec(impl, launcher, suite), req)
            starts.append(d)
            t0 = time.monotonic()
            srv.stop()
            stops.append(time.monotonic() - t0)
        print(f"[fresh {launcher}{'@' + suite if suite else ''}] {impl:20s} start median "
              f"{statistics.median(starts) * 1000:6.0f} ms (max {max(starts) * 1000:.0f}), stop median "
              f"{statistics.median(stops) * 1000:5.0f} ms  -> per-test overhead "
              f"{(statistics.median(starts) + statistics.median(stops)) * 1000:.0f} ms")


def bench_clients(repeat: int) -> None:
    with start_server(spec("nbdkit", "local"), ExportRequest(size=1 << 20), workdir=export_workdir("c")) as srv:
        for launcher, suite in (("local", None), ("docker", "bookworm")):
            cs = PeerSpec(id=f"nbdinfo@{suite or 'host'}", implementation="nbdinfo", role="client", version="",
                          launcher=launcher, suite=suite)
            t0 = time.monotonic()
            runner = client_runner(cs, workdir=srv.workdir)
            warm = time.monotonic() - t0
            times = []
            for _ in range(repeat):
                r = runner.run(runner.tool_argv("nbdinfo", srv, "--size"), timeout=30)
                assert r.ok, r.stderr
                times.append(r.duration)
            runner.close()
            print(f"[client {launcher}] runner ready in {warm * 1000:.0f} ms; nbdinfo --size median "
                  f"{statistics.median(times) * 1000:.0f} ms (min {min(times) * 1000:.0f})")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pool", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--skip-parallel", action="store_true")
    args = ap.parse_args()
    sweep_stale()
    run = current_run()
    cleanup_on_exit(run)
    try:
        ok, why = docker_available()
        if ok:
            for s in SUITES:
                ensure_image(s)
            if not args.skip_parallel:
                bench_parallel(args.pool)
            bench_fresh("docker", "bookworm", args.repeat)
        else:
            print(f"docker benchmarks skipped: {why}")
        bench_fresh("local", None, args.repeat)
        bench_clients(args.repeat * 2)
    finally:
        cleanup_run(run)
    return 0


if __name__ == "__main__":
    sys.exit(main())
