"""Size constraints (proto.md "Size constraints"): advertised persona block sizes are enforced, and an
export may require NBD_INFO_BLOCK_SIZE (NBD_REP_ERR_BLOCK_SIZE_REQD)."""

from __future__ import annotations

import json
import shutil
import socket
import struct

import pytest
from nbdref import Strictness
from nbdref.client import Client, ClientError
from nbdref.personas import get, with_changes
from nbdref.server import Export

from . import rawclient as rc
from .conftest import clean, run

MiB = 1 << 20
EINVAL = 22
INFO_BLOCK_SIZE = 3
REP_ACK, REP_INFO = 1, 3
ERR_BLOCK_SIZE_REQD = (1 << 31) + 8


def _read(sock: socket.socket, offset: int, length: int, cookie: int) -> int:
    """A READ with simple replies; returns the error (the data, if any, is consumed)."""
    sock.sendall(rc.request(0, offset, length, cookie=cookie))
    error, got = rc.simple_reply(sock)
    assert got == cookie
    if error == 0:
        rc.recv_exact(sock, length)
    return error


def _no_local_breach(server) -> None:
    """The server's own replies broke no rule of the core's table (they would be noted "sent anyway")."""
    assert server.wait_closed(10)
    for r in server.records:
        assert "sent anyway" not in str(r.transcript), str(r.transcript)


def test_persona_block_size_is_enforced_once_advertised(serve):
    # qemu-2.10 advertises 512/4096/32M: "The server SHOULD report an NBD_EINVAL error if the client's
    # request is not aligned to advertised minimum block size boundaries".
    s = serve([Export.memory("exp", MiB)], persona="qemu-2.10")
    c = rc.pair(s)
    replies = rc.go(c, infos=(INFO_BLOCK_SIZE,))
    sizes = [struct.unpack(">HIII", d[:14])[1:] for t, d in replies if t == REP_INFO and d[:2] == b"\0\3"]
    assert sizes == [(512, 4096, 32 * MiB)] and replies[-1][0] == REP_ACK
    assert _read(c, 100, 512, 1) == EINVAL   # misaligned offset
    assert _read(c, 512, 100, 2) == EINVAL   # misaligned length
    assert _read(c, 512, 1024, 3) == 0       # aligned: served, the connection goes on
    c.close()
    _no_local_breach(s)


def test_persona_block_size_not_enforced_when_not_advertised(serve):
    # Unrequested, the persona sends no NBD_INFO_BLOCK_SIZE: "If size constraints have not been advertised
    # ... a server SHOULD support a default minimum block size of 1".
    s = serve([Export.memory("exp", MiB)], persona="qemu-2.10")
    c = rc.pair(s)
    replies = rc.go(c)
    assert [t for t, _ in replies if t == REP_INFO and _[:2] == b"\0\3"] == []
    assert _read(c, 100, 100, 1) == 0
    c.close()
    _no_local_breach(s)


def test_persona_maximum_payload_is_enforced(serve):
    persona = with_changes(get("nbdref"), info_block_size=(512, 4096, 64 * 1024))
    s = serve([Export.memory("exp", MiB)], persona=persona)
    c = rc.pair(s)
    assert rc.go(c, infos=(INFO_BLOCK_SIZE,))[-1][0] == REP_ACK
    # "the client MUST NOT request a length larger than the maximum payload size": refused, and the
    # payload is consumed so the connection stays in step.
    c.sendall(rc.request(1, 0, 128 * 1024, cookie=7) + b"x" * (128 * 1024))
    assert rc.simple_reply(c) == (EINVAL, 7)
    assert _read(c, 0, 64 * 1024, 8) == 0
    c.close()
    assert s.wait_closed(10)
    assert "BSZ-025" in s.records[0].violation_ids  # the client's breach is recorded too


def test_reference_client_agrees_with_the_refusals(serve):
    """The reference client judges every reply with the core's table: the server must answer the same."""
    s = serve([Export.memory("exp", MiB, read_only=True)], persona="qemu-2.10")
    c = Client()
    c.set_timeout(5)
    c.set_strict_mode(Strictness(disabled=frozenset({"BSZ-031", "BSZ-033"})))  # let us send bad requests
    c.connect_uri(s.uri)
    assert c.get_block_size("minimum") == 512
    for bad in (lambda: c.pread(100, 512), lambda: c.pread(512, MiB), lambda: c.pwrite(b"x" * 512, 0)):
        with pytest.raises(ClientError) as e:
            bad()
        assert e.value.errno is not None
    assert [str(v) for v in c.violations if v.direction == "S"] == []
    c.shutdown()
    _no_local_breach(s)


def test_block_size_required_refuses_go_without_the_request(serve):
    s = serve([Export.memory("exp", MiB, block_size=(4096, 4096, MiB), block_size_required=True)])
    c = rc.pair(s)
    replies = rc.go(c)
    # "A server sending an NBD_REP_ERR_BLOCK_SIZE_REQD error SHOULD ensure it first sends an
    # NBD_INFO_BLOCK_SIZE information reply".
    assert [t for t, _ in replies] == [REP_INFO, ERR_BLOCK_SIZE_REQD]
    assert struct.unpack(">HIII", replies[0][1]) == (INFO_BLOCK_SIZE, 4096, 4096, MiB)
    # "The server MUST NOT send this error if size constraints were requested": the retry goes through.
    assert rc.opt_go(c, infos=(INFO_BLOCK_SIZE,))[-1][0] == REP_ACK
    assert _read(c, 4096, 4096, 1) == 0
    c.sendall(rc.request(2, cookie=2))  # NBD_CMD_DISC
    assert rc.closed(c)
    c.close()
    clean(s)
    _no_local_breach(s)


def test_block_size_required_hangs_up_on_export_name(serve):
    # "MAY refuse to go into transmission phase with a client that uses NBD_OPT_EXPORT_NAME (via a hard
    # disconnect)".
    s = serve([Export.memory("exp", MiB, block_size=(4096, 4096, MiB), block_size_required=True)])
    c = rc.pair(s)
    rc.recv_exact(c, 18)
    c.sendall(struct.pack(">I", 3) + rc.option(1, b"exp"))
    assert rc.closed(c)
    c.close()
    assert s.wait_closed(10)
    assert "NBD_INFO_BLOCK_SIZE" in s.records[0].reason


def test_block_size_required_needs_constraints():
    # "The server SHOULD NOT send this error if it is using default size constraints".
    with pytest.raises(ValueError, match="block_size_required"):
        Export.memory("exp", MiB, block_size_required=True)


@pytest.mark.skipif(not shutil.which("nbdinfo"), reason="libnbd-bin not installed")
def test_block_size_required_is_transparent_to_libnbd(serve):
    """libnbd always requests NBD_INFO_BLOCK_SIZE with NBD_OPT_GO, so it never sees the error."""
    s = serve([Export.memory("exp", MiB, block_size=(512, 4096, MiB), block_size_required=True)])
    (e,) = json.loads(run(["nbdinfo", "--json", s.uri]).stdout)["exports"]
    assert (e["block_size_minimum"], e["block_size_maximum"]) == (512, MiB)
    c = Client()
    c.set_timeout(5)
    c.connect_uri(s.uri)  # the reference client requests it too
    assert c.pread(512, 512) == b"\0" * 512
    c.shutdown()
    clean(s)
