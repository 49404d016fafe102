"""Client connects wait within their timeout while the listener is busy, instead of failing at once.

A Unix listener whose backlog is full answers a connect on a socket with a timeout (non-blocking
underneath) with EAGAIN immediately; a TCP port nobody listens on answers ECONNREFUSED, which is final.
"""

from __future__ import annotations

import contextlib
import errno
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from nbdref.client import Client

from tests.client.scripted_server import Script, ScriptedServer

TIMEOUT = 5.0


@contextlib.contextmanager
def full_unix_listener(path: Path) -> Iterator[tuple[socket.socket, list[socket.socket]]]:
    """A Unix listener with backlog 1 that nobody accepts from, filled until connects get EAGAIN;
    yields (listener, the queued filler connections)."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.settimeout(TIMEOUT)
    fillers: list[socket.socket] = []
    try:
        listener.bind(str(path))
        listener.listen(1)
        for _ in range(64):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(TIMEOUT)
            s.setblocking(False)
            try:
                s.connect(str(path))
            except BlockingIOError:
                s.close()
                break
            fillers.append(s)
        else:
            raise AssertionError("the backlog never filled up")
        # The precondition the client meets: a connect with a timeout fails at once with EAGAIN.
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(TIMEOUT)
        with probe, pytest.raises(BlockingIOError) as info:
            probe.connect(str(path))
        assert info.value.errno == errno.EAGAIN
        yield listener, fillers
    finally:
        for s in fillers:
            s.close()
        listener.close()


def connect_in_thread(c: Client, target: str | tuple[str, int]) -> tuple[threading.Thread, list[object]]:
    """Start c.connect_unix / c.connect_tcp in a thread; the list gets None or the exception."""
    outcome: list[object] = []

    def run() -> None:
        try:
            if isinstance(target, str):
                c.connect_unix(target)
            else:
                c.connect_tcp(*target)
            outcome.append(None)
        except BaseException as exc:  # reported to the test
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome


def test_unix_connect_waits_for_a_full_backlog(workdir: Path) -> None:
    path = workdir / "busy.sock"
    with full_unix_listener(path) as (listener, fillers):
        c = Client(timeout=TIMEOUT)
        thread, outcome = connect_in_thread(c, str(path))
        try:
            time.sleep(0.3)
            # Still trying (before the fix: BlockingIOError at once).
            assert thread.is_alive(), outcome
            # Drain: accept the queued fillers (first in, first out), then serve the client's connection.
            for _ in fillers:
                accepted, _ = listener.accept()
                accepted.close()
            server = ScriptedServer(listener, Script(oldstyle=True, size=1 << 16), listening=True)
            thread.join(TIMEOUT)
            assert outcome == [None]
            assert c.get_size() == 1 << 16
        finally:
            c.close()
        server.join()
        assert server.error is None, server.error


def test_unix_connect_gives_up_after_its_timeout(workdir: Path) -> None:
    path = workdir / "stuck.sock"
    with full_unix_listener(path):
        c = Client(timeout=0.5)
        start = time.monotonic()
        with pytest.raises(TimeoutError, match="EAGAIN") as info:
            c.connect_unix(path)
        elapsed = time.monotonic() - start
        c.close()
    assert 0.45 <= elapsed < 3.0, elapsed
    assert "connect_unix" in str(info.value) and str(path) in str(info.value)
    assert isinstance(info.value.__cause__, BlockingIOError)


def free_tcp_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_tcp_connect_refused_fails_at_once() -> None:
    # ECONNREFUSED: nobody listens (a dead peer).  A full TCP backlog drops the SYN and connect() waits
    # by itself, so a refusal is never "busy": failing at once keeps a dead server from costing each
    # test its whole timeout.
    port = free_tcp_port()
    c = Client(timeout=5.0)
    start = time.monotonic()
    with pytest.raises(ConnectionRefusedError):
        c.connect_tcp("127.0.0.1", port)
    elapsed = time.monotonic() - start
    c.close()
    assert elapsed < 1.0, elapsed


def test_other_errors_are_not_retried(workdir: Path) -> None:
    # No socket file at all: not a busy listener, so the error comes at once, unchanged.
    c = Client(timeout=TIMEOUT)
    start = time.monotonic()
    with pytest.raises(FileNotFoundError):
        c.connect_unix(workdir / "missing.sock")
    assert time.monotonic() - start < 1.0
    c.close()
