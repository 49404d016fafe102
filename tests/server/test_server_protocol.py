"""Option and command semantics of the reference server, driven by the reference client (nbdref.client)
and by raw bytes where the client would refuse to misbehave."""

from __future__ import annotations

import struct

import pytest
from nbdref.client import Client, ClientError
from nbdref.server import Export

from . import rawclient as rc
from .conftest import clean

MiB = 1 << 20


def _client(uri: str, *, opt_mode: bool = False, **kw) -> Client:
    c = Client()
    c.set_timeout(5)
    for k, v in kw.items():
        getattr(c, f"set_{k}")(v)
    c.set_opt_mode(opt_mode)
    c.connect_uri(uri)
    return c


def test_meta_context_queries(serve):
    s = serve([Export.memory("exp", MiB, bitmaps=("b0", "b1"))])
    c = _client(s.uri, opt_mode=True)  # connects and negotiates extended headers / SR, like libnbd
    assert c.get_structured_replies_negotiated() or c.get_extended_headers_negotiated()
    everything = {"base:allocation", "qemu:allocation-depth", "qemu:dirty-bitmap:b0", "qemu:dirty-bitmap:b1"}
    assert set(c.opt_list_meta_context([])) == everything           # no query: all contexts
    assert c.opt_list_meta_context(["base:"]) == ["base:allocation"]  # "MUST support this as a wildcard"
    assert set(c.opt_list_meta_context(["qemu:"])) == everything - {"base:allocation"}
    assert set(c.opt_list_meta_context(["qemu:dirty-bitmap:"])) == {"qemu:dirty-bitmap:b0", "qemu:dirty-bitmap:b1"}
    assert c.opt_list_meta_context(["x-unknown:thing", "base:nope"]) == []  # unknown: ignored, not an error
    # SET: wildcards select nothing; exact names select.
    assert c.opt_set_meta_context(["base:", "qemu:dirty-bitmap:"]) == []
    assert c.opt_set_meta_context(["qemu:dirty-bitmap:b1", "base:allocation"]) == [
        "qemu:dirty-bitmap:b1", "base:allocation"]
    c.opt_go()
    seen = {}
    c.block_status(MiB, 0, lambda ctx, off, entries, err: seen.setdefault(ctx, entries))
    assert set(seen) == {"qemu:dirty-bitmap:b1", "base:allocation"}
    c.shutdown()
    clean(s)


def test_set_meta_context_without_structured_replies_is_err_invalid(serve):
    s = serve()
    c = rc.pair(s)
    rc.recv_exact(c, 18)
    name, q = b"exp", b"base:allocation"
    c.sendall(struct.pack(">I", 3) + rc.option(10, struct.pack(">I", 3) + name + struct.pack(">II", 1, len(q)) + q))
    assert rc.read_option_reply(c)[1] == 0x80000003  # NBD_REP_ERR_INVALID ("SHOULD send")
    c.close()
    s.wait_closed(5)
    assert "BS-043" in [v.req_id for v in s.violations]  # and the client's breach is recorded by id


def test_starttls_without_tls_is_err_policy(serve):
    s = serve()
    c = rc.pair(s)
    rc.recv_exact(c, 18)
    c.sendall(struct.pack(">I", 3) + rc.option(5))
    assert rc.read_option_reply(c)[1] == 0x80000002  # NOTLS: NBD_REP_ERR_POLICY
    c.sendall(rc.option(2))
    assert rc.read_option_reply(c)[1] == 1
    c.close()


def test_structured_reply_after_extended_headers(serve):
    s = serve()
    c = _client(s.uri, opt_mode=True, request_extended_headers=True)
    assert c.get_extended_headers_negotiated()
    assert c.opt_structured_reply() is False
    c.opt_abort()
    s.wait_closed(5)
    assert "NBD_REP_ERR_EXT_HEADER_REQD" in str(s.records[0].transcript)


@pytest.mark.parametrize(("persona", "extended"), [("nbdref", True), ("qemu-8.2", True), ("qemu-7.2", False)])
def test_extended_headers_follow_the_persona(serve, persona, extended):
    s = serve([Export.memory("exp", 4 * MiB, bitmaps=("b0",))], persona=persona)
    c = Client()
    c.set_timeout(5)
    c.add_meta_context("base:allocation")
    c.set_request_extended_headers(True)
    c.connect_uri(s.uri)
    assert c.get_extended_headers_negotiated() is extended
    c.pwrite(b"x" * 8192, MiB)
    assert c.pread(8192, MiB) == b"x" * 8192
    seen = {}
    c.block_status(4 * MiB, 0, lambda ctx, off, entries, err: seen.setdefault(ctx, list(entries)))
    assert seen["base:allocation"][:4] == [MiB, 3, 8192, 0]
    c.shutdown()
    clean(s)
    wire = str(s.records[0].transcript)
    assert ("NBD_REP_ACK (to NBD_OPT_EXTENDED_HEADERS)" in wire) is extended, wire


def test_block_size_constraints_are_enforced(serve):
    s = serve([Export.memory("exp", MiB, block_size=(4096, 4096, 64 * 1024))])
    c = rc.pair(s)
    rc.handshake(c)  # no NBD_INFO_BLOCK_SIZE requested: we still "cleanly error" what breaks the rules
    for cookie, req in enumerate([rc.request(0, 512, 4096), rc.request(0, 0, 100), rc.request(0, 0, 128 * 1024)], 1):
        c.sendall(req[:8] + struct.pack(">Q", cookie) + req[16:])
        assert rc.simple_reply(c) == (22, cookie)  # NBD_EINVAL
    c.sendall(rc.request(0, 4096, 4096, cookie=9))
    assert rc.simple_reply(c) == (0, 9)
    rc.recv_exact(c, 4096)
    c.close()


def test_multi_conn_flush_makes_writes_visible_everywhere(serve):
    s = serve([Export.memory("exp", MiB)])
    a, b = _client(s.uri), _client(s.uri)
    assert a.can_multi_conn() and b.can_multi_conn()
    a.pwrite(b"from a" * 100, 4096)
    a.flush()
    assert b.pread(600, 4096) == b"from a" * 100
    a.shutdown()
    b.shutdown()
    clean(s, 2)


def test_unknown_export_and_info_name(serve):
    s = serve([Export.memory("exp", MiB, description="described")])
    c = Client()
    c.set_timeout(5)
    c.set_full_info(True)
    c.set_export_name("nope")
    with pytest.raises(ClientError, match="UNKNOWN"):
        c.connect_uri(s.uri.replace("/exp?", "/nope?"))
    c2 = Client()
    c2.set_timeout(5)
    c2.set_full_info(True)
    c2.connect_uri(s.uri)
    assert c2.get_canonical_export_name() == "exp" and c2.get_export_description() == "described"
    c2.shutdown()


def test_block_status_payload_filters_contexts(serve):
    """ext-header draft: with NBD_FLAG_BLOCK_STATUS_PAYLOAD the client may name the context ids it wants."""
    s = serve([Export.memory("exp", MiB, bitmaps=("b0",))])
    c = rc.pair(s)
    rc.recv_exact(c, 18)
    c.sendall(struct.pack(">I", 3) + rc.option(11))
    assert rc.read_option_reply(c)[1] == 1
    qs = [b"base:allocation", b"qemu:dirty-bitmap:b0"]
    body = struct.pack(">I", 3) + b"exp" + struct.pack(">I", len(qs)) + b"".join(struct.pack(">I", len(q)) + q for q in qs)
    c.sendall(rc.option(10, body))
    ids = {}
    while True:
        _, rtype, data = rc.read_option_reply(c)
        if rtype == 1:
            break
        ids[data[4:].decode()] = struct.unpack(">I", data[:4])[0]
    c.sendall(rc.option(7, struct.pack(">I", 3) + b"exp" + struct.pack(">H", 0)))
    flags = None
    while True:
        _, rtype, data = rc.read_option_reply(c)
        if rtype == 3 and struct.unpack(">H", data[:2])[0] == 0:
            flags = struct.unpack(">QH", data[2:12])[1]
        if rtype == 1:
            break
    assert flags is not None and flags & 0x1000  # NBD_FLAG_BLOCK_STATUS_PAYLOAD
    payload = struct.pack(">QI", MiB, ids["qemu:dirty-bitmap:b0"])
    c.sendall(struct.pack(">IHHQQQ", 0x21E41C71, 0x20, 7, 5, 0, len(payload)) + payload)
    magic, rflags, rtype, cookie, _off, length = struct.unpack(">IHHQQQ", rc.recv_exact(c, 32))
    assert (magic, rtype, cookie, rflags & 1) == (0x6E8A278C, 6, 5, 1)  # one BLOCK_STATUS_EXT chunk, DONE
    ctx, count = struct.unpack(">II", rc.recv_exact(c, 8))
    assert ctx == ids["qemu:dirty-bitmap:b0"] and count == 1 and length == 8 + 16 * count
    assert struct.unpack(">QQ", rc.recv_exact(c, 16)) == (MiB, 0)
    c.close()
