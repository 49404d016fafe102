"""In-memory pair of connections (h11's ConnectionPair): both roles, no sockets."""

from __future__ import annotations

from nbdref import NEED_DATA, ClientConnection, ServerConnection, Strictness
from nbdref import events as ev
from nbdref._constants import ClientFlag, HandshakeFlag, Info, TxFlag


class ConnectionPair:
    """A client and a server connection wired back to back.

    ``send(side, event)`` encodes with one role, feeds the bytes to the other and returns the events
    the other role decoded (NEED_DATA excluded).
    """

    def __init__(self, client: Strictness | None = None, server: Strictness | None = None) -> None:
        self.client = ClientConnection(strictness=client)
        self.server = ServerConnection(strictness=server)

    def other(self, conn):
        return self.server if conn is self.client else self.client

    def send(self, conn, event) -> list[ev.Event]:
        data = conn.send(event)
        return self.deliver(self.other(conn), data)

    @staticmethod
    def deliver(conn, data: bytes) -> list[ev.Event]:
        conn.receive_data(data)
        out = []
        while True:
            e = conn.next_event()
            if e is NEED_DATA:
                return out
            out.append(e)
            if isinstance(e, ev.ConnectionClosed):
                return out

    def handshake(
        self,
        *,
        structured: bool = True,
        extended: bool = False,
        contexts: tuple[str, ...] = (),
        export_size: int = 1 << 20,
        tx_flags: int = TxFlag.HAS_FLAGS | TxFlag.SEND_FLUSH | TxFlag.SEND_FUA,
        block_size: tuple[int, int, int] | None = None,
    ) -> None:
        """Drive a complete fixed-newstyle negotiation up to the transmission phase."""
        c, s = self.client, self.server
        self.send(s, ev.NewstyleGreeting(flags=HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES))
        self.send(c, ev.ClientFlags(flags=ClientFlag.FIXED_NEWSTYLE | ClientFlag.NO_ZEROES))
        if extended:
            self.send(c, ev.OptExtendedHeaders())
            self.send(s, ev.RepAck(option=ev.OptExtendedHeaders.option))
        if structured:
            self.send(c, ev.OptStructuredReply())
            self.send(s, ev.RepAck(option=ev.OptStructuredReply.option))
        if contexts:
            self.send(c, ev.OptSetMetaContext(name="exp", queries=contexts))
            for i, name in enumerate(contexts, start=1):
                self.send(s, ev.RepMetaContext(option=10, context_id=i, name=name))
            self.send(s, ev.RepAck(option=10))
        info = (Info.BLOCK_SIZE,) if block_size else ()
        self.send(c, ev.OptGo(name="exp", info=info))
        if block_size:
            mn, pref, mx = block_size
            self.send(s, ev.RepInfoBlockSize(option=7, minimum=mn, preferred=pref, maximum=mx))
        self.send(s, ev.RepInfoExport(option=7, export_size=export_size, transmission_flags=tx_flags))
        self.send(s, ev.RepAck(option=7))


def ids(conn) -> list[str]:
    """The requirement ids a connection recorded, in order."""
    return [v.req_id for v in conn.violations]


def send_lenient(p: ConnectionPair, conn, event) -> list[ev.Event]:
    """Send with the sender's local checks off (the step is not under test on that side)."""
    saved = conn.strictness
    conn.strictness = Strictness(check_local=False)
    try:
        return p.send(conn, event)
    finally:
        conn.strictness = saved
