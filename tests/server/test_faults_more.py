"""The fault builders the client robustness suite added (suites/client/test_faults.py): each sends the
bytes its description promises, in compact-structured and extended form."""

from __future__ import annotations

import struct

import pytest
from nbdref import faults
from nbdref._constants import Magic, ReplyFlag, ReplyType
from nbdref.faults import ReplyContext

CTX = ReplyContext(cookie=7, command=0, offset=4096, length=8, structured=True, extended=False, data=b"ABCDEFGH")


def chunks(raw: bytes) -> list[tuple[int, int, int, int, bytes]]:
    """(magic, flags, type, cookie, payload) of each compact structured chunk in `raw`."""
    out = []
    while raw:
        magic, flags, rtype, cookie, length = struct.unpack_from(">IHHQI", raw)
        out.append((magic, flags, rtype, cookie, raw[20:20 + length]))
        raw = raw[20 + length:]
    return out


def test_unknown_chunk_type_is_not_an_error_type() -> None:
    (magic, flags, rtype, cookie, _payload), = chunks(faults.get("unknown-chunk-type").reply_bytes(CTX))
    assert (magic, cookie, rtype) == (Magic.STRUCTURED_REPLY, 7, 99) and flags & ReplyFlag.DONE
    assert not rtype & 0x8000 and rtype not in set(ReplyType)


def test_unknown_error_chunk_has_bit_15_and_an_error() -> None:
    (_m, flags, rtype, _c, payload), = chunks(faults.get("unknown-error-chunk").reply_bytes(CTX))
    assert rtype == 0x8099 and flags & ReplyFlag.DONE
    err, msglen = struct.unpack(">IH", payload)
    assert err != 0 and msglen == 0


def test_unknown_reply_flag_keeps_the_data_right() -> None:
    (_m, flags, rtype, _c, payload), = chunks(faults.get("unknown-reply-flag").reply_bytes(CTX))
    assert rtype == ReplyType.OFFSET_DATA and flags == ReplyFlag.DONE | 0x80
    assert struct.unpack_from(">Q", payload)[0] == CTX.offset and payload[8:] == CTX.data


def test_chunks_out_of_order_cover_the_request_once() -> None:
    a, b = chunks(faults.get("chunks-out-of-order").reply_bytes(CTX))
    assert not a[1] & ReplyFlag.DONE and b[1] & ReplyFlag.DONE
    (off_a,), (off_b,) = struct.unpack_from(">Q", a[4]), struct.unpack_from(">Q", b[4])
    assert off_a > off_b == CTX.offset
    assert b[4][8:] + a[4][8:] == CTX.data


@pytest.mark.parametrize("structured", [False, True])
def test_unknown_error_value(structured: bool) -> None:
    ctx = ReplyContext(cookie=3, command=0, offset=0, length=4, structured=structured, extended=False, data=b"abcd")
    raw = faults.get("unknown-error-value").reply_bytes(ctx)
    if structured:
        (_m, _f, rtype, _c, payload), = chunks(raw)
        assert rtype == ReplyType.ERROR and struct.unpack(">IH", payload) == (99, 0)
    else:
        assert struct.unpack(">IIQ", raw) == (Magic.SIMPLE_REPLY, 99, 3)


def test_extended_form() -> None:
    ext = ReplyContext(cookie=5, command=0, offset=512, length=8, structured=False, extended=True, data=b"ABCDEFGH")
    raw = faults.get("chunks-out-of-order").reply_bytes(ext)
    assert struct.unpack_from(">I", raw)[0] == Magic.EXTENDED_REPLY


def test_every_fault_has_a_client_case() -> None:
    """The catalogue and the client robustness suite agree: every fault is a case, and the faults the
    suite judges by name (ids, expected reactions) exist."""
    from suites.client import test_faults as t
    assert {s.split(":")[0] for s in t.CASES} == set(faults.FAULTS)
    named = set(t.IDS) | set(t.PERSONA) | set(t.PARAM) | t.MUST_FAIL | t.MUST_SUCCEED | t.HARD_DISCONNECT
    assert named <= set(faults.FAULTS), named - set(faults.FAULTS)
