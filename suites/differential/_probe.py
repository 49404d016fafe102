"""What the differential battery shares: asking one odd question and normalizing the server's answer.

Every case sends the same request or option sequence to every server peer and records the answer as a
short string ("NBD_EINVAL", "NBD_REP_ACK", "ok, 0 bytes", "hard disconnect", ...), so that
reports/differential.py can set the answers of all servers side by side.  The reference client sends
illegal traffic on purpose (`LENIENT`: nothing of ours refused, every violation of the server recorded
and judged when the test ends, never raised on the spot), and the core's `local_breach` excuses a
server's hard disconnect after a breach of a MUST of ours (DISC-003 / DISC-017).

Three things the client's public API cannot do are done here, in one place (with the client's private
socket helpers): send an option the client has no method for (`option`), send bytes that are no request
and read the reaction by hand (`raw_reaction`), and speak the handshake with client flags the client
would never send (`Raw`).  Every socket operation has a timeout; a server that does not answer where it must is a test
failure (`NoAnswer`), with the transcript as evidence.
"""

from __future__ import annotations

import contextlib
import socket
import struct
from collections.abc import Callable
from typing import Any

from nbdref import events as ev
from nbdref._constants import REPLY_TYPE_ERROR_BIT, Cmd, Err, Magic, Rep
from nbdref._errors import ProtocolError
from nbdref._strict import Strictness
from nbdref.client import ClientError
from nbdref.connection import NEED_DATA, ClientConnection

from fixtures.exports import expected_bytes
from fixtures.timeouts import SILENCE
from suites.server._haggle import connect as plain_socket
from suites.server._haggle import recv_exact

# Our own breaches are sent, the server's are recorded (and judged by the watch at the end of the test).
LENIENT = Strictness.lenient()
HARD = "hard disconnect"
FOLLOW_UP_TIMEOUT = SILENCE      # a follow-up read on a connection that should still work
PROBE = 512                      # the follow-up read: the first sector of the export


class NoAnswer(AssertionError):
    """The server neither answered nor closed within the timeout (a hang, judged as a failure)."""


def error_name(value: int) -> str:
    """NBD_EINVAL for 22; an undefined value as `error <n>`."""
    try:
        return f"NBD_{Err(value).name}"
    except ValueError:
        return f"error {value}"


def rep_name(reply: Any) -> str:
    """NBD_REP_ACK, NBD_REP_ERR_INVALID, ... of an option reply event."""
    code = reply.reply_type
    return f"NBD_REP_{Rep(code).name}" if code in Rep._value2member_map_ else f"reply {code:#x}"


def setup(*, structured: bool = True, contexts: tuple[str, ...] = (), name: str | None = None
          ) -> Callable[[Any], None]:
    """A ref_client setup: no extended headers (experimental; every server is asked the same way),
    structured replies as asked, the given metadata contexts."""
    def apply(c: Any) -> None:
        c.set_request_extended_headers(False)
        c.set_request_structured_replies(structured)
        for context in contexts:
            c.add_meta_context(context)
        if name is not None:
            c.set_export_name(name)
    return apply


def connect(ref_client: Any, server: Any, *, structured: bool = True, contexts: tuple[str, ...] = (),
            opt_mode: bool = False, timeout: float = SILENCE, name: str | None = None) -> Any:
    """A lenient reference client on `server` (see `setup`); `name`: the export name to ask for."""
    return ref_client(server, strictness=LENIENT, opt_mode=opt_mode, timeout=timeout,
                      setup=setup(structured=structured, contexts=contexts, name=name))


# --------------------------------------------------------------------------------------------------
# Transmission


def command(c: Any, cmd: int, offset: int = 0, length: int = 0, flags: int = 0, *,
            payload: bytes | None = None, timeout: float | None = None) -> str:
    """Send one request and wait for its reply: "ok" ("ok, N bytes" for a READ, "ok, N extents" for a
    BLOCK_STATUS), the error name, or HARD."""
    buf = bytearray(length) if cmd == Cmd.READ and length <= 64 << 20 else None
    extents: list[int] = []

    def on_extents(_name: str, _offset: int, entries: list[int], _err: int) -> None:
        extents.extend(entries[0::2])

    if timeout is not None:
        c.set_timeout(timeout)
    try:
        c.wait(c.aio_command(cmd, offset, length, flags, payload=payload, buffer=buf, extent_cb=on_extents))
    except ClientError as e:
        if e.errno is not None and c.aio_is_ready():
            return error_name(e.errno)
        return HARD
    except (BrokenPipeError, ConnectionResetError):
        return HARD
    except TimeoutError:
        raise NoAnswer(f"no reply to {cmd} (offset {offset}, length {length}, flags {flags:#x}) within "
                       f"{c._timeout:.0f} s, and the connection stayed open") from None
    if cmd == Cmd.READ:
        return f"ok, {length} bytes"
    if cmd == Cmd.BLOCK_STATUS:
        return f"ok, {len(extents)} extent{'s' if len(extents) != 1 else ''}"
    return "ok"


def follow_up(c: Any, export: Any) -> str:
    """After an odd request: does the session still work?  "" when a read of the first sector returns the
    right bytes; otherwise what happened (", then hard disconnect", ", then wrong data")."""
    if not c.aio_is_ready():
        return ", then " + HARD
    try:
        c.set_timeout(FOLLOW_UP_TIMEOUT)
        data = c.pread(PROBE, 0)
    except ClientError as e:
        return f", then {error_name(e.errno)} on a read" if e.errno is not None and c.aio_is_ready() \
            else ", then " + HARD
    except (BrokenPipeError, ConnectionResetError):
        return ", then " + HARD
    except TimeoutError:
        return ", then no answer to a read"
    return "" if data == expected_bytes(export, 0, PROBE) else ", then a read returns wrong data"


def ask(c: Any, export: Any, cmd: int, offset: int = 0, length: int = 0, flags: int = 0, **kw: Any) -> str:
    """`command`, then `follow_up` unless the answer already ended the session."""
    answer = command(c, cmd, offset, length, flags, **kw)
    return answer if answer == HARD else answer + follow_up(c, export)


def still_serves(ref_client: Any, server: Any, export: Any) -> None:
    """A case that ended a session must not have broken the server: a new connection reads right."""
    c = ref_client(server, setup=setup(), timeout=10.0, name="next connection")
    assert c.pread(PROBE, 0) == expected_bytes(export, 0, PROBE), "the next connection reads wrong data"


def disconnected(answer: str) -> bool:
    return HARD in answer or "no answer" in answer


# --------------------------------------------------------------------------------------------------
# Recording and judging answers (shared by the transmission cases)


def head(answer: str) -> str:
    """The answer to the request itself, without what the follow-up read saw."""
    return answer.split(", then ", 1)[0]


def record(verdict: Any, answer: str, *ids: str) -> None:
    """The case's observation: the answer, with the ids of the sentences that leave the room."""
    verdict.info(answer, requirements=ids, only=True)


def advertised(c: Any, flag: int) -> str:
    """"" when the export advertises `flag`; else the prefix that marks the answer as one to a request
    the client was not allowed to send (CMD-008: the server may then do anything)."""
    return "" if c.get_transmission_flags() & flag else "not advertised: "


def after(ref_client: Any, server: Any, export: Any, answer: str) -> None:
    """A case that ended the session: the server must still serve the next connection."""
    if disconnected(answer):
        still_serves(ref_client, server, export)


def should_not_disconnect(verdict: Any, answer: str, req: str) -> None:
    verdict.expect(not disconnected(answer), req, expected="an answer, the session going on", observed=answer)


def expect_einval(verdict: Any, answer: str, req: str) -> None:
    """A SHOULD that names NBD_EINVAL; a hard disconnect is not judged (see the callers)."""
    got = head(answer)
    if got != HARD:
        verdict.expect(got == "NBD_EINVAL", req, expected="NBD_EINVAL", observed=answer)


# --------------------------------------------------------------------------------------------------
# Option haggling


def option(c: Any, event: ev.Option) -> list[Any]:
    """Send one option on an opt-mode client; its replies up to the final one, or [HARD] when the server
    closed (a list ending in HARD when it closed after some replies)."""
    replies: list[Any] = []
    try:
        c._sendall(c.connection.send(event))
        while True:
            reply = c._next()
            if isinstance(reply, ev.ConnectionClosed):
                return [*replies, HARD]
            replies.append(reply)
            if not isinstance(reply, ev.OptionReply) or isinstance(reply, ev.RepAck | ev.RepError):
                return replies
    except (BrokenPipeError, ConnectionResetError):
        return [*replies, HARD]
    except TimeoutError:
        raise NoAnswer(f"no reply to {type(event).__name__} within {c._timeout:.0f} s") from None


def final(replies: list[Any]) -> str:
    """The normalized answer of `option`: the final reply's name (or HARD)."""
    last = replies[-1]
    if last == HARD:
        return HARD
    return rep_name(last) if isinstance(last, ev.OptionReply) else type(last).__name__


def context_names(replies: list[Any]) -> list[str]:
    return [r.name for r in replies if isinstance(r, ev.RepMetaContext)]


def go(c: Any) -> str:
    """NBD_OPT_GO on an opt-mode client: "" when transmission starts and a read works, else why not."""
    try:
        c.opt_go()
    except ClientError as e:
        return f"NBD_OPT_GO refused: {e}"
    except (ProtocolError, OSError) as e:
        return f"NBD_OPT_GO failed: {type(e).__name__}: {e}"
    return ""


# --------------------------------------------------------------------------------------------------
# The handshake, by hand


class Raw:
    """A fixed-newstyle client on the sans-I/O core that sends whatever client flags it is told."""

    def __init__(self, server: Any, timeout: float = 10.0) -> None:
        self.sock = plain_socket(server, timeout)
        self.timeout = timeout
        self.conn = ClientConnection(strictness=LENIENT)
        self.greeting = self.next()

    @property
    def violations(self) -> list[Any]:
        return list(self.conn.violations)

    @property
    def checked(self) -> Any:
        return getattr(self.conn, "checked", ())

    @property
    def transcript(self) -> Any:
        return self.conn.transcript

    def send(self, event: ev.Event) -> None:
        self.sock.sendall(self.conn.send(event))

    def next(self) -> Any:
        while True:
            event = self.conn.next_event()
            if event is not NEED_DATA:
                return event
            try:
                data = self.sock.recv(65536)
            except ConnectionResetError:
                data = b""
            except TimeoutError:
                raise NoAnswer(f"no answer from the server within {self.timeout:.0f} s") from None
            self.conn.receive_data(data)

    def option(self, event: ev.Option) -> str:
        """Send one option; the final reply's name, or HARD."""
        try:
            self.send(event)
            while True:
                reply = self.next()
                if isinstance(reply, ev.ConnectionClosed):
                    return HARD
                if not isinstance(reply, ev.OptionReply) or isinstance(reply, ev.RepAck | ev.RepError):
                    return rep_name(reply) if isinstance(reply, ev.OptionReply) else type(reply).__name__
        except (BrokenPipeError, ConnectionResetError):
            return HARD

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


# --------------------------------------------------------------------------------------------------
# Ending a session


def disc(c: Any, offset: int = 0, length: int = 0) -> None:
    """Send NBD_CMD_DISC (with the given reserved fields) without waiting for what is in flight."""
    conn = c.connection
    c._sendall(conn.send(ev.Request(cookie=conn.next_cookie(), command=Cmd.DISC, offset=offset, length=length)))


def wait_close(c: Any, timeout: float = 5.0) -> str:
    """After NBD_CMD_DISC: "closed" when the server closes within `timeout`, else what it did.  The
    client is abandoned afterwards (it must send nothing more, DISC-026)."""
    sock = c._sock
    try:
        if sock is None:
            return "closed"
        sock.settimeout(timeout)
        more = sock.recv(4096)
        return "closed" if more == b"" else f"sent {len(more)} more bytes"
    except TimeoutError:
        return f"still open after {timeout:.0f} s"
    except (ConnectionResetError, BrokenPipeError):
        return "closed (reset)"
    finally:
        c._abandon()


# --------------------------------------------------------------------------------------------------
# Garbage in transmission: bytes the core does not know as a request, the reaction read by hand


def raw_reaction(c: Any, data: bytes, timeout: float = FOLLOW_UP_TIMEOUT) -> str:
    """Send `data` as it is in transmission and read the server's reaction without the core (it knows of
    no such request): HARD, "no answer within N s", or the one reply that came ("NBD_EINVAL (simple
    reply)", "NBD_EINVAL (error chunk)", ...), read exactly so the core's stream stays in step."""
    sock = c._sock
    c._sendall(c.connection.send_raw(data))
    sock.settimeout(timeout)
    try:
        magic = _recv_exact(sock, 4)
        if magic is None:
            return HARD
        (value,) = struct.unpack(">I", magic)
        if value == Magic.SIMPLE_REPLY:
            rest = _recv_exact(sock, 12)
            if rest is None:
                return "part of a simple reply, then " + HARD
            error, _cookie = struct.unpack(">IQ", rest)
            return f"{error_name(error) if error else 'success'} (simple reply)"
        if value == Magic.STRUCTURED_REPLY:
            rest = _recv_exact(sock, 16)
            if rest is None:
                return "part of a chunk, then " + HARD
            _flags, rtype, _cookie, length = struct.unpack(">HHQI", rest)
            payload = _recv_exact(sock, length) if length else b""
            if payload is None:
                return "part of a chunk, then " + HARD
            if rtype & REPLY_TYPE_ERROR_BIT and len(payload) >= 4:
                return f"{error_name(struct.unpack('>I', payload[:4])[0])} (error chunk)"
            return f"chunk type {rtype} (structured reply)"
        return f"unknown bytes {magic.hex()}"
    except TimeoutError:
        return f"no answer within {timeout:.0f} s"
    except (ConnectionResetError, BrokenPipeError):
        return HARD
    finally:
        sock.settimeout(c._timeout)


def _recv_exact(sock: socket.socket, n: int) -> bytes | None:
    """n bytes, or None at EOF."""
    try:
        return recv_exact(sock, n)
    except EOFError:
        return None
