"""Client review findings: capped transcript, lenient out-of-range chunks, socket leaks, percent-encoded
hosts."""

from __future__ import annotations

from nbdref.client import TRANSCRIPT_MAX, Client

from tests.client.scripted_server import Script, pair


def test_default_transcript_is_capped() -> None:
    # A long-lived client keeps the head and the tail of its wire log, like the server.
    sock, server = pair(Script())
    client = Client(timeout=5)
    client.connect_socket(sock)
    assert client.transcript.max_entries == TRANSCRIPT_MAX
    for _ in range(TRANSCRIPT_MAX // 2 + 1):  # a request and its reply each
        client.pread(512, 0)
    assert len(client.transcript) <= TRANSCRIPT_MAX
    assert client.transcript.omitted > 0
    client.close()
    server.join()
    assert server.error is None


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


def test_connect_when_already_connected_opens_no_socket(workdir) -> None:
    import socket

    import pytest
    from nbdref.client import ClientError

    sock, server = pair(Script())
    client = Client(timeout=5)
    client.connect_socket(sock)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener, \
            socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
        path = str(workdir / "s")
        listener.bind(path)
        listener.listen(4)
        listener.settimeout(0.2)
        tcp.bind(("127.0.0.1", 0))
        tcp.listen(4)
        tcp.settimeout(0.2)
        port = tcp.getsockname()[1]
        with pytest.raises(ClientError, match="already connected"):
            client.connect_unix(path)
        with pytest.raises(ClientError, match="already connected"):
            client.connect_tcp("127.0.0.1", port)
        with pytest.raises(ClientError, match="already connected"):
            client.connect_uri(f"nbd+unix:///other?socket={path}")
        with pytest.raises(ClientError, match="already connected"):
            client.connect_uri(f"nbd://127.0.0.1:{port}/other")
        # Nothing reached the listeners, and the settings of the live connection are unchanged.
        for lsock in (listener, tcp):
            with pytest.raises(TimeoutError):
                lsock.accept()
    assert client.get_export_name() == ""
    client.close()
    server.join()
    assert server.error is None


def test_percent_encoded_reg_name_is_decoded() -> None:
    # RFC 3986 section 3.2.2: reg-name = *( unreserved / pct-encoded / sub-delims )
    from nbdref.uri import parse_uri

    u = parse_uri("nbd://ex%61mple.com:10810/disk")
    assert (u.host, u.port, u.export_name) == ("example.com", 10810, "disk")
    u = parse_uri("nbd://my%20host/disk")
    assert u.host == "my host"
    assert parse_uri(u.to_string()) == u
    import pytest
    from nbdref.uri import UriError

    with pytest.raises(UriError):
        parse_uri("nbd://bad%2/disk")
    with pytest.raises(UriError):
        parse_uri("nbd://b%ffd/disk")  # not UTF-8
