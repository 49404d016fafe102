"""A tiny NBD server over the core's ServerConnection, run in a thread, for client behaviours the host
servers never show: NBD_OPT_GO unsupported, replies out of order, READs split into several chunks,
error chunks, abstract and IPv6 sockets.  Deliberately small: the real reference server is nbdref.server.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from dataclasses import dataclass, field
from typing import Any

from nbdref import NEED_DATA, Cmd, Opt, Rep, ServerConnection, TxFlag
from nbdref import events as ev

FLAGS = TxFlag.HAS_FLAGS | TxFlag.SEND_FLUSH | TxFlag.SEND_WRITE_ZEROES


@dataclass
class Script:
    """What the server does; the defaults are a plain, correct server."""

    size: int = 1 << 20
    unsupported: frozenset[int] = frozenset({Opt.EXTENDED_HEADERS})
    oldstyle: bool = False
    reverse_batch: int = 0  # hold this many READ replies, then send them in reverse order
    split_reads: bool = False  # structured: data, hole, data chunks for one READ
    fail_offset: int | None = None  # READs covering this offset fail with EIO (error chunk / simple error)
    extents: tuple[tuple[int, int], ...] = ((4096, 0), (4096, 3))
    seen: list[ev.Event] = field(default_factory=list)


class ScriptedServer:
    """Serve one connection on `sock` (a connected socket or a listener) following `script`."""

    def __init__(self, sock: socket.socket, script: Script | None = None, *, listening: bool = False) -> None:
        self.script = script or Script()
        self.data = bytearray(self.script.size)
        self.data[:512] = b"\x01" * 512
        self.error: BaseException | None = None
        self._sock = sock
        self._listening = listening
        self._held: list[ev.Event] = []
        self.conn = ServerConnection()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def join(self, timeout: float = 5.0) -> None:
        self._thread.join(timeout)
        with contextlib.suppress(OSError):
            self._sock.close()
        assert not self._thread.is_alive(), "scripted server did not finish"

    def _run(self) -> None:
        sock = self._sock
        try:
            sock.settimeout(5)
            if self._listening:
                sock, _ = self._sock.accept()
                sock.settimeout(5)
            with sock:
                self._serve(sock)
        except BaseException as exc:  # reported by the test through .error
            self.error = exc

    def _send(self, sock: socket.socket, *events: ev.Event) -> None:
        for event in events:
            sock.sendall(self.conn.send(event))

    def _serve(self, sock: socket.socket) -> None:
        s = self.script
        if s.oldstyle:
            self._send(sock, ev.OldstyleGreeting(export_size=s.size, transmission_flags=FLAGS))
        else:
            self._send(sock, ev.NewstyleGreeting())
        while True:
            event = self.conn.next_event()
            if event is NEED_DATA:
                data = sock.recv(1 << 20)
                self.conn.receive_data(data)
                continue
            s.seen.append(event)
            if isinstance(event, ev.ConnectionClosed):
                return
            if isinstance(event, ev.Option):
                if not self._option(sock, event):
                    return
            elif isinstance(event, ev.Request):
                if event.command == Cmd.DISC:
                    return
                self._request(sock, event)

    def _option(self, sock: socket.socket, opt: ev.Option) -> bool:
        s = self.script
        code = opt.option
        if code in s.unsupported:
            self._send(sock, ev.RepError(option=code, reply_type=Rep.ERR_UNSUP))
        elif isinstance(opt, ev.OptExportName):
            self._send(sock, ev.ExportNameReply(export_size=s.size, transmission_flags=FLAGS))
        elif isinstance(opt, ev.OptGo | ev.OptInfo):
            self._send(sock, ev.RepInfoExport(option=code, export_size=s.size, transmission_flags=FLAGS),
                       ev.RepAck(option=code))  # fmt: skip
        elif isinstance(opt, ev.OptSetMetaContext | ev.OptListMetaContext):
            replies: list[ev.Event] = []
            if "base:allocation" in opt.queries or not opt.queries:
                context_id = 1 if isinstance(opt, ev.OptSetMetaContext) else 0
                replies.append(ev.RepMetaContext(option=code, context_id=context_id, name="base:allocation"))
            self._send(sock, *replies, ev.RepAck(option=code))
        elif isinstance(opt, ev.OptList):
            self._send(sock, ev.RepServer(option=code, name=""), ev.RepAck(option=code))
        elif isinstance(opt, ev.OptAbort):
            self._send(sock, ev.RepAck(option=code))
            return False
        else:  # structured replies and anything else we accept
            self._send(sock, ev.RepAck(option=code))
        return True

    def _request(self, sock: socket.socket, req: ev.Request) -> None:
        s = self.script
        replies: list[Any] = []
        structured = self.conn.structured_replies or self.conn.extended_headers
        end = req.offset + req.length
        if req.command == Cmd.READ:
            failing = s.fail_offset is not None and req.offset <= s.fail_offset < end
            if failing and structured:
                replies.append(ev.ErrorChunk(cookie=req.cookie, error=5, message="scripted failure", done=True))
            elif failing:
                replies.append(ev.SimpleReply(cookie=req.cookie, error=5))
            elif structured and s.split_reads and req.length >= 4:
                q = req.length // 4
                first, hole, last = (req.offset, q), (req.offset + q, q), (req.offset + 2 * q, req.length - 2 * q)
                # Chunks may come in any order: send the last piece first.
                replies.append(ev.OffsetData(cookie=req.cookie, offset=last[0],
                                             data=bytes(self.data[last[0] : last[0] + last[1]]), done=False))
                replies.append(ev.OffsetHole(cookie=req.cookie, offset=hole[0], length=hole[1], done=False))
                replies.append(ev.OffsetData(cookie=req.cookie, offset=first[0],
                                             data=bytes(self.data[first[0] : first[0] + first[1]]), done=True))  # fmt: skip
            elif structured:
                data = bytes(self.data[req.offset : end])
                replies.append(ev.OffsetData(cookie=req.cookie, offset=req.offset, data=data, done=True))
            else:
                replies.append(ev.SimpleReply(cookie=req.cookie, data=bytes(self.data[req.offset : end])))
        elif req.command == Cmd.WRITE:
            assert req.payload is not None
            self.data[req.offset : end] = req.payload
            replies.append(self._ok(req, structured))
        elif req.command == Cmd.BLOCK_STATUS:
            replies.append(ev.BlockStatus(cookie=req.cookie, context_id=1, extents=s.extents, done=True))
        else:
            replies.append(self._ok(req, structured))
        if s.reverse_batch and req.command == Cmd.READ:
            self._held.append(replies)  # type: ignore[arg-type]
            if len(self._held) == s.reverse_batch:
                for held in reversed(self._held):
                    self._send(sock, *held)  # type: ignore[misc]
                self._held.clear()
        else:
            self._send(sock, *replies)

    @staticmethod
    def _ok(req: ev.Request, structured: bool) -> ev.Event:
        return ev.NoneChunk(cookie=req.cookie, done=True) if structured else ev.SimpleReply(cookie=req.cookie)


def pair(script: Script | None = None) -> tuple[socket.socket, ScriptedServer]:
    """A connected client socket and the scripted server on the other end of a socketpair."""
    client_sock, server_sock = socket.socketpair()
    return client_sock, ScriptedServer(server_sock, script)
