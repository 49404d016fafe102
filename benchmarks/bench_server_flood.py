"""Flood of WRITE headers without data against the reference server (run on demand, not a timed test).

    .venv/bin/python benchmarks/bench_server_flood.py [--connections 200] [--rss-bound 100]

Starts ``python -m nbdref serve`` on a Unix socket (256 MiB memory export, caps raised just enough for
the flood), then opens ``--connections`` connections that each complete the handshake (NBD_OPT_GO
asking for NBD_INFO_BLOCK_SIZE) and send one WRITE header whose length is the advertised maximum
payload (2^25 when none is advertised) and no data.  Meanwhile, and once all of them hold, a normal
``nbdref.client.Client`` connects, writes 1 MiB and reads it back.  Prints the server's RSS (VmRSS
from /proc) before and after the flood, its peak (VmHWM), and the normal client's latencies.

Bound: the flood may grow the server's RSS by at most ``--rss-bound`` MiB (default 0.5 MiB per
connection, 100 MiB for 200; measured ~0.2 MiB each: a reader thread, a 64 KiB receive buffer, the
first 64 KiB step of the payload buffer, the session's objects).  Before the hardening each header allocated its whole payload: 200 x 32 MiB = 6.4 GiB
declared (24 connections took the server from 87 MiB to 1.6 GiB).  Exit status 1 when the bound is
exceeded or the normal client fails.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import suppress

from nbdref import NEED_DATA, ClientConnection, Cmd, Transcript
from nbdref import _wire as w
from nbdref import events as ev
from nbdref._constants import DEFAULT_MAX_PAYLOAD, ClientFlag, HandshakeFlag, Info
from nbdref.client import Client

from fixtures.readiness import wait_ready

MiB = 1 << 20
TIMEOUT = 30.0


def _status_kib(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _events(sock: socket.socket, conn: ClientConnection) -> ev.Event:
    """The next event from the server, receiving as needed."""
    while (e := conn.next_event()) is NEED_DATA:
        data = sock.recv(65536)
        conn.receive_data(data)
    return e


def flood_one(path: str) -> tuple[socket.socket, int]:
    """Handshake, then a WRITE header of the advertised maximum payload and no data; returns the socket
    (kept open) and the length declared."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(TIMEOUT)
    sock.connect(path)
    conn = ClientConnection(transcript=Transcript(enabled=False))
    greeting = _events(sock, conn)
    assert isinstance(greeting, ev.NewstyleGreeting), greeting
    flags = ClientFlag.FIXED_NEWSTYLE | (ClientFlag.NO_ZEROES if greeting.flags & HandshakeFlag.NO_ZEROES else 0)
    sock.sendall(conn.send(ev.ClientFlags(flags=flags)))
    sock.sendall(conn.send(ev.OptGo(name="", info=(Info.BLOCK_SIZE,))))
    while not isinstance(e := _events(sock, conn), ev.RepAck):
        if isinstance(e, ev.RepError):
            raise RuntimeError(f"NBD_OPT_GO failed: {e}")
    maximum = conn.block_size[2] if conn.block_size else DEFAULT_MAX_PAYLOAD
    header = w.encode_request_header(
        ev.Request(cookie=1, command=Cmd.WRITE, offset=0, length=maximum), conn.extended_headers
    )
    sock.sendall(conn.send_raw(header))  # the header alone: the data never comes
    return sock, maximum


def normal_round(uri: str, data: bytes) -> float:
    """Seconds for connect + 1 MiB WRITE + READ back + disconnect with the reference client."""
    t0 = time.perf_counter()
    c = Client()
    c.set_timeout(TIMEOUT)
    c.connect_uri(uri)
    c.pwrite(data, 0)
    if c.pread(len(data), 0) != data:
        raise RuntimeError("read back other data than written")
    c.shutdown()
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--connections", type=int, default=200)
    ap.add_argument("--rss-bound", type=float, default=None, metavar="MIB",
                    help="allowed RSS growth in MiB (default 0.5 MiB per connection: 100 for 200)")
    args = ap.parse_args(argv)
    bound = args.rss_bound if args.rss_bound is not None else 0.5 * args.connections
    workdir = tempfile.mkdtemp(prefix="nbdflood-", dir="/tmp")
    path = os.path.join(workdir, "s.sock")
    n = args.connections
    argv_ = [sys.executable, "-m", "nbdref", "serve", "--unix", path, "--size", "256M", "--no-transcript",
             "--max-connections", str(n + 16), "--max-threads", str(4 * n + 64)]
    proc = subprocess.Popen(argv_, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    flood: list[socket.socket] = []
    data = os.urandom(MiB)
    latencies: list[float] = []
    errors: list[str] = []
    try:
        wait_ready(unix=path, timeout=TIMEOUT, alive=lambda: proc.poll() is None)
        uri = f"nbd+unix:///?socket={path}"
        normal_round(uri, data)  # warm-up: imports, first pages of the export
        before = _status_kib(proc.pid, "VmRSS")
        done = threading.Event()

        def normal_client() -> None:
            while not done.is_set():
                try:
                    latencies.append(normal_round(uri, data))
                except Exception as e:  # reported and failed below
                    errors.append(repr(e))
                    return
                time.sleep(0.05)

        t = threading.Thread(target=normal_client, daemon=True)
        t.start()
        t0 = time.perf_counter()
        declared = 0
        for _ in range(n):
            sock, length = flood_one(path)
            flood.append(sock)
            declared += length
        flood_s = time.perf_counter() - t0
        time.sleep(1.0)  # let every session reach its recv
        done.set()
        t.join(TIMEOUT)
        during = len(latencies)
        for _ in range(5):  # while all of them hold their connections
            latencies.append(normal_round(uri, data))
        after = _status_kib(proc.pid, "VmRSS")
        peak = _status_kib(proc.pid, "VmHWM")
        threads = _status_kib(proc.pid, "Threads")  # not KiB: the count
        alive = proc.poll() is None
    finally:
        for s in flood:
            s.close()
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        with suppress(OSError):
            os.unlink(path)
            os.rmdir(workdir)
    growth = (after - before) / 1024
    print(f"flood: {n} connections, each a WRITE header of {length} bytes and no data "
          f"({declared / MiB:.0f} MiB declared), opened in {flood_s:.2f} s")
    print(f"server RSS: before {before / 1024:.1f} MiB, after {after / 1024:.1f} MiB "
          f"(+{growth:.1f} MiB, {growth * 1024 / n:.0f} KiB per connection), peak {peak / 1024:.1f} MiB, "
          f"{threads} threads")
    if latencies:
        print(f"normal client (connect, 1 MiB write, read back, disconnect): {len(latencies)} rounds "
              f"({during} during the flood), median {statistics.median(latencies) * 1e3:.1f} ms, "
              f"max {max(latencies) * 1e3:.1f} ms")
    ok = alive and not errors and growth <= bound
    if errors:
        print(f"normal client failed: {errors[0]}")
    if not alive:
        print("the server died")
    print(f"RSS bound +{bound:.0f} MiB: {'ok' if growth <= bound else 'EXCEEDED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
