"""Socket helpers shared by the drivers (client and server); the sans-I/O core never touches sockets."""

from __future__ import annotations

import socket
from collections.abc import Iterable

IOV_BATCH = 512  # buffers per sendmsg call; Linux's IOV_MAX is 1024


def sendmsg_all(sock: socket.socket, buffers: Iterable[bytes | bytearray | memoryview]) -> int:
    """Send every buffer with ``socket.sendmsg`` as it is (a header and its data, no join, no copy),
    resuming after partial sends.  Returns the number of bytes sent."""
    views = [memoryview(b).cast("B") for b in buffers if len(b)]
    total = 0
    while views:
        sent = sock.sendmsg(views[:IOV_BATCH])
        total += sent
        while sent:
            if sent >= len(views[0]):
                sent -= len(views[0])
                views.pop(0)
            else:
                views[0] = views[0][sent:]
                sent = 0
    return total
