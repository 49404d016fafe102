"""The client's wire log: capped by default (head and tail), like the server's."""

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
