"""TLSConfig.versions: the reference server offers exactly the protocol versions asked for (client
suites use TLS 1.2 only, and TLS 1.1 only, to judge TLS-043/044/046), and records what was negotiated."""

from __future__ import annotations

import socket
import ssl
import struct
import warnings

import pytest
from nbdref.server import Export, TLSConfig

from . import rawclient as rc

MiB = 1 << 20


def _tls_client(sock: socket.socket, version: str) -> ssl.SSLSocket:
    """STARTTLS on a fresh connection, then a TLS handshake limited to ``version``."""
    assert rc.recv_exact(sock, 18)[:8] == b"NBDMAGIC"
    sock.sendall(struct.pack(">I", 3) + rc.option(5))   # client flags, NBD_OPT_STARTTLS
    assert rc.read_option_reply(sock)[:2] == (5, 1)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
        ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion[version]
    return ctx.wrap_socket(sock)


@pytest.mark.parametrize(("offered", "asked", "ok"), [
    (("TLSv1_2", "TLSv1_2"), "TLSv1_2", True),
    (("TLSv1_2", "TLSv1_2"), "TLSv1_3", False),
    (("TLSv1_1", "TLSv1_1"), "TLSv1_1", True),
    (None, "TLSv1_3", True),
])
def test_offered_versions(serve, tls_dir, offered, asked, ok):
    s = serve([Export.memory("exp", MiB)], tls=TLSConfig(mode="require", certificates=tls_dir.x509_dir,
                                                          versions=offered))
    c = rc.pair(s)
    if ok:
        t = _tls_client(c, asked)
        assert t.version() == asked.replace("_", ".")
        t.sendall(rc.option(2))                         # NBD_OPT_ABORT: the server has finished its handshake
        assert rc.read_option_reply(t)[:2] == (2, 1)
        t.close()
        assert s.records[0].ended.wait(5) and s.records[0].tls_version == asked.replace("_", ".")
    else:
        with pytest.raises(ssl.SSLError):
            _tls_client(c, asked)
        c.close()


def _abort(sock) -> None:
    sock.sendall(rc.option(2))                          # NBD_OPT_ABORT
    assert rc.read_option_reply(sock)[:2] == (2, 1)


@pytest.mark.parametrize("how", ["eof", "open"])
def test_after_abort_plain(serve, how):
    s = serve([Export.memory("exp", MiB)])
    c = rc.pair(s)
    assert rc.recv_exact(c, 18)[:8] == b"NBDMAGIC"
    c.sendall(struct.pack(">I", 3))
    _abort(c)
    if how == "eof":
        c.shutdown(socket.SHUT_WR)
    assert s.records[0].ended.wait(5)
    assert s.records[0].after_abort == how
    c.close()


@pytest.mark.parametrize("shut_tls", [True, False])
def test_after_abort_over_tls(serve, tls_dir, shut_tls):
    s = serve([Export.memory("exp", MiB)], tls=TLSConfig(mode="require", certificates=tls_dir.x509_dir))
    raw = rc.pair(s)
    t = _tls_client(raw, "TLSv1_3")
    _abort(t)
    if shut_tls:
        t.unwrap().close()                              # close_notify, then the socket
    else:
        socket.socket(fileno=t.detach()).close()        # a bare TCP close under TLS
    assert s.records[0].ended.wait(5)
    assert s.records[0].after_abort == ("close_notify" if shut_tls else "eof")
