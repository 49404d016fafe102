"""Readiness = the NBDMAGIC greeting: anything else is not ready, in bounded time."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import pytest

from fixtures.readiness import NotReady, wait_ready


def greeter(path: Path, payload: bytes) -> socket.socket:
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(path))
    s.listen(4)

    def serve() -> None:
        try:
            while True:
                c, _ = s.accept()
                c.sendall(payload)
                c.close()
        except OSError:
            pass

    threading.Thread(target=serve, daemon=True).start()
    return s


def test_ready_on_nbdmagic(tmp_path: Path) -> None:
    with greeter(tmp_path / "s", b"NBDMAGICIHAVEOPT"):
        assert wait_ready(unix=tmp_path / "s", timeout=2) < 1


def test_wrong_greeting_is_not_ready(tmp_path: Path) -> None:
    with greeter(tmp_path / "s", b"HTTP/1.1 200 OK"), pytest.raises(NotReady, match="not NBDMAGIC"):
        wait_ready(unix=tmp_path / "s", timeout=2)


def test_nothing_listening_times_out(tmp_path: Path) -> None:
    t0 = time.monotonic()
    with pytest.raises(NotReady, match=r"within 0\.3 s"):
        wait_ready(unix=tmp_path / "none", timeout=0.3)
    assert time.monotonic() - t0 < 1.5


def test_dead_peer_stops_the_wait(tmp_path: Path) -> None:
    t0 = time.monotonic()
    with pytest.raises(NotReady, match="exited"):
        wait_ready(unix=tmp_path / "none", timeout=10, alive=lambda: False)
    assert time.monotonic() - t0 < 0.5
