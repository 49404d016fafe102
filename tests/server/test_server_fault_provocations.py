"""Faults that provoke a client reaction rather than break the framing: undefined handshake and
transmission flag bits, NBD_REP_ERR_SHUTDOWN to the first option, NBD_ESHUTDOWN to the first READ.  Each is checked byte by byte here; suites/client judges the clients."""

from __future__ import annotations

import struct

from nbdref.server import Export

from . import rawclient as rc

MiB = 1 << 20


def _server(serve, fault: str):
    return serve([Export.memory("exp", MiB)], fault=fault, io_timeout=5)


def test_unknown_handshake_flag_is_set_in_the_greeting(serve):
    c = rc.pair(_server(serve, "unknown-handshake-flag"))
    greeting = rc.recv_exact(c, 18)
    flags = struct.unpack(">H", greeting[16:])[0]
    assert flags & 0x8000 and flags & 1, hex(flags)     # bit 15, and FIXED_NEWSTYLE as usual
    c.close()


def test_unknown_transmission_flag_in_info_export(serve):
    c = rc.pair(_server(serve, "unknown-transmission-flag"))
    replies = rc.go(c)
    info = [d for t, d in replies if t == 3 and struct.unpack(">H", d[:2])[0] == 0]
    size, flags = struct.unpack(">QH", info[0][2:12])
    assert size == MiB and flags & 0x8000 and flags & 1, hex(flags)
    assert replies[-1][0] == 1                          # NBD_REP_ACK: transmission goes on
    c.sendall(rc.request(0, 0, 512, cookie=5))
    assert rc.simple_reply(c) == (0, 5)
    c.close()


def test_option_err_shutdown_then_normal_answers(serve):
    s = _server(serve, "option-err-shutdown")
    c = rc.pair(s)
    rc.recv_exact(c, 18)
    c.sendall(struct.pack(">I", 3) + rc.option(8))      # NBD_OPT_STRUCTURED_REPLY
    opt, rtype, _ = rc.read_option_reply(c)
    assert (opt, rtype) == (8, 0x80000007)              # NBD_REP_ERR_SHUTDOWN
    c.sendall(rc.option(2))                             # NBD_OPT_ABORT: answered as usual
    assert rc.read_option_reply(c)[:2] == (2, 1)
    c.close()
    assert s.records[0].ended.wait(5) and s.records[0].violations == []


def test_eshutdown_to_first_read_only(serve):
    s = _server(serve, "eshutdown")
    c = rc.pair(s)
    rc.handshake(c)
    c.sendall(rc.request(0, 0, 512, cookie=7))
    assert rc.simple_reply(c) == (108, 7)
    c.sendall(rc.request(0, 0, 512, cookie=8))          # only the first READ is hit
    assert rc.simple_reply(c) == (0, 8)
    rc.recv_exact(c, 512)
    c.sendall(rc.request(2))                            # NBD_CMD_DISC
    assert s.records[0].ended.wait(5)
    # The error went through the core: nothing is left "in flight" at NBD_CMD_DISC (DISC-023), and the
    # reused cookie is not taken for a duplicate (CMD-001).
    assert s.records[0].violation_ids == []
    c.close()


def test_eshutdown_structured_is_an_error_chunk(serve):
    c = rc.pair(_server(serve, "eshutdown"))
    rc.handshake(c, structured=True)
    c.sendall(rc.request(0, 0, 512, cookie=9))
    magic, flags, rtype, cookie, length = struct.unpack(">IHHQI", rc.recv_exact(c, 20))
    error, _msglen = struct.unpack(">IH", rc.recv_exact(c, length)[:6])
    assert (magic, flags & 1, rtype, cookie, error) == (0x668E33EF, 1, 0x8001, 9, 108)
    c.close()


def test_unknown_info_reply_comes_first(serve):
    c = rc.pair(_server(serve, "unknown-info-reply"))
    replies = rc.go(c, infos=(3,))
    types = [struct.unpack(">H", d[:2])[0] for t, d in replies if t == 3]
    assert types[0] == 0x1234 and 0 in types and replies[-1][0] == 1, types
    c.sendall(rc.request(0, 0, 512, cookie=4))
    assert rc.simple_reply(c) == (0, 4)
    c.close()


def test_reversed_info_replies_put_export_last(serve):
    c = rc.pair(_server(serve, "reversed-info-replies"))
    replies = rc.go(c, infos=(3,))                      # NBD_INFO_BLOCK_SIZE asked: two information replies
    types = [struct.unpack(">H", d[:2])[0] for t, d in replies if t == 3]
    assert types == [3, 0] and replies[-1][0] == 1, types
    c.close()


def _set_meta(c, export: str = "exp", queries: tuple[str, ...] = ("base:allocation",), opt: int = 10):
    name = export.encode()
    data = struct.pack(">I", len(name)) + name + struct.pack(">I", len(queries))
    for q in queries:
        data += struct.pack(">I", len(q)) + q.encode()
    c.sendall(rc.option(opt, data))
    out = []
    while True:
        _, rtype, d = rc.read_option_reply(c)
        if rtype != 4:                                  # NBD_REP_META_CONTEXT
            return out, rtype
        out.append((struct.unpack(">I", d[:4])[0], d[4:].decode()))


def _structured_go_with_context(s):
    c = rc.pair(s)
    rc.recv_exact(c, 18)
    c.sendall(struct.pack(">I", 3) + rc.option(8))
    assert rc.read_option_reply(c)[1] == 1
    listed, _ = _set_meta(c, opt=9)                     # NBD_OPT_LIST_META_CONTEXT
    chosen, ack = _set_meta(c)
    assert ack == 1
    assert rc.opt_go(c)[-1][0] == 1
    return c, listed, chosen


def _block_status(c, length: int = 1 << 20):
    c.sendall(rc.request(7, 0, length, cookie=11))     # NBD_CMD_BLOCK_STATUS
    chunks = []
    while True:
        _magic, flags, _rtype, _cookie, n = struct.unpack(">IHHQI", rc.recv_exact(c, 20))
        data = rc.recv_exact(c, n)
        cid = struct.unpack(">I", data[:4])[0]
        chunks.append((cid, [struct.unpack(">II", data[i:i + 8]) for i in range(4, n, 8)]))
        if flags & 1:
            return chunks


def test_shifted_context_ids_are_used_in_block_status(serve):
    s = serve([Export.memory("exp", MiB)], fault="shifted-context-ids", io_timeout=5)
    c1, listed, chosen1 = _structured_go_with_context(s)
    c2, _, chosen2 = _structured_go_with_context(s)
    assert listed and listed[0][0] != 0                 # LIST: nonzero (reserved) id
    assert chosen1[0][0] != chosen2[0][0]               # SET: another id on each connection
    assert _block_status(c1)[0][0] == chosen1[0][0] and _block_status(c2)[0][0] == chosen2[0][0]
    c1.close()
    c2.close()


def test_status_bits_and_split_extents(serve):
    for fault, check in (("unknown-status-bits", lambda ext: all(f & 0x20 for _, f in ext)),
                         ("split-extents", lambda ext: len(ext) >= 2 and sum(n for n, _ in ext) == MiB)):
        s = serve([Export.memory("exp", MiB)], fault=fault, io_timeout=5)
        c, _, _ = _structured_go_with_context(s)
        ((_cid, ext),) = _block_status(c, MiB)
        assert check(ext), (fault, ext)
        c.close()
