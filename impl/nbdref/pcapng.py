"""A pcapng writer for what a proxy saw: synthetic loopback IPv4/TCP framing around the NBD bytes.

Blocks from the pcapng spec (draft-ietf-opsawg-pcapng): one Section Header Block, one Interface
Description Block (LINKTYPE_RAW: each packet starts with its IPv4 header; timestamps in µs), then an
Enhanced Packet Block per TCP segment.  Every NBD connection is one TCP stream 127.0.0.1:<client port>
-> 127.0.0.1:10809 (the NBD port, so Wireshark's NBD dissector picks it up) with a SYN / SYN-ACK /
ACK at the start, data segments of at most 65000 bytes with consistent seq/ack numbers and real
checksums, and FINs at the end.  Only the bytes are real; the framing is made up.  Fields are built
with ``int.to_bytes`` (struct layouts of the NBD wire live in ``_wire`` alone; these are not NBD's).
"""

from __future__ import annotations

import threading
import time
from typing import BinaryIO

NBD_PORT = 10809
MAX_SEGMENT = 65000
LINKTYPE_RAW = 101

_SHB, _IDB, _EPB = 0x0A0D0D0A, 0x00000001, 0x00000006
_BYTE_ORDER_MAGIC = 0x1A2B3C4D
_LOOPBACK = bytes((127, 0, 0, 1))
_SYN, _FIN, _ACK, _PSH = 0x02, 0x01, 0x10, 0x08


def _le(n: int, size: int) -> bytes:
    """pcapng is written in little-endian byte order (the SHB's byte-order magic says so)."""
    return (n & ((1 << (8 * size)) - 1)).to_bytes(size, "little")


def _be(n: int, size: int) -> bytes:
    """IPv4 and TCP fields are in network byte order."""
    return (n & ((1 << (8 * size)) - 1)).to_bytes(size, "big")


def _block(kind: int, body: bytes) -> bytes:
    """A block: type, total length, body padded to 32 bits, total length again."""
    pad = -len(body) % 4
    total = 12 + len(body) + pad
    return _le(kind, 4) + _le(total, 4) + body + bytes(pad) + _le(total, 4)


def _fold(n: int, nonzero: bool) -> int:
    """One's complement sum of 16-bit words from the big integer of those words: N mod 0xFFFF."""
    s = n % 0xFFFF
    return 0xFFFF if s == 0 and nonzero else s


def _checksum(*parts: bytes | memoryview) -> int:
    data = b"".join(parts)
    if len(data) % 2:
        data += b"\0"
    n = int.from_bytes(data, "big")
    return ~_fold(n, n != 0) & 0xFFFF


class _Stream:
    """One TCP stream: the next sequence number of each end (client, server)."""

    def __init__(self, client_port: int) -> None:
        self.ports = (client_port, NBD_PORT)
        self.seq = [0x10000000 + client_port * 7919, 0x20000000 + client_port * 104729]
        self.closed = [False, False]


class PcapngWriter:
    """Thread-safe writer: ``open_stream()`` per connection, ``data()`` per chunk, ``close_stream()``."""

    def __init__(self, file: str | BinaryIO) -> None:
        self._own = isinstance(file, str)
        self._f: BinaryIO = open(file, "wb") if isinstance(file, str) else file  # noqa: SIM115
        self._lock = threading.Lock()
        self._next_port = 40000
        shb = _le(_BYTE_ORDER_MAGIC, 4) + _le(1, 2) + _le(0, 2) + _le(-1, 8)  # version 1.0, length unknown
        idb = _le(LINKTYPE_RAW, 2) + _le(0, 2) + _le(0, 4)  # reserved, snaplen 0: no limit
        self._f.write(_block(_SHB, shb) + _block(_IDB, idb))

    def _packet(self, stream: _Stream, side: int, flags: int, payload: bytes | memoryview = b"") -> None:
        sport, dport = stream.ports if side == 0 else stream.ports[::-1]
        seq, ack = stream.seq[side], stream.seq[1 - side]
        plen = len(payload)
        # TCP: ports, seq, ack, data offset 5 words, flags, window, checksum (0 until computed), urgent
        head = _be(sport, 2) + _be(dport, 2) + _be(seq, 4) + _be(ack if flags & _ACK else 0, 4)
        head += bytes((5 << 4, flags)) + _be(65535, 2)
        pseudo = _LOOPBACK + _LOOPBACK + bytes((0, 6)) + _be(20 + plen, 2)
        tcp = head + _be(_checksum(pseudo, head, b"\0\0\0\0", payload), 2) + b"\0\0"
        # IPv4: version 4 / IHL 5, TOS, total length, id, DF, TTL 64, protocol 6 (TCP), checksum, addresses
        ip = bytes((0x45, 0)) + _be(40 + plen, 2) + b"\0\0" + _be(0x4000, 2) + bytes((64, 6))
        ip += _be(_checksum(ip, b"\0\0", _LOOPBACK, _LOOPBACK), 2) + _LOOPBACK + _LOOPBACK
        ts = time.time_ns() // 1000
        # EPB: interface 0, timestamp (high, low; µs), captured and original length
        epb = _le(0, 4) + _le(ts >> 32, 4) + _le(ts, 4) + _le(40 + plen, 4) + _le(40 + plen, 4)
        pad = -(40 + plen) % 4
        total = 12 + 20 + 40 + plen + pad
        self._f.write(_le(_EPB, 4) + _le(total, 4) + epb + ip + tcp)
        if plen:
            self._f.write(payload)
        self._f.write(bytes(pad) + _le(total, 4))
        stream.seq[side] += plen + (1 if flags & (_SYN | _FIN) else 0)

    def open_stream(self) -> _Stream:
        """A new connection: the three-way handshake."""
        with self._lock:
            stream = _Stream(self._next_port)
            self._next_port = self._next_port + 1 if self._next_port < 65000 else 40000
            self._packet(stream, 0, _SYN)
            self._packet(stream, 1, _SYN | _ACK)
            self._packet(stream, 0, _ACK)
            return stream

    def data(self, stream: _Stream, from_server: bool, payload: bytes | memoryview) -> None:
        """Bytes one side sent, cut into segments of at most ``MAX_SEGMENT`` bytes."""
        side = 1 if from_server else 0
        view = memoryview(payload).cast("B")
        with self._lock:
            for start in range(0, len(view), MAX_SEGMENT):
                self._packet(stream, side, _PSH | _ACK, view[start : start + MAX_SEGMENT])

    def close_stream(self, stream: _Stream, from_server: bool | None = None) -> None:
        """A FIN from one side (or both, ``None``); each side's FIN is written once."""
        with self._lock:
            for side in ((0, 1) if from_server is None else (1 if from_server else 0,)):
                if not stream.closed[side]:
                    stream.closed[side] = True
                    self._packet(stream, side, _FIN | _ACK)

    def flush(self) -> None:
        with self._lock:
            if not self._f.closed:
                self._f.flush()

    def close(self) -> None:
        with self._lock:
            if self._f.closed:
                return
            self._f.flush()
            if self._own:
                self._f.close()
