"""Transcripts keep a summary of each payload (length, first bytes), never the payload buffer itself."""

from __future__ import annotations

from nbdref import Cmd
from nbdref import events as ev

from .helpers import ConnectionPair

MIB = 1 << 20


class _Buf(bytearray):
    """A bytearray that can be weakly referenced (plain bytes/bytearray cannot)."""


def test_transcript_keeps_a_summary_not_the_payload():
    import gc
    import weakref

    p = ConnectionPair()
    p.handshake(export_size=64 * MIB)
    refs = []
    for i in range(50):
        buf = _Buf(b"\xab" * MIB)
        refs.append(weakref.ref(buf))
        p.send(p.client, ev.Request(cookie=i, command=Cmd.WRITE, offset=i * MIB, length=MIB, payload=buf))
        p.send(p.server, ev.SimpleReply(cookie=i))
        del buf
    # Reads: the received OffsetData / the sent one carry a megabyte too.
    data = _Buf(b"\xcd" * MIB)
    refs.append(weakref.ref(data))
    p.send(p.client, ev.Request(cookie=99, command=Cmd.READ, length=MIB))
    p.send(p.server, ev.OffsetData(cookie=99, offset=0, data=data))
    del data
    gc.collect()
    assert [r for r in refs if r() is not None] == []
    # The lines still show the length and the first bytes.
    lines = p.client.transcript.lines() + p.server.transcript.lines()
    assert any(f"<{MIB} bytes {'ab' * 16}...>" in line and "NBD_CMD_WRITE" in line for line in lines)
    assert any(f"length={MIB} data=<{MIB} bytes {'cd' * 16}...>" in line for line in lines)
    for conn in (p.client, p.server):
        kept = 0
        for entry in conn.transcript:
            e = entry.event
            for name in ("payload", "data"):
                b = getattr(e, name, None)
                if b is not None:
                    kept += memoryview(b).nbytes
        assert kept < 64 * 1024
