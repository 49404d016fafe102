"""One client, one connection: connecting again fails before any socket opens or any setting changes."""

from __future__ import annotations

from nbdref.client import Client

from tests.client.scripted_server import Script, pair


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
