"""A server told to shut down gracefully (SIGTERM to a process or container, ``Server.shutdown`` for the
in-process reference server), in option haggling and in transmission with requests in flight.

Each test has a server of its own (``fresh_export``): the shutdown ends it.  What a test cannot tell apart
is not judged: a server that has not yet begun shutting down when the next message arrives answers it as
usual (recorded, not judged), and an error value is judged only where the server sent one.
"""

from __future__ import annotations

import contextlib
import select
import socket
import time
from collections.abc import Callable

import pytest
from nbdref import events as ev
from nbdref._constants import Err, Opt, Rep
from nbdref.client import Client, ClientError

from fixtures.expectations import option_haggling
from fixtures.exports import ExportRequest, expected_bytes
from fixtures.judging import Judge
from fixtures.launchers.base import SHUTDOWN_GRACE, RunningServer
from fixtures.peerspec import PeerSpec
from fixtures.timeouts import SILENCE
from suites.server._common import error_name, rep_name, server_chunks
from suites.server._haggle import connect

SECTION = "Terminating the transmission phase"
MiB = 1 << 20
# Data everywhere (no holes): each READ's reply carries its whole length.
EXPORT = ExportRequest(size=16 * MiB, content="pattern")
# 8 x 4 MiB of replies: more than the socket buffers hold, so the server is still sending them (blocked on
# a client that has stopped reading) when it is told to shut down.
READS, READ_SIZE = 8, 4 * MiB
# After the trigger, new connections are tried until one is refused, closed or not greeted (the server is
# seen to be shutting down), for up to SILENCE.  A running server greets within milliseconds: PROBE leaves
# a loaded machine a wide margin before an un-greeted connection is taken for a shutdown.
GRACE = SHUTDOWN_GRACE  # the in-process server's grace (a process keeps its own)
PROBE = SILENCE / 3
PROBE_EVERY = SILENCE / 30  # between probes that were greeted
REPLY_WAIT = GRACE + SILENCE  # a reply may come as late as the end of the in-process grace
CLOSE_WAIT = 0.3      # how long an idle connection is watched for the close (recorded, not judged)
# Closes during a shutdown are judged here (DISC-013 / DISC-018), not as unexplained hard disconnects.
JUDGED = ("DISC-006", "DISC-024", "SR-023")
# Where a peer's close at the shutdown was confirmed in its source (quoted in the verdict).
CLOSE_SOURCE = {
    "qemu-nbd": "qemu nbd/server.c: nbd_export_request_shutdown() -> client_close()",
    "qemu-storage-daemon": "qemu nbd/server.c: nbd_export_request_shutdown() -> client_close()",
    "nbd-server": "nbd-server.c: the parent's SIGTERM handler kills the connection children (killchild)",
}


def _own_server(fresh_export: Callable[..., RunningServer], verdict: Judge) -> RunningServer:
    """A server of this test's own, one whose launcher can ask it to shut down."""
    server = fresh_export(EXPORT)
    if not server.can_request_shutdown:
        verdict.not_applicable(f"{server.spec.launcher} launcher cannot ask for a graceful shutdown")
    return server


def _trigger(server: RunningServer) -> None:
    """Ask for the shutdown (SIGTERM to a process, Server.shutdown in-process); returns at once."""
    server.request_shutdown(GRACE)


def _connect(ref_client: Callable[..., Client], server: RunningServer, *, opt_mode: bool = False) -> Client:
    """A reference client on ``server``, not watched as a shared server is (this one is meant to go)."""
    c = ref_client(server, connect=False, opt_mode=opt_mode, allow=JUDGED, timeout=REPLY_WAIT)
    c.connect_uri(server.uri)
    return c


def _eof_already(c: Client, wait: float = 0.0) -> bool:
    """The server has closed the connection (within ``wait`` seconds); unread bytes before the EOF count as
    open."""
    sock = c._sock
    if sock is None:
        return True
    if not select.select([sock], [], [], wait)[0]:
        return False
    try:
        return sock.recv(1, socket.MSG_PEEK) == b""
    except OSError:
        return True


def _replies_since(c: Client, mark: int) -> list[ev.OptionReply]:
    """Option replies the server sent after transcript entry ``mark``."""
    return [e.event for e in list(c.transcript)[mark:] if e.direction == "S" and isinstance(e.event, ev.OptionReply)]


def _reading(peer: PeerSpec) -> str:
    """How a close at the shutdown is judged, and where the peer's source does it (where confirmed)."""
    source = CLOSE_SOURCE.get(peer.implementation)
    return ("Read as: DISC-013's \"SHOULD error further options received ... with NBD_REP_ERR_SHUTDOWN\" "
            "applies to a server that closes instead of answering; proto.md's \"MAY error any inflight "
            "option\" allows an error reply, not a close" + (f"; the close is in {source}" if source else ""))


# "If the server is in the process of being shut down it MAY error any inflight option and SHOULD error
# further options received (other than an NBD_OPT_ABORT) with NBD_REP_ERR_SHUTDOWN" (DISC-013).  The
# option is sent only once the server is seen to be shutting down (it no longer greets new clients); one
# that still greets them after SILENCE is recorded, not judged.
@pytest.mark.req("DISC-013")
@pytest.mark.feature("fixed-newstyle")
def test_option_during_shutdown(server_peer: PeerSpec, fresh_export: Callable[..., RunningServer],
                                ref_client: Callable[..., Client], verdict: Judge) -> None:
    """After an INFO, the server is told to shut down; the next INFO gets NBD_REP_ERR_SHUTDOWN, ABORT an ACK."""
    why = option_haggling(server_peer)
    if why is not None:
        verdict.not_applicable(f"needs option haggling: {why}")
    server = _own_server(fresh_export, verdict)
    c = _connect(ref_client, server, opt_mode=True)
    before = _info(c)                           # refused is an answer too: the haggling has begun
    t0 = time.monotonic()
    _trigger(server)
    closed_first, seen = _await_shutdown(c, server)
    after = f"{time.monotonic() - t0:.2f} s after the shutdown was asked for"
    if closed_first:
        verdict.fail("DISC-013", expected="NBD_REP_ERR_SHUTDOWN to an option sent during the shutdown",
                     observed=f"no option could be sent: the server closed the connection at the shutdown "
                              f"({after}). {_reading(server_peer)}")
        return
    mark = len(list(c.transcript))
    failure = _info(c, raw=True)
    replies = _replies_since(c, mark)
    first = replies[0] if replies else None
    if seen is None:
        # Still greeting new clients: it has not begun to shut down (or ignores the request); not judged.
        got = rep_name(first) if first is not None else _no_reply(c, failure)
        verdict.info(f"NBD_OPT_INFO {after}: {got} (before it: {before}); the server still greeted new "
                     f"clients {SILENCE:g} s after the shutdown was asked for: not seen to be shutting down",
                     only=True)
    elif first is None:
        verdict.fail("DISC-013", expected="NBD_REP_ERR_SHUTDOWN to an option sent during the shutdown",
                     observed=f"{_no_reply(c, failure)}, to the option sent once the server was seen shutting "
                              f"down (a new connection {seen}). {_reading(server_peer)}")
        return
    elif isinstance(first, ev.RepError) and first.reply_type == Rep.ERR_SHUTDOWN:
        verdict.held("DISC-013", expected="NBD_REP_ERR_SHUTDOWN", observed="NBD_REP_ERR_SHUTDOWN")
        # The client answers it with NBD_OPT_ABORT (DISC-014), which must not get the same refusal.
        abort = [rep_name(r) for r in replies[1:] if r.option == Opt.ABORT]
        verdict.expect(not abort or abort == ["NBD_REP_ACK"], "DISC-013",
                       expected="NBD_OPT_ABORT acknowledged during the shutdown (or the connection closed)",
                       observed=", ".join(abort))
        verdict.info(f"NBD_OPT_ABORT after NBD_REP_ERR_SHUTDOWN: {', '.join(abort) or 'closed without a reply'}")
        return
    else:
        final = [r for r in replies if isinstance(r, ev.RepAck | ev.RepError)]
        verdict.fail("DISC-013", expected="NBD_REP_ERR_SHUTDOWN to an option sent during the shutdown",
                     observed=f"{rep_name(final[0] if final else first)} (before the shutdown: {before}), sent "
                              f"once the server was seen shutting down (a new connection {seen})")
    with contextlib.suppress(ClientError, OSError):
        c.opt_abort()


def _await_shutdown(c: Client, server: RunningServer) -> tuple[bool, str | None]:
    """Probe new connections until the server is seen to be shutting down, for up to SILENCE:
    (the watched connection closed meanwhile, how a new connection was turned away or None)."""
    deadline = time.monotonic() + SILENCE
    while True:
        if _eof_already(c):
            return True, None
        seen = _turned_away(server)
        if seen is not None:
            return _eof_already(c), seen
        if time.monotonic() >= deadline:
            return False, None
        time.sleep(PROBE_EVERY)


def _no_reply(c: Client, failure: str) -> str:
    """What became of an option that got no reply: closed, or nothing within the client's timeout."""
    if "Timeout" in failure and not _eof_already(c):
        return f"no reply within {REPLY_WAIT:g} s ({failure})"
    return f"no reply: the server closed the connection ({failure})"


def _info(c: Client, *, raw: bool = False) -> str:
    """NBD_OPT_INFO on the export: the name of its final reply; ``raw``: "" or why the call failed."""
    try:
        c.opt_info()
        return "" if raw else "NBD_REP_ACK"
    except (ClientError, OSError) as e:
        if raw:
            return f"{type(e).__name__}: {e}"
        final = [r for r in _replies_since(c, 0) if isinstance(r, ev.RepAck | ev.RepError)]
        return rep_name(final[-1]) if final else f"{type(e).__name__}: {e}"


def _turned_away(server: RunningServer) -> str | None:
    """None if a new connection gets the NBDMAGIC greeting within PROBE; else how it was turned away (a
    server shutting down stops accepting, or accepts and closes or never answers)."""
    try:
        with contextlib.closing(connect(server, timeout=PROBE)) as sock:
            got = b""
            while len(got) < 8 and (chunk := sock.recv(8 - len(got))):
                got += chunk
    except TimeoutError:
        return f"was not greeted within {PROBE:g} s"
    except OSError as e:
        return f"was refused ({type(e).__name__})"
    if got == b"NBDMAGIC":
        return None
    return f"was closed after {len(got)} bytes" if len(got) < 8 else f"got {got!r}, not NBDMAGIC"


# "On a server shutdown, the server SHOULD wait for inflight requests to be serviced prior to initiating a
# hard disconnect" (DISC-018); "The error value issued in respect of these requests and any subsequently
# received requests SHOULD be NBD_ESHUTDOWN" (DISC-020).
@pytest.mark.req("DISC-018", "DISC-020")
@pytest.mark.feature("NBD_OPT_GO")
def test_requests_in_flight_at_shutdown(server_peer: PeerSpec, fresh_export: Callable[..., RunningServer],
                                        ref_client: Callable[..., Client], verdict: Judge) -> None:
    """Reads in flight when the server is told to shut down are answered; errors are NBD_ESHUTDOWN."""
    server = _own_server(fresh_export, verdict)
    c = _connect(ref_client, server)
    offsets = [(i % 4) * READ_SIZE for i in range(READS)]
    buffers = [bytearray(READ_SIZE) for _ in offsets]
    cookies = [c.aio_pread(b, o) for b, o in zip(buffers, offsets, strict=True)]
    # Replies have begun (the server is serving these requests); none is read, and 32 MiB do not fit in
    # the socket buffers: all of them are still in flight when the shutdown is asked for.
    started = bool(select.select([c._sock], [], [], 5)[0])
    in_flight = [k for k in cookies if not _complete(c, k)]
    t0 = time.monotonic()
    _trigger(server)
    late = None
    with contextlib.suppress(ClientError, OSError):
        late = c.aio_pread(bytearray(4096), 0)
    ended = ""
    try:
        c.wait_all()
        ended = ("closed once idle" if _eof_already(c, wait=CLOSE_WAIT)
                 else f"still open {CLOSE_WAIT} s after the last reply")
    except (ClientError, OSError) as e:
        ended = f"closed ({type(e).__name__}: {e})"
    answered = {k: _error(c, k) for k in [*in_flight, *([late] if late else [])] if _complete(c, k)}
    missing = [k for k in in_flight if k not in answered]
    if not started:
        verdict.info("no reply had begun within 5 s of the reads: the server may not have read them; "
                     "DISC-018 not judged")
    elif not in_flight:
        verdict.info("every read was answered before the shutdown began: nothing was in flight")
    else:
        verdict.expect(not missing, "DISC-018", expected=f"the {len(in_flight)} reads in flight answered before the "
                       "server closes", observed=f"{len(missing)} unanswered (cookies {missing}); {ended}")
    errors = {k: e for k, e in answered.items() if e}
    for k, e in errors.items():
        verdict.expect(e == Err.ESHUTDOWN, "DISC-020", expected="NBD_ESHUTDOWN for a request refused during the "
                       "shutdown", observed=f"cookie {k}{' (sent after it)' if k == late else ''}: {error_name(e)}")
    late_seen = ("not sent: the connection was gone" if late is None else
                 error_name(answered[late]) if late in answered else "no reply")
    failed = sum(1 for k in in_flight if answered.get(k))
    verdict.info(f"{len(in_flight)} reads in flight at the shutdown, {failed} of them answered with an error; "
                 f"the request sent after it: {late_seen}; connection {ended}, "
                 f"{time.monotonic() - t0:.2f} s after the shutdown was asked for")
    wrong = [k for k, b, o in zip(cookies, buffers, offsets, strict=True)
             if k in answered and not answered[k] and bytes(b) != expected_bytes(EXPORT, o, len(b))]
    verdict.expect(not wrong, expected="reads answered during the shutdown carry the export's bytes",
                   observed=f"other bytes for cookies {wrong}")


def _complete(c: Client, cookie: int) -> bool:
    """The server sent the whole reply of ``cookie`` (a simple reply, or a chunk with DONE)."""
    return any(isinstance(e, ev.SimpleReply) or e.done for e in server_chunks(c, cookie))


def _error(c: Client, cookie: int) -> int:
    """The error of ``cookie``'s reply (0: success)."""
    for e in server_chunks(c, cookie):
        if isinstance(e, ev.SimpleReply | ev.ErrorChunk) and e.error:
            return int(e.error)
    return 0
