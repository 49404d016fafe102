"""Server.shutdown(grace) and SIGTERM to ``serve``: options get NBD_REP_ERR_SHUTDOWN (DISC-013), requests in
flight are answered (DISC-018), later ones get NBD_ESHUTDOWN (DISC-020), then the connection closes, TLS
first; what is left after the grace is hung up on.  These fail when the reference server is wrong."""

from __future__ import annotations

import os
import select
import signal
import socket
import ssl
import subprocess
import sys
import time

import pytest
from nbdref import events as ev
from nbdref._constants import Err, Opt, Rep
from nbdref.client import Client, ClientError
from nbdref.server import Export, TLSConfig
from nbdref.server._transport import SocketTransport

MiB = 1 << 20
READS, READ_SIZE = 8, 4 * MiB   # 32 MiB of replies: more than the socket buffers hold


def _client(server, *, opt_mode: bool = False, tls_dir=None) -> Client:
    c = Client(timeout=5)
    if tls_dir is not None:
        c.set_tls("require")
        c.set_tls_certificates(tls_dir.x509_dir)
    c.set_opt_mode(opt_mode)
    c.connect_uri(server.uri + (f"&tls-certificates={tls_dir.x509_dir}" if tls_dir is not None else ""))
    return c


def _server_replies(c: Client, since: int = 0) -> list:
    return [e.event for e in list(c.transcript)[since:] if e.direction == "S"]


def _closed_within(sock: socket.socket, seconds: float) -> str:
    """"eof", "close_notify" (TLS shut down first), "reset", or "open" after ``seconds``."""
    sock.settimeout(seconds)
    if isinstance(sock, ssl.SSLSocket):
        sock.suppress_ragged_eofs = False
    try:
        while sock.recv(65536):
            pass
        return "close_notify" if isinstance(sock, ssl.SSLSocket) else "eof"
    except ssl.SSLEOFError:
        return "eof"
    except TimeoutError:
        return "open"
    except ConnectionResetError:
        return "reset"


@pytest.mark.parametrize("option", ["opt_info", "opt_go", "opt_list"])
def test_options_during_shutdown_get_err_shutdown_and_abort_an_ack(serve, option):
    srv = serve()
    c = _client(srv, opt_mode=True)
    c.opt_info()
    srv.shutdown(grace=5)
    mark = len(list(c.transcript))
    with pytest.raises(ClientError, match="NBD_REP_ERR_SHUTDOWN"):
        getattr(c, option)()
    replies = _server_replies(c, mark)
    assert isinstance(replies[0], ev.RepError) and replies[0].reply_type == Rep.ERR_SHUTDOWN
    assert replies[-1] == ev.RepAck(option=Opt.ABORT)        # the client's ABORT (DISC-014) is still allowed
    assert srv.records[0].ended.wait(2) and srv.records[0].reason == "client sent NBD_OPT_ABORT"
    assert not srv.violations and not c.violations
    deadline = time.monotonic() + 2
    while not srv.stopped and time.monotonic() < deadline:  # nothing left: stopped long before the grace
        time.sleep(0.01)
    assert srv.stopped


def test_shutdown_stops_accepting_at_once(serve):
    srv = serve()
    srv.shutdown(grace=5)
    assert not srv.serving() and srv.shutting_down
    with pytest.raises(OSError), socket.socket(socket.AF_UNIX) as s:
        s.settimeout(2)
        s.connect(srv.uri.split("socket=")[1])
        assert s.recv(8) == b"NBDMAGIC"  # reached only if the connect went through: then it is no error
        raise AssertionError("a new client was greeted during the shutdown")


@pytest.mark.parametrize("backend", ["file", "memory"])
def test_requests_in_flight_answered_later_ones_get_eshutdown(serve, tmp_path, backend):
    data = os.urandom(4 * READ_SIZE)
    if backend == "file":
        (tmp_path / "disk").write_bytes(data)
        export = Export.file("exp", tmp_path / "disk")
    else:
        export = Export.memory("exp", len(data))
        export.backend.pwrite(0, data)
    srv = serve([export])
    c = _client(srv)
    offsets = [(i % 4) * READ_SIZE for i in range(READS)]
    buffers = [bytearray(READ_SIZE) for _ in offsets]
    cookies = [c.aio_pread(b, o) for b, o in zip(buffers, offsets, strict=True)]
    assert select.select([c._sock], [], [], 5)[0]          # replies began, none complete: all 8 in flight
    srv.shutdown(grace=5)
    late = c.aio_pread(bytearray(4096), 0)
    c.wait_all()                                          # every request answered: none lost
    errors = {}
    for k in [*cookies, late]:
        try:
            c.aio_command_completed(k)
        except ClientError as e:
            errors[k] = e.errno
    assert errors.get(late) == Err.ESHUTDOWN.errno        # a request after the shutdown (DISC-020)
    assert set(errors.values()) == {Err.ESHUTDOWN.errno}  # and every refusal says so
    for k, b, o in zip(cookies, buffers, offsets, strict=True):
        assert k in errors or b == data[o:o + READ_SIZE]
    assert _closed_within(c._sock, 2) == "eof"            # then the server closes, idle
    assert srv.records[0].ended.wait(2) and "server shut down" in srv.records[0].reason
    assert not srv.violations and not c.violations


def test_idle_tls_connection_closes_with_close_notify(serve, tls_dir):
    srv = serve(tls=TLSConfig(mode="require", certificates=tls_dir.x509_dir))
    c = _client(srv, tls_dir=tls_dir)
    assert c.pread(4096, 0) == bytes(4096)
    t0 = time.monotonic()
    srv.shutdown(grace=5)
    assert _closed_within(c._sock, 2) == "close_notify"   # TLS shut down first, then the close
    assert time.monotonic() - t0 < 1 and srv.records[0].ended.wait(2)
    assert not srv.violations                             # our own wake-up EOF is not charged to the client


def test_grace_ends_a_silent_handshake(serve):
    srv = serve(handshake_timeout=None)
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(srv.uri.split("socket=")[1])
        assert s.recv(18)[:8] == b"NBDMAGIC"
        t0 = time.monotonic()
        srv.shutdown(grace=0.3, wait=True)
        assert srv.stopped and 0.3 <= time.monotonic() - t0 < 2
        assert _closed_within(s, 2) in ("eof", "reset")


def test_stop_waits_for_the_shutdown_thread(serve):
    """stop() from another thread during the grace returns with the shutdown thread done (it ends in its
    own stop()): `serve` exits only then, not while that thread is still hanging up."""
    srv = serve(handshake_timeout=None)
    drain = srv._drain

    def slow_drain(grace: float) -> None:                 # its stop() outlasts the caller's: a race made sure
        drain(grace)
        time.sleep(0.2)

    srv._drain = slow_drain  # type: ignore[method-assign]
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(srv.uri.split("socket=")[1])
        assert s.recv(18)[:8] == b"NBDMAGIC"              # a silent handshake keeps the grace running
        srv.shutdown(grace=5)
        drainer = srv._drainer
        assert drainer is not None and drainer.is_alive()
        srv.stop()
        assert not drainer.is_alive()


def test_readable_above_fd_setsize():
    """SocketTransport.readable() on a descriptor above 1024 (select.select raises ValueError there): it
    tells an idle socket from one with bytes waiting.  A busy server's connections get such descriptors."""
    import resource
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft <= 1100:
        pytest.skip(f"RLIMIT_NOFILE {soft}: no descriptor above 1024 to test with")
    a, b = socket.socketpair()
    fd = os.dup2(a.fileno(), 1090)
    a.close()
    high = socket.socket(fileno=fd)
    try:
        t = SocketTransport(high)
        assert not t.readable()
        b.sendall(b"x")
        deadline = time.monotonic() + 2
        while not t.readable() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert t.readable()
    finally:
        high.close()
        b.close()


def _turns_new_clients_away(path, seconds: float) -> bool:
    """Within ``seconds``, a new connection to the socket is refused or not greeted: the server has begun
    its shutdown (polled: when a process acts on SIGTERM depends on the machine's load)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(1.0)
            try:
                s.connect(str(path))
                if s.recv(8) != b"NBDMAGIC":
                    return True
            except OSError:                                # refused, gone, or not greeted in time
                return True
        time.sleep(0.02)
    return False


def test_sigterm_to_serve_is_a_graceful_shutdown(sockdir):
    sock = sockdir / "cli.sock"
    proc = subprocess.Popen([sys.executable, "-m", "nbdref", "serve", "--unix", str(sock), "--size", "1M",
                             "--shutdown-grace", "3"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        uri = proc.stdout.readline().strip()  # type: ignore[union-attr]
        c = Client(timeout=5)
        c.set_opt_mode(True)
        c.connect_uri(uri)
        c.opt_list()
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert _turns_new_clients_away(sock, 3)           # the CLI has acted on its signal flag
        assert proc.poll() is None                        # still waiting for this client
        with pytest.raises(ClientError, match="NBD_REP_ERR_SHUTDOWN"):
            c.opt_info()
        assert proc.wait(3) == 0 and time.monotonic() - t0 < 2.5   # the client left: no need for the grace
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        proc.stdout.close()  # type: ignore[union-attr]
        proc.stderr.close()  # type: ignore[union-attr]
