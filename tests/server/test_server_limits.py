"""Caps of the reference server: connections, threads, bytes buffered per connection and in total.

Hardening: 400 idle sockets used to cost 402 threads for the 60 s handshake limit, and a 28-byte
WRITE header could make a connection hold 64 MiB.  Over a connection or thread cap the server
accepts and closes at once (the client sees EOF, no thread is spent); a declared WRITE that no budget
could hold is refused (hard disconnect, BSZ-023); a full byte budget makes readers wait.
"""

from __future__ import annotations

import os
import socket
import threading
import time

import pytest
from nbdref.client import Client, ClientError
from nbdref.server import Export

from . import rawclient as rc

MiB = 1 << 20
TIMEOUT = 5.0


def idle(server) -> socket.socket:
    """A client that connects, reads the greeting and then says nothing (it holds a slot)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(TIMEOUT)
    rc.OPENED.append(s)
    s.connect(server.address)
    assert rc.recv_exact(s, 8) == b"NBDMAGIC"
    return s


def refused_at_once(server) -> float:
    """Connect (the kernel accepts) and time how long until the server closes without a greeting."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(TIMEOUT)
    rc.OPENED.append(s)
    t0 = time.monotonic()
    s.connect(server.address)
    try:
        data = s.recv(18)
    except ConnectionResetError:
        data = b""
    assert data == b"", "a connection over the cap got a greeting"
    return time.monotonic() - t0


def server_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("nbdref-c")]


def wait_until(cond, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def client(server, timeout: float = TIMEOUT) -> Client:
    c = Client()
    c.set_timeout(timeout)
    c.connect_uri(server.uri)
    return c


def write_read(server, size: int = 64 * 1024) -> None:
    c = client(server)
    data = os.urandom(size)
    c.pwrite(data, 4096)
    assert c.pread(size, 4096) == data
    c.shutdown()


def test_connection_cap_refuses_the_excess_at_once_without_a_thread(serve):
    s = serve(max_connections=3, handshake_timeout=60)
    for _ in range(3):
        idle(s)
    wait_until(lambda: s.active == 3)
    before = len(server_threads())
    assert before == 3
    for _ in range(20):
        assert refused_at_once(s) < 2.0  # not the 60 s handshake limit
    assert s.refused == 20 and s.active == 3
    assert len(server_threads()) == before
    assert len(s.records) == 3  # refusals leave no record


def test_normal_client_served_while_idle_sockets_hold_slots(serve):
    s = serve([Export.memory("exp", 4 * MiB)], max_connections=4, handshake_timeout=60)
    held = [idle(s) for _ in range(3)]
    t0 = time.monotonic()
    write_read(s)  # the last slot
    assert time.monotonic() - t0 < 2.0
    wait_until(lambda: s.active == 3)  # the client's slot frees once its session has ended
    held.append(idle(s))  # all four slots held
    wait_until(lambda: s.active == 4)
    with pytest.raises((ClientError, OSError)):
        client(s).pread(512, 0)
    held.pop().close()  # a slot frees as soon as the server sees the EOF
    wait_until(lambda: s.active == 3)
    write_read(s)


def test_thread_cap_bounds_connections_and_their_workers(serve):
    s = serve([Export.memory("exp", 4 * MiB)], max_connections=10, max_threads=3, workers=1)
    a = client(s)
    a.pwrite(b"a" * 65536, 0)  # its reader + the worker its first WRITE takes: 2 threads
    b = client(s)  # the last thread: its own reader; no worker left, so it answers inline
    b.pwrite(b"b" * 65536, 65536)
    assert b.pread(65536, 0) == b"a" * 65536 and a.pread(65536, 65536) == b"b" * 65536
    assert len(server_threads()) <= 3
    assert refused_at_once(s) < 2.0
    a.shutdown()
    b.shutdown()
    wait_until(lambda: s.thread_slots.used == 0)
    write_read(s)  # everything was given back


def test_declared_write_over_the_budget_is_refused(serve):
    s = serve([Export.memory("exp", 16 * MiB)], max_buffer=2 * MiB, max_connection_buffer=2 * MiB)
    c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    c.settimeout(TIMEOUT)
    rc.OPENED.append(c)
    c.connect(s.address)
    rc.handshake(c)
    t0 = time.monotonic()
    c.sendall(rc.request(1, 0, 4 * MiB, cookie=1))  # WRITE header alone: 4 MiB declared, none sent
    assert rc.closed(c)
    assert time.monotonic() - t0 < 2.0
    wait_until(lambda: s.records[0].ended.is_set())
    assert "buffer budget" in s.records[0].reason
    assert s.buffer_budget.used == 0
    write_read(s, 1 * MiB)  # a WRITE that fits is served


def test_full_budget_makes_readers_wait_until_it_frees(serve):
    """A holds the whole budget with a WRITE it never finishes: B's bytes are not read (B waits) until
    A's stall reaches io_timeout and A is dropped."""
    s = serve([Export.memory("exp", 4 * MiB)], max_buffer=MiB, max_connection_buffer=MiB, io_timeout=1.0)
    a = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    a.settimeout(TIMEOUT)
    rc.OPENED.append(a)
    a.connect(s.address)
    rc.handshake(a)
    a.sendall(rc.request(1, 0, MiB, cookie=1) + bytes(MiB - 4096))
    wait_until(lambda: s.buffer_budget.used >= MiB - 64 * 1024)
    t0 = time.monotonic()
    write_read(s, 4096)
    waited = time.monotonic() - t0
    assert waited >= 0.5, f"B was served after {waited:.2f} s while the budget was full"
    rec_a = s.records[0]
    assert rec_a.ended.is_set() and "no progress inside a message" in rec_a.reason
    wait_until(lambda: s.buffer_budget.used == 0)


def test_payload_bytes_stay_charged_until_the_reply(serve):
    """Accounting: what was read and answered is given back; nothing leaks across many WRITEs."""
    s = serve([Export.memory("exp", 8 * MiB)], max_buffer=4 * MiB, max_connection_buffer=4 * MiB, workers=4)
    c = client(s)
    for i in range(16):
        c.aio_pwrite(os.urandom(MiB), (i % 8) * MiB)  # 16 MiB through a 4 MiB budget
    c.wait_all()
    assert s.buffer_budget.used <= 4 * MiB
    c.shutdown()
    wait_until(lambda: s.buffer_budget.used == 0)


def test_budgets_are_validated():
    from nbdref.server import Server

    with pytest.raises(ValueError):
        Server([Export.memory("exp", MiB)], max_buffer=4096)
    with pytest.raises(ValueError):
        Server([Export.memory("exp", MiB)], max_connections=0)


def test_cli_shows_and_passes_the_caps(capsys):
    from nbdref.cli import serve as cli

    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    for opt in ("--max-connections", "--max-threads", "--max-buffer", "--max-connection-buffer",
                "--max-requests-in-flight"):
        assert opt in out
    args = cli.build_parser().parse_args(["--max-connections", "7", "--max-buffer", "64M"])
    assert args.max_connections == 7 and args.max_buffer == 64 * MiB
    assert cli.build_parser().parse_args(["--max-requests-in-flight", "9"]).max_requests_in_flight == 9


def raw(server, timeout: float = TIMEOUT) -> socket.socket:
    c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    c.settimeout(timeout)
    rc.OPENED.append(c)
    c.connect(server.address)
    rc.handshake(c)
    return c


def test_writes_partway_do_not_starve_each_other_of_the_budget(serve):
    """Three clients each send half of a 4 MiB WRITE, pause, then the rest, through a budget of little
    more than two payloads.  Charged read by read (at most 1 MiB ahead), the partial payloads filled the
    budget and none could finish until io_timeout; with each payload charged whole at its header, two
    go through and the third waits for room, then goes through too."""
    size = 4 * MiB
    s = serve([Export.memory("exp", 16 * MiB)], max_buffer=2 * size + MiB // 4,
              max_connection_buffer=2 * size + MiB // 4, io_timeout=3.0)
    results: dict[int, object] = {}
    socks: list[socket.socket] = []

    def writer(i: int) -> None:
        try:
            c = raw(s, timeout=10.0)
            socks.append(c)
            data = bytes([i + 1]) * size
            c.sendall(rc.request(1, i * size, size, cookie=i + 1) + data[: size // 2])
            time.sleep(0.5)
            c.sendall(data[size // 2 :])
            results[i] = rc.simple_reply(c)
        except Exception as e:  # reported by the assertion below
            results[i] = e

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(3)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(15)
    assert results == {i: (0, i + 1) for i in range(3)}
    assert time.monotonic() - t0 < 3.0  # nobody waited for io_timeout
    assert not any(r.ended.is_set() for r in s.records)  # none was cut off
    c = client(s)
    assert [c.pread(16, i * size) for i in range(3)] == [bytes([i + 1]) * 16 for i in range(3)]
    c.shutdown()
    for c in socks:
        c.close()
    wait_until(lambda: s.buffer_budget.used == 0)


def test_pipelined_reads_are_capped_in_flight(serve, tmp_path):
    """A client that sends 2,000 READs and reads no reply: the reader stops at the in-flight cap (the
    worker pool's queue stays bounded), and every reply arrives once the client reads."""
    path = tmp_path / "disk"
    path.write_bytes(bytes(range(256)) * 4096)
    s = serve([Export.file("exp", path)], max_requests_in_flight=16, workers=2)
    c = raw(s, timeout=10.0)
    n = 2000
    sender = threading.Thread(target=c.sendall,
                              args=(b"".join(rc.request(0, (i % 1000) * 512, 65536, cookie=i + 1) for i in range(n)),))
    sender.start()
    wait_until(lambda: s._sessions and next(iter(s._sessions.values())).in_flight >= 16)
    time.sleep(0.5)  # the server has had time to read far more if it did not wait
    session = next(iter(s._sessions.values()))
    assert session.in_flight_peak <= 16
    assert s.records[0].requests < 200  # the cap, plus replies that fit in the socket buffers
    seen = set()
    for _ in range(n):
        err, cookie = rc.simple_reply(c)
        assert err == 0
        rc.recv_exact(c, 65536)
        seen.add(cookie)
    sender.join(TIMEOUT)
    assert seen == set(range(1, n + 1))
    assert session.in_flight_peak <= 16 and s.records[0].requests == n
    c.sendall(rc.request(2))  # DISC
    assert rc.closed(c)


def test_failure_after_admission_gives_the_slots_back(serve, monkeypatch):
    """An exception building the session (or setting up the socket) after the slots were taken used to
    leak both slots and kill the accept thread."""
    from nbdref.server import _server

    real = _server.Session
    calls = []

    def failing(*a, **kw):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("injected")
        return real(*a, **kw)

    monkeypatch.setattr(_server, "Session", failing)
    s = serve([Export.memory("exp", 4 * MiB)])
    c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    c.settimeout(TIMEOUT)
    rc.OPENED.append(c)
    c.connect(s.address)
    assert rc.closed(c)
    wait_until(lambda: s.connection_slots.used == 0 and s.thread_slots.used == 0)
    write_read(s)
    assert len(calls) == 2
    wait_until(lambda: s.connection_slots.used == 0 and s.thread_slots.used == 0)


def test_headers_whose_data_never_comes_hold_no_budget(serve):
    """WRITE headers of a whole payload each with no data (a flood) charge nothing until their first
    byte arrives: a budget of two payloads does not stop a third, normal client from its handshake, a
    write and a read.  (Charging the payload at its header let such a flood lock everyone out.)"""
    size = 4 * MiB
    s = serve([Export.memory("exp", 16 * MiB)], max_buffer=2 * size, max_connection_buffer=size,
              io_timeout=10.0)
    flood = []
    for i in range(3):
        c = raw(s, timeout=10.0)
        c.sendall(rc.request(1, i * size, size, cookie=i + 1))      # the header alone
        flood.append(c)
    time.sleep(0.3)
    t0 = time.monotonic()
    write_read(s)
    assert time.monotonic() - t0 < 3.0, "the normal client waited for the flood's budget"
    for c in flood:
        c.close()
    wait_until(lambda: s.buffer_budget.used == 0)
