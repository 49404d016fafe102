"""Error messages stay within the string limits whatever the client sent (GEN-002 / GEN-003): the
reference server once echoed a 4097-byte export name into its NBD_REP_ERR_UNKNOWN message."""

from __future__ import annotations

import struct

from nbdref.server import Export

from . import rawclient as rc


def _greet(sock) -> None:
    assert rc.recv_exact(sock, 18)[:8] == b"NBDMAGIC"
    sock.sendall(struct.pack(">I", 3))


def test_error_messages_of_long_names_are_short(serve):
    s = serve([Export.memory("exp", 1 << 20)])
    c = rc.pair(s)
    _greet(c)
    name = b"n" * 4097
    for code in (6, 7):                     # NBD_OPT_INFO, NBD_OPT_GO: name length, name, no info requests
        c.sendall(rc.option(code, struct.pack(">I", len(name)) + name + struct.pack(">H", 0)))
        opt, rtype, data = rc.read_option_reply(c)
        assert opt == code and rtype & 0x80000000, hex(rtype)
        assert len(data) <= 256, len(data)
    # a malformed option whose parse reason would quote the data
    c.sendall(rc.option(7, struct.pack(">I", 9000) + b"x" * 5000))
    opt, rtype, data = rc.read_option_reply(c)
    assert rtype & 0x80000000 and len(data) <= 256, (hex(rtype), len(data))
    c.sendall(rc.option(2))                 # NBD_OPT_ABORT
    assert rc.read_option_reply(c)[1] == 1
    c.close()
