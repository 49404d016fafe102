"""Server lifecycle: stop() with clients attached, handshake limits, TLS renegotiation rules, pipes."""

from __future__ import annotations

import struct
import subprocess
import sys
import time

import pytest
from nbdref import Strictness
from nbdref.client import Client, ClientError
from nbdref.server import Export, Server, TLSConfig

from . import rawclient as rc


def test_stop_ends_idle_and_busy_connections_promptly(serve):
    s = serve(io_timeout=30)
    idle = rc.pair(s)
    rc.recv_exact(idle, 18)
    ready = rc.pair(s)
    rc.handshake(ready)
    t0 = time.monotonic()
    s.stop()
    assert time.monotonic() - t0 < 5
    assert all(r.ended.is_set() for r in s.records)
    assert rc.closed(idle) and rc.closed(ready)


def test_handshake_limit_resolution(sockdir):
    exp = Export.memory("exp", 4096)
    cases = {("nbdref", 0): 60.0, ("qemu-10.0", 0): 10.0, ("qemu-10.0", None): None, ("nbdref", 2.5): 2.5}
    for (persona, limit), want in cases.items():
        s = Server(exp, persona=persona, handshake_timeout=limit, unix=str(sockdir / "h.sock"))
        try:
            assert s._handshake_limit() == want, (persona, limit)
        finally:
            s.stop()


def test_starttls_twice_is_err_invalid_and_state_is_forgotten(serve, tls_dir):
    s = serve(tls=TLSConfig(mode="on", certificates=tls_dir.x509_dir))
    c = Client()
    c.set_timeout(5)
    c.set_opt_mode(True)
    c.set_request_structured_replies(False)
    c.set_request_extended_headers(False)
    c.set_tls("off")  # no automatic STARTTLS: the test sends it by hand
    c.set_tls_certificates(tls_dir.x509_dir)
    c.set_tls_hostname("localhost")
    c.set_strict_mode(Strictness(check_local=False))  # our client refuses to send STARTTLS twice otherwise
    c.connect_uri(s.uri.replace("nbds+unix", "nbd+unix"))
    assert not c.get_tls_negotiated()
    assert c.opt_structured_reply()
    assert c.opt_starttls()
    # "the server MUST NOT preserve any negotiation state (such as a request for
    # NBD_OPT_STRUCTURED_REPLY ...)": SET_META_CONTEXT now lacks structured replies.
    with pytest.raises(ClientError, match="INVALID"):
        c.opt_set_meta_context(["base:allocation"])
    assert c.opt_starttls() is False  # "MUST reply with NBD_REP_ERR_INVALID" once TLS is active
    c.opt_abort()
    assert s.wait_closed(5)
    wire = str(s.records[0].transcript)
    assert "NBD_REP_ERR_INVALID (to NBD_OPT_STARTTLS)" in wire, wire
    assert s.records[0].tls


def test_stdin_over_pipes():
    """`serve --stdin` also works when stdin/stdout are pipes, not a socket."""
    p = subprocess.Popen([sys.executable, "-m", "nbdref", "serve", "--stdin", "--size", "1M"],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        assert p.stdout.read(18)[:16] == b"NBDMAGICIHAVEOPT"  # type: ignore[union-attr]
        p.stdin.write(struct.pack(">I", 3) + rc.option(2))  # type: ignore[union-attr]
        p.stdin.flush()  # type: ignore[union-attr]
        _magic, opt, rtype, length = struct.unpack(">QIII", p.stdout.read(20))  # type: ignore[union-attr]
        assert (opt, rtype, length) == (2, 1, 0)
        assert p.wait(10) == 0
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(5)
        p.stdin.close()  # type: ignore[union-attr]
        p.stdout.close()  # type: ignore[union-attr]


def test_ipv6_loopback(sockdir):
    import socket

    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        s = Server(Export.memory("exp", 1 << 20), host="::1").start()
    except OSError as e:
        pytest.skip(f"::1 not usable: {e}")
    try:
        assert s.uri.startswith("nbd://[::1]:")
        c = Client()
        c.set_timeout(5)
        c.connect_uri(s.uri)
        assert c.get_size() == 1 << 20
        c.shutdown()
    finally:
        s.stop()


@pytest.mark.parametrize("bs", [(3, 4096, 1 << 20), (1 << 17, 1 << 17, 1 << 20), (512, 256, 1 << 20),
                                (512, 4096, 1024), (512, 4096, 1 << 32)])
def test_export_refuses_block_sizes_the_spec_forbids(bs):
    with pytest.raises(ValueError):
        Export.memory("exp", 1 << 20, block_size=bs)


def test_context_manager_and_records(sockdir):
    with Server([Export.memory("exp", 1 << 20)], unix=str(sockdir / "cm.sock")) as srv:
        c = Client()
        c.set_timeout(5)
        c.connect_uri(srv.uri)
        c.shutdown()
        assert srv.wait_closed(5)
    (rec,) = srv.records
    assert rec.export == "exp" and rec.reason == "client sent NBD_CMD_DISC" and not rec.violations
    assert "NBD_OPT_GO" in str(rec.transcript)


def test_max_records_keeps_the_newest(sockdir):
    with Server([Export.memory("exp", 4096)], unix=str(sockdir / "mr.sock"), max_records=3) as srv:
        for _ in range(6):
            c = rc.pair(srv)
            rc.recv_exact(c, 18)
            c.sendall(struct.pack(">I", 3) + rc.option(2))
            assert rc.read_option_reply(c)[1] == 1
            c.close()
            assert srv.records[-1].ended.wait(5)
    assert [r.id for r in srv.records][-3:] == [4, 5, 6] and len(srv.records) <= 4
