"""Chunks land in the caller's READ buffer only inside the request, even when lenient mode lets an
out-of-range chunk through."""

from __future__ import annotations

from nbdref.client import Client


def _client_with_read(offset: int, length: int):
    from nbdref import Cmd
    from nbdref import events as ev
    from nbdref.client import _Command

    client = Client(timeout=5)
    buf = bytearray(b"\x55" * length)
    request = ev.Request(cookie=7, command=Cmd.READ, offset=offset, length=length)
    client._commands[7] = _Command(request=request, buffer=memoryview(buf))
    return client, buf


def test_lenient_out_of_range_chunks_do_not_touch_the_buffer() -> None:
    # In lenient mode the core records SR-032 and lets the chunk through: the client must not copy it
    # outside the caller's buffer (a negative start would wrap around, a long one raise ValueError).
    from nbdref import events as ev

    chunks = [
        ev.OffsetData(cookie=7, done=False, offset=4096 - 8, data=b"\xaa" * 16),  # starts before
        ev.OffsetData(cookie=7, done=False, offset=4096 + 500, data=b"\xaa" * 16),  # ends after
        ev.OffsetHole(cookie=7, done=False, offset=4096 - 8, length=16),
        ev.OffsetHole(cookie=7, done=False, offset=4096 + 500, length=16),
        ev.OffsetHole(cookie=7, done=False, offset=8192, length=16),
    ]
    for chunk in chunks:
        client, buf = _client_with_read(4096, 512)
        assert client._on_reply_event(chunk) == 0
        assert buf == b"\x55" * 512, chunk
    # Inside: delivered.
    client, buf = _client_with_read(4096, 512)
    client._on_reply_event(ev.OffsetHole(cookie=7, done=False, offset=4096 + 496, length=16))
    client._on_reply_event(ev.OffsetData(cookie=7, done=False, offset=4096, data=b"\xaa" * 16))
    assert buf == b"\xaa" * 16 + b"\x55" * 480 + bytes(16)
