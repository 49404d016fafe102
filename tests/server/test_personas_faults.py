"""The persona table and the fault catalogue: consistent with the timeline and with each other."""

from __future__ import annotations

import pathlib
import struct

import pytest
import yaml
from nbdref import faults, personas
from nbdref._constants import Magic, ReplyFlag, ReplyType
from nbdref.faults import ReplyContext

TIMELINE = pathlib.Path(__file__).resolve().parents[2] / "fixtures" / "data" / "timeline.yaml"   # vendored copy

REQUIRED = ["qemu-2.6", "qemu-2.8", "qemu-2.10", "qemu-2.11", "qemu-2.12", "qemu-3.0", "qemu-4.2", "qemu-5.2",
            "qemu-7.2", "qemu-8.2", "qemu-10.0", "nbdkit-1.24", "nbdkit-1.32", "nbd-server-3.24", "nbdref"]


def _v(s: str) -> tuple[int, ...]:
    return tuple(int(x) for x in s.split("."))


@pytest.mark.parametrize("name", REQUIRED)
def test_persona_exists(name):
    assert personas.get(name).name == name


# timeline feature key -> persona predicate
FEATURES = {
    "NBD_OPT_GO": lambda p: p.opt_go,
    "NBD_OPT_STRUCTURED_REPLY": lambda p: p.structured_replies,
    "NBD_CMD_WRITE_ZEROES": lambda p: p.write_zeroes,
    "NBD_CMD_BLOCK_STATUS": lambda p: personas.BASE_ALLOCATION in p.meta_contexts,
    "qemu:dirty-bitmap": lambda p: personas.DIRTY_BITMAP in p.meta_contexts,
    "qemu:allocation-depth": lambda p: personas.ALLOCATION_DEPTH in p.meta_contexts,
    "NBD_CMD_CACHE": lambda p: p.cache,
    "NBD_CMD_FLAG_FAST_ZERO": lambda p: p.fast_zero,
    "TLS-PSK": lambda p: p.tls_psk,
    "NBD_OPT_EXTENDED_HEADERS": lambda p: p.extended_headers,
    "NBD_FLAG_CAN_MULTI_CONN-writable": lambda p: p.multi_conn_rw,
}


@pytest.mark.parametrize("feature", sorted(FEATURES))
def test_qemu_personas_follow_the_timeline(feature):
    """Every qemu persona has a documented feature exactly from the timeline's `since` version on."""
    timeline = yaml.safe_load(TIMELINE.read_text())["features"]
    since = timeline[feature]["qemu"]["server"]["since"]
    assert since, feature
    for p in personas.PERSONAS.values():
        if p.implementation != "qemu-nbd":
            continue
        assert FEATURES[feature](p) == (_v(p.version) >= _v(since)), (p.name, feature, since)


def test_nbdkit_sends_no_holes_and_no_block_size():
    for name in ("nbdkit-1.24", "nbdkit-1.32"):
        p = personas.get(name)
        assert not p.offset_hole and p.info_block_size is None and not p.extended_headers


def test_unknown_fields_are_real_fields():
    names = set(personas.Persona.__dataclass_fields__)
    for p in personas.PERSONAS.values():
        assert set(p.unknown) <= names, p.name


def test_persona_lookup_error_lists_names():
    with pytest.raises(KeyError, match=r"qemu-2\.6"):
        personas.get("qemu-0.1")


def test_table_text_mentions_every_persona():
    text = personas.format_table()
    for name in personas.PERSONAS:
        assert name in text


CTX = ReplyContext(cookie=7, command=0, offset=4096, length=8, structured=True, extended=False, data=b"ABCDEFGH")


def _chunks(raw: bytes) -> list[tuple[int, int, int, int, bytes]]:
    out = []
    while raw:
        magic, flags, rtype, cookie, length = struct.unpack_from(">IHHQI", raw)
        out.append((magic, flags, rtype, cookie, raw[20:20 + length]))
        raw = raw[20 + length:]
    return out


def test_fault_specs_parse():
    f = faults.get("disconnect-handshake:20")
    assert f is not None and f.cut_handshake_at == 20 and f.spec == "disconnect-handshake:20"
    assert faults.get("disconnect-reply").cut_reply_at == 8  # type: ignore[union-attr]
    assert faults.get(None) is None
    with pytest.raises(KeyError):
        faults.get("no-such-fault")


def test_fault_chunk_outside_range():
    (magic, _flags, rtype, cookie, payload), = _chunks(faults.get("chunk-outside-range").reply_bytes(CTX))
    assert (magic, rtype, cookie) == (Magic.STRUCTURED_REPLY, ReplyType.OFFSET_DATA, 7)
    assert struct.unpack_from(">Q", payload)[0] >= CTX.offset + CTX.length


def test_fault_overlapping_and_missing_done():
    a, b = _chunks(faults.get("overlapping-chunks").reply_bytes(CTX))
    assert struct.unpack_from(">Q", a[4])[0] == struct.unpack_from(">Q", b[4])[0] == CTX.offset
    (c,) = _chunks(faults.get("missing-done").reply_bytes(CTX))
    assert not c[1] & ReplyFlag.DONE


def test_fault_unknown_cookie_and_bad_magic_simple():
    simple = ReplyContext(cookie=9, command=0, offset=0, length=4, structured=False, extended=False, data=b"abcd")
    raw = faults.get("unknown-cookie").reply_bytes(simple)
    magic, _err, cookie = struct.unpack_from(">IIQ", raw)
    assert magic == Magic.SIMPLE_REPLY and cookie != 9 and raw[16:] == b"abcd"
    raw = faults.get("wrong-reply-magic").reply_bytes(simple)
    assert struct.unpack_from(">I", raw)[0] == 0xDEADBEEF


def test_fault_error_chunk_bad_length():
    (c,) = _chunks(faults.get("error-chunk-bad-message-length").reply_bytes(CTX))
    err, msglen = struct.unpack_from(">IH", c[4])
    assert c[2] == ReplyType.ERROR and err != 0 and msglen > len(c[4]) - 6


def test_fault_structured_when_not_negotiated():
    simple = ReplyContext(cookie=1, command=0, offset=0, length=4, structured=False, extended=False, data=b"abcd")
    raw = faults.get("structured-unnegotiated").reply_bytes(simple)
    assert struct.unpack_from(">I", raw)[0] == Magic.STRUCTURED_REPLY


def test_every_fault_is_listed():
    text = faults.format_table()
    assert all(name in text for name in faults.FAULTS)
