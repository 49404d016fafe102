"""Every entry of data/constants.yaml must match nbdref._constants (and the codec's sizes)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from nbdref import _constants as k
from nbdref import _wire as w

ROOT = Path(__file__).resolve().parents[1]
VENDORED = ROOT / "impl" / "nbdref" / "data" / "constants.yaml"

DOC = yaml.safe_load(VENDORED.read_text())

# Prefix of the spec name -> enum class, per section of constants.yaml.
SECTIONS = {
    "handshake_flags": ("NBD_FLAG_", k.HandshakeFlag),
    "client_flags": ("NBD_FLAG_C_", k.ClientFlag),
    "option_types": ("NBD_OPT_", k.Opt),
    "option_reply_types": ("NBD_REP_", k.Rep),
    "info_types": ("NBD_INFO_", k.Info),
    "transmission_flags": ("NBD_FLAG_", k.TxFlag),
    "command_types": ("NBD_CMD_", k.Cmd),
    "command_flags": ("NBD_CMD_FLAG_", k.CmdFlag),
    "structured_reply_flags": ("NBD_REPLY_FLAG_", k.ReplyFlag),
    "structured_reply_types": ("NBD_REPLY_TYPE_", k.ReplyType),
    "error_values": ("NBD_", k.Err),
}
# Names that are not members of the section's enum.
SPECIAL = {
    "NBD_REP_FLAG_ERROR": k.REP_FLAG_ERROR,
    "error chunk bit": k.REPLY_TYPE_ERROR_BIT,
}
MAGICS = {
    "NBDMAGIC": k.Magic.NBDMAGIC,
    "cliserv_magic": k.Magic.CLISERV,
    "IHAVEOPT": k.Magic.IHAVEOPT,
    "NBD_OPT_REPLY_MAGIC": k.Magic.OPT_REPLY,
    "NBD_REQUEST_MAGIC": k.Magic.REQUEST,
    "NBD_SIMPLE_REPLY_MAGIC": k.Magic.SIMPLE_REPLY,
    "NBD_STRUCTURED_REPLY_MAGIC": k.Magic.STRUCTURED_REPLY,
    "NBD_EXTENDED_REQUEST_MAGIC": k.Magic.EXTENDED_REQUEST,
    "NBD_EXTENDED_REPLY_MAGIC": k.Magic.EXTENDED_REPLY,
    "historic NBD_REQUEST_MAGIC": k.Magic.HISTORIC_REQUEST,
    "historic NBD_REPLY_MAGIC": k.Magic.HISTORIC_REPLY,
    "NBD_TRACELOG_MAGIC": k.Magic.TRACELOG,
}
LIMITS = {
    "IANA NBD port": k.NBD_PORT,
    "string length recommended maximum": k.STRING_RECOMMENDED_MAX,
    "string length hard maximum": k.STRING_MAX,
    "reserved zero padding (oldstyle greeting / EXPORT_NAME reply)": k.ZERO_PAD,
    "default minimum block size": k.DEFAULT_MIN_BLOCK,
    "default preferred block size": k.DEFAULT_PREF_BLOCK,
    "default maximum payload (server should accept at least)": k.DEFAULT_MAX_PAYLOAD,
    "interoperable client block size": k.INTEROP_BLOCK,
    "maximum advertised minimum block size": k.MAX_MIN_BLOCK,
    "recommended minimum of maximum payload": k.RECOMMENDED_MIN_MAX_PAYLOAD,
    "maximum payload meaning no fixed limit": k.MAX_PAYLOAD_UNLIMITED,
    "maximum extents per block status chunk (should not exceed)": k.MAX_EXTENTS_PER_CHUNK,
    "DF read length the server must support": k.DF_MIN_SUPPORTED,
    "largest single OFFSET_DATA data payload without extended headers": k.MAX_DATA_CHUNK,
}
WIRE_SIZES = {
    "oldstyle greeting (server)": w.OLDSTYLE_GREETING.size,
    "newstyle greeting (server)": w.NEWSTYLE_GREETING.size,
    "client flags": w.CLIENT_FLAGS.size,
    "option request header": w.OPTION_HEADER.size,
    "option reply header": w.OPTION_REPLY_HEADER.size,
    "request header": w.REQUEST.size,
    "simple reply header": w.SIMPLE_REPLY.size,
    "structured reply chunk header": w.STRUCTURED_CHUNK.size,
    "extended request header": w.EXTENDED_REQUEST.size,
    "extended reply chunk header": w.EXTENDED_CHUNK.size,
}


def _entries(section: str) -> list[dict]:
    return DOC[section]


def _value(entry: dict) -> int:
    if "value" in entry:
        return int(entry["value"], 16)
    if "dec" in entry:
        return int(entry["dec"])
    return eval(entry["expr"].replace("^", "**"), {})  # e.g. "2^32 - 8"


@pytest.mark.parametrize("section", sorted(SECTIONS))
def test_enum_section(section):
    prefix, cls = SECTIONS[section]
    seen = set()
    for entry in _entries(section):
        name = entry["name"]
        if name in SPECIAL:
            assert SPECIAL[name] == _value(entry), name
            continue
        assert name.startswith(prefix), name
        member = cls[name[len(prefix) :]]
        assert int(member) == _value(entry), name
        if "bit" in entry:
            assert int(member) == 1 << entry["bit"], name
        seen.add(int(member))
    # The enum holds nothing the catalogue does not know about.
    assert {int(m) for m in cls} <= seen


@pytest.mark.parametrize("section", ["handshake_magics", "transmission_magics", "reserved_magics"])
def test_magics(section):
    for entry in _entries(section):
        assert int(MAGICS[entry["name"]]) == _value(entry), entry["name"]
        if "header_bytes" in entry:
            assert entry["header_bytes"] in WIRE_SIZES.values() or entry["header_bytes"] == 16


def test_every_magic_is_catalogued():
    catalogued = {e["name"] for s in ("handshake_magics", "transmission_magics", "reserved_magics") for e in DOC[s]}
    assert set(MAGICS) == catalogued
    assert set(MAGICS.values()) == set(k.Magic)


def test_state_flags():
    bits = {}
    for ctx in DOC["metadata_contexts"]:
        for b in ctx.get("status_bits", []):
            bits[b["name"]] = int(b["value"], 16)
    assert bits == {"NBD_STATE_HOLE": k.StateFlag.HOLE, "NBD_STATE_ZERO": k.StateFlag.ZERO, "NBD_STATE_DIRTY": k.StateFlag.DIRTY}
    names = {c["name"] for c in DOC["metadata_contexts"]}
    assert k.CONTEXT_BASE_ALLOCATION in names and k.CONTEXT_QEMU_ALLOCATION_DEPTH in names
    assert k.CONTEXT_QEMU_DIRTY_BITMAP_PREFIX + "<dirty-bitmap-export-name>" in names


def test_limits():
    assert {e["name"] for e in DOC["limits"]} == set(LIMITS)
    for e in DOC["limits"]:
        assert LIMITS[e["name"]] == _value(e), e["name"]


def test_wire_sizes():
    for e in DOC["wire_sizes"]:
        msg = e["message"]
        if msg in WIRE_SIZES:
            assert WIRE_SIZES[msg] == e["bytes"], msg
        else:  # "134, or 10 with NBD_FLAG_C_NO_ZEROES"
            assert msg == "NBD_OPT_EXPORT_NAME reply"
            sizes = [int(x) for x in re.findall(r"\d+", e["bytes"])]
            assert sizes == [w.EXPORT_NAME_REPLY_ZEROES.size, w.EXPORT_NAME_REPLY.size]


def test_info_reply_lengths():
    for e in DOC["info_types"]:
        rl = e["reply_length"]
        if isinstance(rl, int):
            layout = {k.Info.EXPORT: w.INFO_EXPORT, k.Info.BLOCK_SIZE: w.INFO_BLOCK_SIZE}[k.Info(_value(e))]
            assert layout.size == rl


def test_errno_mapping():
    import errno

    for e in DOC["error_values"]:
        err = k.Err[e["name"][4:]]
        assert err.errno == getattr(errno, e["errno"])
        assert k.Err.from_errno(err.errno) is err
    assert k.Err.from_errno(errno.EDQUOT) is k.Err.ENOSPC  # ERR-002
    assert k.Err.from_errno(errno.ENOENT) is k.Err.EINVAL
