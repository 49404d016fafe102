"""Public sans-I/O connections: ``ClientConnection``, ``ServerConnection``, ``NEED_DATA``.

Usage (a driver owns the socket; the connection only turns bytes into events and back)::

    from nbdref import ClientConnection, NEED_DATA, events as ev, Cmd, ClientFlag, Info
    c = ClientConnection()
    c.receive_data(sock.recv(65536))            # b"" means EOF
    e = c.next_event()                          # NewstyleGreeting, RepInfoExport, Chunk ... or NEED_DATA
    sock.sendall(c.send(ev.ClientFlags(flags=ClientFlag.FIXED_NEWSTYLE | ClientFlag.NO_ZEROES)))
    sock.sendall(c.send(ev.OptGo(name="exp", info=(Info.BLOCK_SIZE,))))   # ... RepAck -> TRANSMISSION
    buf = bytearray(1 << 20)
    sock.sendall(c.send(ev.Request(cookie=c.next_cookie(), command=Cmd.READ, length=len(buf), read_buffer=buf)))
    view = c.get_buffer(); n = sock.recv_into(view); c.buffer_updated(n)   # zero-copy: data lands in buf
    # events: OffsetData(in_place=True, offset, length) ..., then ReplyComplete(cookie, error)

The server side is symmetric: ``ServerConnection().send(ev.NewstyleGreeting())``, then next_event()
yields ClientFlags, Option subclasses and Request events; answer with RepInfoExport/RepAck,
SimpleReply / OffsetData / BlockStatus / ... (``send_iov`` keeps a READ payload uncopied).
After a STARTTLS ACK, next_event() returns StartTLS once; wrap the socket, feed ``trailing_data`` to
the TLS layer, then call ``tls_established()``. Peer rule breaches land in ``conn.violations``;
fatal ones raise RemoteProtocolError. Our own illegal sends raise LocalProtocolError (a breach at a
fatal level, or of an id in ``Strictness(refuse=...)``) unless the requirement id is in
``Strictness(disabled=...)`` or ``check_local=False``; other breaches are sent and noted.

An observer (``nbdref.proxy``) runs one connection per direction: ``discard_payloads=True`` counts
READ / large WRITE data past instead of storing it, and ``observe(event)`` applies a message of our
own role that the other connection decoded (see ``Connection.observe``).
"""

from __future__ import annotations

from ._connection import ACK_TRANSITIONS, NEED_DATA, TRANSITIONS, Connection, Role, State
from ._strict import Strictness
from ._transcript import Transcript

__all__ = [
    "ACK_TRANSITIONS",
    "NEED_DATA",
    "TRANSITIONS",
    "ClientConnection",
    "Connection",
    "Role",
    "ServerConnection",
    "State",
]


class ClientConnection(Connection):
    """The client role: sends ClientFlags, options and requests; receives the server's messages."""

    def __init__(
        self,
        strictness: Strictness | None = None,
        transcript: Transcript | None = None,
        *,
        discard_payloads: bool = False,
    ) -> None:
        super().__init__(Role.CLIENT, strictness, transcript, discard_payloads=discard_payloads)


class ServerConnection(Connection):
    """The server role: sends the greeting, option replies and replies; receives the client's."""

    def __init__(
        self,
        strictness: Strictness | None = None,
        transcript: Transcript | None = None,
        *,
        discard_payloads: bool = False,
    ) -> None:
        super().__init__(Role.SERVER, strictness, transcript, discard_payloads=discard_payloads)
