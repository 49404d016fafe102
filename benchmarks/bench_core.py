"""Hot-path cost of the sans-I/O core, without any real peer (run on demand, not collected by pytest).

    .venv/bin/python benchmarks/bench_core.py [--requests 100000] [--size 1G] [--request-size 256K] [--profile]

1. ``pair``: small READs (4 KiB, simple and structured replies) through an in-memory client/server
   pair: client send -> server receive -> server send reply -> client receive. Prints µs per request
   (both roles' work together, transcripts off).
2. ``socket``: ``--size`` bytes in ``--request-size`` READs over a socketpair, one server thread,
   zero-copy on both sides (``read_buffer`` + ``get_buffer``/``recv_into``, ``send_iov`` +
   ``sendmsg``). Prints µs per request and MiB/s.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import socket
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "impl"))

from nbdref import NEED_DATA, ClientConnection, Cmd, ServerConnection, Transcript  # noqa: E402
from nbdref import events as ev  # noqa: E402
from nbdref._constants import ClientFlag, HandshakeFlag, TxFlag  # noqa: E402

UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
TIMEOUT = 30.0


def parse_size(text: str) -> int:
    return int(text[:-1]) * UNITS[text[-1].upper()] if text[-1].upper() in UNITS else int(text)


def _pair(structured: bool, size: int) -> tuple[ClientConnection, ServerConnection]:
    c = ClientConnection(transcript=Transcript(enabled=False))
    s = ServerConnection(transcript=Transcript(enabled=False))

    def go(src, dst, e) -> list[ev.Event]:
        dst.receive_data(src.send(e))
        out = []
        while (x := dst.next_event()) is not NEED_DATA:
            out.append(x)
        return out

    go(s, c, ev.NewstyleGreeting(flags=HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES))
    go(c, s, ev.ClientFlags(flags=ClientFlag.FIXED_NEWSTYLE | ClientFlag.NO_ZEROES))
    if structured:
        go(c, s, ev.OptStructuredReply())
        go(s, c, ev.RepAck(option=8))
    go(c, s, ev.OptGo(name="exp"))
    go(
        s,
        c,
        ev.RepInfoExport(option=7, export_size=size, transmission_flags=TxFlag.HAS_FLAGS | TxFlag.SEND_FLUSH),
    )
    go(s, c, ev.RepAck(option=7))
    return c, s


def bench_pair(n: int, structured: bool, length: int = 4096) -> float:
    """CPU µs per READ request + reply through both connections (including building the events)."""
    c, s = _pair(structured, 1 << 30)
    data = bytes(length)
    buf = bytearray(length)
    start = time.process_time()  # CPU time of this thread's process: robust against other load
    for i in range(n):
        cookie = i + 1
        s.receive_data(
            c.send(ev.Request(cookie=cookie, command=Cmd.READ, offset=0, length=length, read_buffer=buf))
        )
        req = s.next_event()
        assert isinstance(req, ev.Request) and s.next_event() is NEED_DATA
        if structured:
            parts = s.send_iov(ev.OffsetData(cookie=cookie, offset=req.offset, data=data))
        else:
            parts = s.send_iov(ev.SimpleReply(cookie=cookie, data=data))
        for p in parts:
            c.receive_data(p)
        while (e := c.next_event()) is not NEED_DATA:
            if isinstance(e, ev.ReplyComplete):
                assert e.error == 0
    elapsed = time.process_time() - start
    assert not c.violations and not s.violations
    return elapsed / n * 1e6


def _sendmsg_all(sock: socket.socket, parts: list) -> None:
    """``sendmsg`` may send part of the vector: go on from where it stopped."""
    views = [memoryview(p).cast("B") for p in parts]
    while views:
        n = sock.sendmsg(views)
        while n:
            if n >= len(views[0]):
                n -= len(views.pop(0))
            else:
                views[0], n = views[0][n:], 0


def _serve(sock: socket.socket, conn: ServerConnection, data: bytes) -> None:
    """Answer READs with OFFSET_DATA chunks until NBD_CMD_DISC."""
    try:
        while True:
            view = conn.get_buffer()
            n = sock.recv_into(view)
            conn.buffer_updated(n)
            while (e := conn.next_event()) is not NEED_DATA:
                if isinstance(e, ev.ConnectionClosed):
                    return
                if isinstance(e, ev.Request):
                    if e.command == Cmd.DISC:
                        return
                    reply = ev.OffsetData(cookie=e.cookie, offset=e.offset, data=data[: e.length])
                    _sendmsg_all(sock, conn.send_iov(reply))
    finally:
        sock.close()


def bench_socket(size: int, request_size: int, in_flight: int = 4) -> tuple[float, float]:
    """Read ``size`` bytes over a socketpair; returns (µs per request, MiB/s)."""
    a, b = socket.socketpair()
    a.settimeout(TIMEOUT)
    b.settimeout(TIMEOUT)
    c, s = _pair(True, size)
    server = threading.Thread(target=_serve, args=(b, s, bytes(request_size)), daemon=True)
    server.start()
    buffers = [bytearray(request_size) for _ in range(in_flight)]
    requests = size // request_size
    sent = done = 0
    try:
        start = time.perf_counter()
        while done < requests:
            while sent < requests and sent - done < in_flight:
                buf = buffers[sent % in_flight]
                req = ev.Request(
                    cookie=sent + 1,
                    command=Cmd.READ,
                    offset=sent * request_size,
                    length=request_size,
                    read_buffer=buf,
                )
                a.sendall(c.send(req))
                sent += 1
            view = c.get_buffer()
            n = a.recv_into(view)
            if not n:
                raise RuntimeError("server closed")
            c.buffer_updated(n)
            while (e := c.next_event()) is not NEED_DATA:
                if isinstance(e, ev.ReplyComplete):
                    done += 1
        elapsed = time.perf_counter() - start
        a.sendall(c.send(ev.Request(cookie=c.next_cookie(), command=Cmd.DISC)))
    finally:
        a.close()
        server.join(TIMEOUT)
    assert not c.violations, c.violations
    return elapsed / requests * 1e6, size / (1 << 20) / elapsed


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=100_000)
    parser.add_argument("--size", default="1G")
    parser.add_argument("--request-size", default="256K")
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    prof = cProfile.Profile() if args.profile else None
    if prof:
        prof.enable()
    simple = bench_pair(args.requests, structured=False)
    print(f"pair, 4 KiB READ, simple replies:     {simple:6.2f} µs/request ({args.requests} requests)")
    structured = bench_pair(args.requests, structured=True)
    print(f"pair, 4 KiB READ, structured replies: {structured:6.2f} µs/request")
    if prof:
        prof.disable()
    us, rate = bench_socket(parse_size(args.size), parse_size(args.request_size))
    print(f"socketpair, {args.size} in {args.request_size} READs: {us:6.2f} µs/request, {rate:.0f} MiB/s")
    if prof:
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)
    return 0


if __name__ == "__main__":
    sys.exit(main())
