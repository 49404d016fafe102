"""Oldstyle and plain (non-fixed) newstyle servers, for clients' fallbacks; and the transmission flags the
GO reply may carry (NBD_FLAG_BLOCK_STATUS_PAYLOAD, EXT-011/012)."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys

import pytest
from nbdref._constants import TxFlag
from nbdref.client import Client
from nbdref.server import Export, Server, TLSConfig

from . import rawclient as rc
from .conftest import NBDSH, clean, run

MiB = 1 << 20
needs_libnbd = pytest.mark.skipif(not shutil.which("nbdinfo"), reason="libnbd-bin not installed")


def _client(uri: str, *contexts: str) -> Client:
    c = Client()
    c.set_timeout(5)
    for name in contexts:
        c.add_meta_context(name)
    c.connect_uri(uri)
    return c


def _export() -> Export:
    e = Export.memory("exp", 2 * MiB, description="d")
    e.backend.pwrite(4096, b"oldstyle" * 64)
    return e


# ----------------------------------------------------------------- oldstyle


def test_oldstyle_greeting_on_the_wire(serve):
    s = serve([_export()], oldstyle=True)
    c = rc.pair(s)
    # "S: 64 bits, 0x4e42444d41474943 (ASCII 'NBDMAGIC') ... 64 bits, 0x00420281861253 ... 64 bits, size of
    # export in bytes ... 32 bits, flags ... 124 bytes, zeroes (reserved)."
    head = rc.recv_exact(c, 152)
    magic, cliserv, size, flags = struct.unpack(">QQQI", head[:28])
    assert (magic, cliserv, size) == (0x4E42444D41474943, 0x00420281861253, 2 * MiB)
    assert flags >> 16 == 0 and flags & TxFlag.HAS_FLAGS and head[28:] == bytes(124)
    c.sendall(rc.request(0, 4096, 512, cookie=5))
    assert rc.simple_reply(c) == (0, 5)
    assert rc.recv_exact(c, 512) == b"oldstyle" * 64
    c.sendall(rc.request(2, cookie=6))
    assert rc.closed(c)
    c.close()
    clean(s)


def test_oldstyle_reference_client(serve):
    s = serve([_export()], oldstyle=True)
    c = _client(s.uri)
    assert c.get_protocol() == "oldstyle" and c.get_size() == 2 * MiB
    assert not c.get_structured_replies_negotiated()
    c.pwrite(b"w" * 1024, 0)
    assert c.pread(1024, 0) == b"w" * 1024 and c.pread(512, 4096) == b"oldstyle" * 64
    c.shutdown()
    clean(s)


@needs_libnbd
def test_oldstyle_libnbd(serve):
    s = serve([_export()], oldstyle=True)
    info = json.loads(run(["nbdinfo", "--json", s.uri]).stdout)
    assert info["protocol"] == "oldstyle" and info["exports"][0]["export-size"] == 2 * MiB
    script = "print(h.get_protocol()); print(h.pread(512, 4096)[:8].decode()); h.shutdown()"
    out = run([*NBDSH, "-u", s.uri, "-c", script]).stdout.split()
    assert out == ["oldstyle", "oldstyle"]
    clean(s, 2)


def test_oldstyle_config_errors(sockdir):
    # Oldstyle carries one export and no options, so neither names nor STARTTLS.
    with pytest.raises(ValueError, match="exactly one export"):
        Server([Export.memory("a", MiB), Export.memory("b", MiB)], oldstyle=True, unix=str(sockdir / "x"))
    with pytest.raises(ValueError, match="TLS"):
        Server(Export.memory("a", MiB), oldstyle=True, unix=str(sockdir / "y"),
               tls=TLSConfig(mode="on", psk_file="/nonexistent"))


# ----------------------------------------------------------------- newstyle without FIXED_NEWSTYLE


def test_plain_newstyle_reference_client(serve):
    # mask_handshake=0 as nbdkit --mask-handshake=0: neither FIXED_NEWSTYLE nor NO_ZEROES.
    s = serve([_export()], mask_handshake=0)
    c = _client(s.uri)
    assert c.get_protocol() == "newstyle" and c.get_size() == 2 * MiB
    assert c.pread(512, 4096) == b"oldstyle" * 64
    c.shutdown()
    clean(s)
    wire = str(s.records[0].transcript)
    assert "handshake_flags=0x0000" in wire and "NBD_OPT_EXPORT_NAME" in wire and "NBD_OPT_GO" not in wire


def test_plain_newstyle_hangs_up_on_other_options(serve):
    # Without fixed newstyle the server has no way to reply to an option it does not do.
    s = serve([_export()], mask_handshake=~1)
    c = rc.pair(s)
    assert struct.unpack(">H", rc.recv_exact(c, 18)[16:])[0] == 2  # NO_ZEROES only
    c.sendall(struct.pack(">I", 0) + rc.option(7, struct.pack(">I", 3) + b"exp" + b"\0\0"))
    assert rc.closed(c)
    c.close()
    assert s.wait_closed(10) and "without fixed newstyle" in s.records[0].reason


def test_no_zeroes_masked_and_set_anyway_hangs_up(serve):
    # NBD_FLAG_C_NO_ZEROES "MUST NOT be set if the server did not set NBD_FLAG_NO_ZEROES".
    s = serve([_export()], mask_handshake=1)
    c = rc.pair(s)
    assert struct.unpack(">H", rc.recv_exact(c, 18)[16:])[0] == 1  # FIXED_NEWSTYLE only
    c.sendall(struct.pack(">I", 3))
    assert rc.closed(c)
    c.close()
    assert s.wait_closed(10) and "NO_ZEROES" in s.records[0].reason
    assert "sent anyway" not in str(s.records[0].transcript)


def test_no_zeroes_masked_sends_the_zeroes(serve):
    # Without NO_ZEROES the EXPORT_NAME reply ends with "124 bytes, zeroes (reserved)".
    s = serve([_export()], mask_handshake=1)
    c = rc.pair(s)
    rc.recv_exact(c, 18)
    c.sendall(struct.pack(">I", 1) + rc.option(1, b"exp"))
    reply = rc.recv_exact(c, 8 + 2 + 124)
    assert struct.unpack(">Q", reply[:8])[0] == 2 * MiB and reply[10:] == bytes(124)
    c.sendall(rc.request(2))
    assert rc.closed(c)
    c.close()
    clean(s)


@needs_libnbd
def test_plain_newstyle_libnbd(serve):
    s = serve([_export()], mask_handshake=0)
    info = json.loads(run(["nbdinfo", "--json", s.uri]).stdout)
    assert info["protocol"] == "newstyle" and info["exports"][0]["export-size"] == 2 * MiB
    out = run([*NBDSH, "-u", s.uri, "-c", "print(h.get_protocol()); h.shutdown()"]).stdout.strip()
    assert out == "newstyle"
    clean(s, 2)


@needs_libnbd
def test_cli_oldstyle_and_mask_handshake(sockdir):
    for args, protocol in ((["--oldstyle"], "oldstyle"), (["--mask-handshake", "0"], "newstyle")):
        sock = sockdir / f"{protocol}.sock"
        proc = subprocess.Popen([sys.executable, "-m", "nbdref", "serve", "--unix", str(sock), "--size", "1M",
                                 *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            uri = proc.stdout.readline().strip()  # type: ignore[union-attr]
            info = json.loads(run(["nbdinfo", "--json", uri]).stdout)
            assert info["protocol"] == protocol and info["exports"][0]["export-size"] == MiB
        finally:
            proc.terminate()
            proc.communicate(timeout=10)


# ----------------------------------------------------------------- NBD_FLAG_BLOCK_STATUS_PAYLOAD


@pytest.mark.parametrize("persona", ["nbdref", "qemu-8.2", "qemu-10.0"])
def test_block_status_payload_only_with_meta_contexts(serve, persona):
    # ext-header draft, bit 12: "SHOULD NOT advertise this bit in response to NBD_OPT_GO if the client
    # does not negotiate metacontexts with NBD_OPT_SET_META_CONTEXT" (EXT-012).
    s = serve([_export()], persona=persona)
    plain = _client(s.uri)
    assert plain.get_extended_headers_negotiated()
    assert not plain.get_transmission_flags() & TxFlag.BLOCK_STATUS_PAYLOAD
    assert "EXT-012" not in [v.req_id for v in plain.violations]
    plain.shutdown()
    meta = _client(s.uri, "base:allocation")
    assert meta.get_transmission_flags() & TxFlag.BLOCK_STATUS_PAYLOAD
    meta.shutdown()
    clean(s, 2)
