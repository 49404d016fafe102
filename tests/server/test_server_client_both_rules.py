"""The "both" rules the reference server holds its clients to: plaintext after the STARTTLS ACK (TLS-014),
TLS shut down before a hard disconnect (DISC-002 in haggling, DISC-016 in transmission), haggling ended
without a hard disconnect (DISC-006), and metadata context names in the client's queries (BS-007 /
BS-008).  Each is shown held on a correct raw client and broken on a wrong one."""

from __future__ import annotations

import socket
import ssl
import struct

import pytest
from nbdref.server import Export, TLSConfig

from . import rawclient as rc

MiB = 1 << 20


def _ended(server, n: int = 0):
    r = server.records[n]
    assert r.ended.wait(5), r.reason
    return r


def _ids(record) -> list[str]:
    return [v.req_id for v in record.violations]


def _starttls(sock: socket.socket) -> None:
    assert rc.recv_exact(sock, 18)[:8] == b"NBDMAGIC"
    sock.sendall(struct.pack(">I", 3) + rc.option(5))   # client flags, NBD_OPT_STARTTLS
    assert rc.read_option_reply(sock)[:2] == (5, 1)


def _tls(sock: socket.socket) -> ssl.SSLSocket:
    _starttls(sock)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    return ctx.wrap_socket(sock)


def _bare_close(t: ssl.SSLSocket) -> None:
    """A TCP close under TLS: no close_notify."""
    socket.socket(fileno=t.detach()).close()


@pytest.fixture
def tls_server(serve, tls_dir):
    return serve([Export.memory("exp", MiB)], tls=TLSConfig(mode="require", certificates=tls_dir.x509_dir))


# -- TLS-014: after the ACK, the client's next bytes are a TLS record

def test_tls_handshake_after_ack_holds_tls_014(tls_server):
    t = _tls(rc.pair(tls_server))
    t.sendall(rc.option(2))
    assert rc.read_option_reply(t)[:2] == (2, 1)
    t.unwrap().close()
    r = _ended(tls_server)
    assert "TLS-014" in r.checked and "TLS-014" not in _ids(r)


@pytest.mark.parametrize("plaintext", [rc.option(2), rc.request(0, 0, 512)], ids=["IHAVEOPT", "request"])
def test_plaintext_after_starttls_ack_breaks_tls_014(tls_server, plaintext):
    c = rc.pair(tls_server)
    _starttls(c)
    c.sendall(plaintext)                                  # NBD in the clear where TLS must begin
    with pytest.raises((EOFError, OSError)):
        rc.recv_exact(c, 1)
    r = _ended(tls_server)
    v = [v for v in r.violations if v.req_id == "TLS-014"]
    assert v and "TLS-014" in r.checked, r.violations
    assert v[0].data[:8] == plaintext[:8] and plaintext[:4].hex() in v[0].message


# -- DISC-002 / DISC-016: close_notify before the EOF of a hard disconnect under TLS

def test_hard_disconnect_in_haggling_without_close_notify_breaks_disc_002(tls_server):
    t = _tls(rc.pair(tls_server))
    t.sendall(rc.option(3))                               # NBD_OPT_LIST, answered; then a bare close
    assert _final(t) == 1
    _bare_close(t)
    r = _ended(tls_server)
    assert "DISC-002" in _ids(r) and "DISC-007" in _ids(r)


def test_hard_disconnect_in_haggling_with_close_notify_holds_disc_002(tls_server):
    t = _tls(rc.pair(tls_server))
    t.unwrap().close()                                    # close_notify, then the socket (still DISC-007)
    r = _ended(tls_server)
    assert "DISC-002" in r.checked and "DISC-002" not in _ids(r) and "DISC-007" in _ids(r)


def _tls_transmission(server) -> ssl.SSLSocket:
    t = _tls(rc.pair(server))
    t.sendall(rc.option(7, struct.pack(">I3sH", 3, b"exp", 0)))   # NBD_OPT_GO "exp"
    assert _final(t) == 1
    t.sendall(rc.request(0, 0, 512))                      # one READ, read back
    assert len(rc.recv_exact(t, 16 + 512)) == 528
    return t


@pytest.mark.parametrize("notify", [True, False])
def test_hard_disconnect_in_transmission_disc_016(tls_server, notify):
    t = _tls_transmission(tls_server)
    if notify:
        t.unwrap().close()
    else:
        _bare_close(t)
    r = _ended(tls_server)
    assert "DISC-016" in r.checked and ("DISC-016" in _ids(r)) is not notify
    assert "DISC-024" in _ids(r) and "DISC-002" not in r.checked


def test_soft_disconnect_is_not_judged_by_disc_016(tls_server):
    """NBD_CMD_DISC, then a bare close: a soft disconnect, whose TLS shutdown is the server's (DISC-015)."""
    t = _tls_transmission(tls_server)
    t.sendall(rc.request(2))                              # NBD_CMD_DISC
    _bare_close(t)
    r = _ended(tls_server)
    assert "DISC-016" not in r.checked and not r.violations, r.violations


def test_plain_connection_is_not_judged_for_close_notify(serve):
    s = serve([Export.memory("exp", MiB)])
    c = rc.pair(s)
    rc.handshake(c)
    c.close()
    r = _ended(s)
    assert not {"DISC-002", "DISC-016"} & r.checked and "DISC-024" in _ids(r)


# -- DISC-006: haggling ended properly, or a close the section allows

@pytest.mark.parametrize("end", ["go", "export-name", "abort"])
def test_haggling_ended_properly_holds_disc_006(serve, end):
    s = serve([Export.memory("exp", MiB)])
    c = rc.pair(s)
    if end == "go":
        rc.handshake(c)
        c.sendall(rc.request(2))
    else:
        assert rc.recv_exact(c, 18)[:8] == b"NBDMAGIC"
        c.sendall(struct.pack(">I", 3))
        c.sendall(rc.option(1, b"exp") if end == "export-name" else rc.option(2))
        rc.recv_exact(c, 10 if end == "export-name" else 20)
        if end == "export-name":
            c.sendall(rc.request(2))
    c.close()
    r = _ended(s)
    assert "DISC-006" in r.checked and not r.violations, r.violations


def test_bare_close_in_haggling_is_not_held_as_disc_006(serve):
    s = serve([Export.memory("exp", MiB)])
    c = rc.pair(s)
    assert rc.recv_exact(c, 18)[:8] == b"NBDMAGIC"
    c.sendall(struct.pack(">I", 3))
    c.close()
    r = _ended(s)
    assert "DISC-007" in _ids(r) and "DISC-006" not in r.checked


def test_close_after_failed_starttls_holds_disc_006(serve):
    """Without a TLS context STARTTLS is refused: the client may then hard-disconnect (DISC-005)."""
    s = serve([Export.memory("exp", MiB)])
    c = rc.pair(s)
    assert rc.recv_exact(c, 18)[:8] == b"NBDMAGIC"
    c.sendall(struct.pack(">I", 3) + rc.option(5))
    assert rc.read_option_reply(c)[1] & 0x80000000
    c.close()
    r = _ended(s)
    assert "DISC-006" in r.checked and not r.violations, r.violations


# -- BS-007 / BS-008: names in the client's LIST / SET_META_CONTEXT queries

def _final(sock: socket.socket) -> int:
    """Read option replies up to the final one (an ACK or an error); its type."""
    while True:
        rtype = rc.read_option_reply(sock)[1]
        if rtype == 1 or rtype & 0x80000000:
            return rtype


def _meta(code: int, queries: list[bytes]) -> bytes:
    data = struct.pack(">I3sI", 3, b"exp", len(queries)) + b"".join(struct.pack(">I", len(q)) + q for q in queries)
    return rc.option(code, data)


@pytest.mark.parametrize(("code", "query", "broken"), [
    (10, b"base:allocation", set()),
    (9, b"qemu:", set()),                                 # LIST: a namespace with an empty leaf (wildcard)
    (10, b"base:", set()),                                # SET: allowed, and ignored by the server (BS-014)
    (10, b"allocation", {"BS-046"}),                      # no namespace, no colon: the query rule, once
    (9, b":allocation", {"BS-007"}),                      # empty namespace
    (10, b"my ns:leaf", {"BS-007"}),                      # whitespace in the namespace
    (10, b"base:alloc\0ation", {"GEN-001"}),              # the string rules, once (BS-008 not held)
    (9, b"x-t:\xff\xfe", {"GEN-001"}),                    # not UTF-8
    (10, b"x-t:" + b"a" * 4100, {"GEN-003"}),             # longer than 4096 bytes
], ids=["set-ok", "list-wildcard", "set-base", "no-colon", "empty-ns", "space", "nul", "utf8", "long"])
def test_meta_context_query_names(serve, code, query, broken):
    s = serve([Export.memory("exp", MiB)])
    c = rc.pair(s)
    assert rc.recv_exact(c, 18)[:8] == b"NBDMAGIC"
    c.sendall(struct.pack(">I", 3) + rc.option(8))        # structured replies first (BS-025 / BS-043)
    assert rc.read_option_reply(c)[1] == 1
    c.sendall(_meta(code, [query]))
    _final(c)
    c.sendall(rc.option(2))                               # NBD_OPT_ABORT
    _final(c)
    c.close()
    r = _ended(s)
    assert ("BS-007" in r.checked) == (b":" in query)
    assert ("BS-008" in r.checked) == (not broken & {"GEN-001", "GEN-003"})
    judged = {"BS-007", "BS-008", "BS-027", "BS-046", "GEN-001", "GEN-003"}
    assert {v.req_id for v in r.violations} & judged == broken, r.violations
