"""Differential: edge-case requests in transmission, sent alike to every server peer.

Each case records the server's answer (suites/differential/_probe.py normalizes it) and judges only what
the spec pins down: a SHOULD it names (non-strict when broken), a MUST (fail).  Where the spec leaves the
answer open ("unspecified", "MAY") every answer is accepted and recorded.  A case that ends a session
checks that the server still serves the next connection.  Reading cases use `shared_server`, writing
ones `writable_server` inside a region of their own (writes past the end start *at* the end, so nothing
of the export changes even on a server that writes the part inside), writes to a read-only export a
read-only export of their own (`fresh_export`): a server that crashes on one takes no other test along.
Unknown commands and flags: test_flags.py; NBD_CMD_DISC: test_disconnect.py.
"""

from __future__ import annotations

import pytest
from nbdref._constants import Cmd, TxFlag

from fixtures.exports import expected_bytes
from suites.differential._probe import (
    HARD,
    advertised,
    after,
    ask,
    connect,
    head,
    record,
    should_not_disconnect,
)

SECTION = "Differential: Request types"
BASE = "base:allocation"
SECTOR = 512
RO_SIZE = 1 << 20                    # the read-only export of the read-only cases


# --------------------------------------------------------------------------------------------------
# Zero-length requests: "The client SHOULD NOT request a ... length of 0; the behavior of a server on
# such a request is unspecified although the server SHOULD NOT disconnect."


@pytest.mark.req("RD-009")
def test_zero_length_read(server_peer, shared_server, shared_export, ref_client, verdict):
    """What does a server answer to an NBD_CMD_READ of length 0?"""
    c = connect(ref_client, shared_server)
    answer = ask(c, shared_export, Cmd.READ, 4 * SECTOR, 0)
    record(verdict, answer, "RD-009")
    should_not_disconnect(verdict, answer, "RD-009")
    after(ref_client, shared_server, shared_export, answer)


@pytest.mark.req("RD-009")
def test_zero_length_read_simple(server_peer, shared_server, shared_export, ref_client, verdict):
    """What does a server answer to an NBD_CMD_READ of length 0 without structured replies?"""
    c = connect(ref_client, shared_server, structured=False)
    answer = ask(c, shared_export, Cmd.READ, 4 * SECTOR, 0)
    record(verdict, answer, "RD-009")
    should_not_disconnect(verdict, answer, "RD-009")
    after(ref_client, shared_server, shared_export, answer)


@pytest.mark.req("WR-004")
def test_zero_length_write(server_peer, writable_server, writable_export, region, ref_client, verdict):
    """What does a server answer to an NBD_CMD_WRITE of length 0?"""
    c = connect(ref_client, writable_server)
    answer = ask(c, writable_export, Cmd.WRITE, region(), 0, payload=b"")
    record(verdict, answer, "WR-004")
    should_not_disconnect(verdict, answer, "WR-004")
    after(ref_client, writable_server, writable_export, answer)


def _zero_length_flagged(ref_client, server, export, offset: int, verdict, cmd: Cmd, flag: TxFlag, rid: str) -> None:
    """A length-0 request of a command the server gates behind `flag`: the answer recorded (said to be
    unadvertised when it is), and no hard disconnect judged when the server advertised the command."""
    c = connect(ref_client, server)
    prefix = advertised(c, flag)
    answer = prefix + ask(c, export, cmd, offset, 0)
    record(verdict, answer, rid)
    if not prefix:
        should_not_disconnect(verdict, answer, rid)
    after(ref_client, server, export, answer)


@pytest.mark.req("TRIM-004")
def test_zero_length_trim(server_peer, writable_server, writable_export, region, ref_client, verdict):
    """What does a server answer to an NBD_CMD_TRIM of length 0?"""
    _zero_length_flagged(ref_client, writable_server, writable_export, region(), verdict, Cmd.TRIM,
                         TxFlag.SEND_TRIM, "TRIM-004")


@pytest.mark.req("WZ-011")
def test_zero_length_write_zeroes(server_peer, writable_server, writable_export, region, ref_client, verdict):
    """What does a server answer to an NBD_CMD_WRITE_ZEROES of length 0?"""
    _zero_length_flagged(ref_client, writable_server, writable_export, region(), verdict, Cmd.WRITE_ZEROES,
                         TxFlag.SEND_WRITE_ZEROES, "WZ-011")


@pytest.mark.req("BS-065")
def test_zero_length_block_status(server_peer, shared_server, shared_export, ref_client, verdict):
    """What does a server answer to an NBD_CMD_BLOCK_STATUS of length 0?"""
    c = connect(ref_client, shared_server, contexts=(BASE,))
    prefix = "" if c.can_meta_context(BASE) else "no context: "
    answer = prefix + ask(c, shared_export, Cmd.BLOCK_STATUS, 4 * SECTOR, 0)
    record(verdict, answer, "BS-065")
    if not prefix:
        should_not_disconnect(verdict, answer, "BS-065")
    after(ref_client, shared_server, shared_export, answer)


# NBD_CMD_CACHE has no zero-length sentence: "it is unspecified what the server's actual caching
# mechanism is (if any)" and the server "MAY use this information" (CACHE-001).
@pytest.mark.req("CACHE-001")
def test_zero_length_cache(server_peer, shared_server, shared_export, ref_client, verdict):
    """What does a server answer to an NBD_CMD_CACHE of length 0?"""
    c = connect(ref_client, shared_server)
    answer = advertised(c, TxFlag.SEND_CACHE) + ask(c, shared_export, Cmd.CACHE, 4 * SECTOR, 0)
    record(verdict, answer, "CACHE-001")
    after(ref_client, shared_server, shared_export, answer)


# --------------------------------------------------------------------------------------------------
# Past the end of the export.  The error values section: "The server SHOULD return NBD_ENOSPC if it
# receives a write request including one or more sectors beyond the size of the device ... It SHOULD
# return NBD_EINVAL if it receives a read or trim request including one or more sectors beyond the size"
# (ERR-001, ERR-003); the size constraints section: the server "SHOULD report an NBD_EINVAL error" for a
# request "that exceeds the size of the export" (BSZ-034).  For WRITE (and WRITE_ZEROES, WZ-030) the two
# SHOULDs name different errors: either one is a spec tension, not a fault.


def _past_end(verdict, answer: str, wanted: tuple[str, ...], ids: tuple[str, ...]) -> None:
    """Judge an answer to a request past the end: one of `wanted`, or a hard disconnect (allowed: the
    client broke BSZ-033, a MUST NOT).  Success is a fault of every id."""
    got = head(answer)
    if got == HARD:
        return
    verdict.expect(got in wanted, *ids, expected=" or ".join(wanted), observed=answer)


WRITE_END_TEXTS = (
    "proto.md, Error values: \"The server SHOULD return NBD_ENOSPC if it receives a write request including "
    "one or more sectors beyond the size of the device\" (ERR-001; NBD_CMD_WRITE_ZEROES: WZ-030)",
    "proto.md, Size constraints: the server \"SHOULD report an NBD_EINVAL error\" for a request whose offset "
    "plus length exceeds the export size (BSZ-034)",
)


def _write_past_end(verdict, answer: str, write_id: str) -> None:
    got = head(answer)
    if got in ("NBD_ENOSPC", "NBD_EINVAL"):
        verdict.tension(write_id, "BSZ-034", texts=WRITE_END_TEXTS, observed=answer)
        return
    _past_end(verdict, answer, ("NBD_ENOSPC", "NBD_EINVAL"), (write_id, "BSZ-034"))


@pytest.mark.req("ERR-003", "BSZ-034")
def test_read_past_end(server_peer, shared_server, shared_export, ref_client, verdict):
    """What does a server answer to an NBD_CMD_READ that starts at the end of the export?"""
    c = connect(ref_client, shared_server)
    answer = ask(c, shared_export, Cmd.READ, shared_export.size, SECTOR)
    record(verdict, answer, "ERR-003", "BSZ-034")
    _past_end(verdict, answer, ("NBD_EINVAL",), ("ERR-003", "BSZ-034"))
    after(ref_client, shared_server, shared_export, answer)


@pytest.mark.req("ERR-003", "BSZ-034")
def test_read_across_end(server_peer, shared_server, shared_export, ref_client, verdict):
    """What does a server answer to an NBD_CMD_READ whose last sector lies past the end?"""
    c = connect(ref_client, shared_server)
    answer = ask(c, shared_export, Cmd.READ, shared_export.size - SECTOR, 2 * SECTOR)
    record(verdict, answer, "ERR-003", "BSZ-034")
    _past_end(verdict, answer, ("NBD_EINVAL",), ("ERR-003", "BSZ-034"))
    after(ref_client, shared_server, shared_export, answer)


@pytest.mark.req("ERR-001", "BSZ-034")
def test_write_past_end(server_peer, writable_server, writable_export, ref_client, verdict):
    """Which error does a server give an NBD_CMD_WRITE that starts at the end: NBD_ENOSPC or NBD_EINVAL?"""
    c = connect(ref_client, writable_server)
    answer = ask(c, writable_export, Cmd.WRITE, writable_export.size, SECTOR, payload=bytes(SECTOR))
    record(verdict, answer, "ERR-001", "BSZ-034")
    _write_past_end(verdict, answer, "ERR-001")
    after(ref_client, writable_server, writable_export, answer)


@pytest.mark.req("WZ-030", "BSZ-034")
def test_write_zeroes_past_end(server_peer, writable_server, writable_export, ref_client, verdict):
    """Which error does a server give an NBD_CMD_WRITE_ZEROES that starts at the end?"""
    c = connect(ref_client, writable_server)
    prefix = advertised(c, TxFlag.SEND_WRITE_ZEROES)
    answer = prefix + ask(c, writable_export, Cmd.WRITE_ZEROES, writable_export.size, SECTOR)
    record(verdict, answer, "WZ-030", "BSZ-034")
    if not prefix:
        _write_past_end(verdict, answer, "WZ-030")
    after(ref_client, writable_server, writable_export, answer)


@pytest.mark.req("ERR-003", "BSZ-034")
def test_trim_past_end(server_peer, writable_server, writable_export, ref_client, verdict):
    """What does a server answer to an NBD_CMD_TRIM that starts at the end of the export?"""
    c = connect(ref_client, writable_server)
    prefix = advertised(c, TxFlag.SEND_TRIM)
    answer = prefix + ask(c, writable_export, Cmd.TRIM, writable_export.size, SECTOR)
    record(verdict, answer, "ERR-003", "BSZ-034")
    if not prefix:
        _past_end(verdict, answer, ("NBD_EINVAL",), ("ERR-003", "BSZ-034"))
    after(ref_client, writable_server, writable_export, answer)


@pytest.mark.req("BSZ-034")
def test_cache_past_end(server_peer, shared_server, shared_export, ref_client, verdict):
    """What does a server answer to an NBD_CMD_CACHE that starts at the end of the export?"""
    c = connect(ref_client, shared_server)
    prefix = advertised(c, TxFlag.SEND_CACHE)
    answer = prefix + ask(c, shared_export, Cmd.CACHE, shared_export.size, SECTOR)
    record(verdict, answer, "BSZ-034")
    if not prefix:
        _past_end(verdict, answer, ("NBD_EINVAL",), ("BSZ-034",))
    after(ref_client, shared_server, shared_export, answer)


@pytest.mark.req("BS-085", "BSZ-034")
def test_block_status_past_end(server_peer, shared_server, shared_export, ref_client, verdict):
    """What does a server answer to an NBD_CMD_BLOCK_STATUS that starts at the end of the export?"""
    c = connect(ref_client, shared_server, contexts=(BASE,))
    prefix = "" if c.can_meta_context(BASE) else "no context: "
    answer = prefix + ask(c, shared_export, Cmd.BLOCK_STATUS, shared_export.size, SECTOR)
    record(verdict, answer, "BS-085", "BSZ-034")
    if not prefix:
        _past_end(verdict, answer, ("NBD_EINVAL",), ("BS-085", "BSZ-034"))
    after(ref_client, shared_server, shared_export, answer)


# "very large": 4 GiB - 512 from offset 0, far past the 16 MiB export, but a length a client may well
# send to mean "as far as you can tell me" (BS-072: "The server MAY describe less than the range").
@pytest.mark.req("BS-085", "BSZ-034")
def test_block_status_huge_length(server_peer, shared_server, shared_export, ref_client, verdict):
    """What does a server answer to an NBD_CMD_BLOCK_STATUS of length 2^32 - 512 from offset 0?"""
    c = connect(ref_client, shared_server, contexts=(BASE,))
    prefix = "" if c.can_meta_context(BASE) else "no context: "
    answer = prefix + ask(c, shared_export, Cmd.BLOCK_STATUS, 0, (1 << 32) - SECTOR)
    record(verdict, answer, "BS-085", "BSZ-034")
    if not prefix:
        _past_end(verdict, answer, ("NBD_EINVAL",), ("BS-085", "BSZ-034"))
    after(ref_client, shared_server, shared_export, answer)


# --------------------------------------------------------------------------------------------------
# Writes to a read-only export: "If NBD_FLAG_READ_ONLY is set the server MUST fail subsequent write
# operations" (WR-001); the error "SHOULD" be NBD_EPERM (ERR-005; WRITE_ZEROES: WZ-031).  Each on a
# read-only export of its own (a server that mishandles this may write, or crash: nbdkit in oldstyle
# mode aborts on an assertion), never on the shared one other tests read.


def read_only_server(fresh_export):
    return fresh_export(name="exp", size=RO_SIZE, content="pattern", read_only=True)


def _read_only(verdict, c, answer: str, eperm_id: str) -> None:
    """The write must fail (WR-001); with NBD_EPERM when the command was advertised -- a command the
    export does not advertise broke the client's MUST (CMD-008), so any error will do then."""
    advertised_command = not answer.startswith("not advertised: ")
    got = head(answer.removeprefix("not advertised: "))
    if got == HARD:
        return
    if verdict.expect(not got.startswith("ok"), "WR-001", expected="the write fails", observed=answer) \
            and advertised_command:
        verdict.expect(got == "NBD_EPERM", eperm_id, expected="NBD_EPERM", observed=answer)


@pytest.mark.req("WR-001", "ERR-005")
def test_write_read_only(server_peer, fresh_export, ref_client, verdict):
    """Which error does a server give an NBD_CMD_WRITE to a read-only export: NBD_EPERM or another?"""
    server = read_only_server(fresh_export)
    c = connect(ref_client, server)
    answer = ask(c, server.export, Cmd.WRITE, 0, SECTOR, payload=expected_bytes(server.export, 0, SECTOR))
    record(verdict, answer, "WR-001", "ERR-005")
    _read_only(verdict, c, answer, "ERR-005")
    after(ref_client, server, server.export, answer)


@pytest.mark.req("WR-001", "ERR-005")
def test_trim_read_only(server_peer, fresh_export, ref_client, verdict):
    """Which error does a server give an NBD_CMD_TRIM on a read-only export?"""
    server = read_only_server(fresh_export)
    c = connect(ref_client, server)
    prefix = advertised(c, TxFlag.SEND_TRIM)
    answer = prefix + ask(c, server.export, Cmd.TRIM, RO_SIZE - SECTOR, SECTOR)
    record(verdict, answer, "WR-001", "ERR-005")
    _read_only(verdict, c, answer, "ERR-005")
    after(ref_client, server, server.export, answer)


@pytest.mark.req("WR-001", "WZ-031")
def test_write_zeroes_read_only(server_peer, fresh_export, ref_client, verdict):
    """Which error does a server give an NBD_CMD_WRITE_ZEROES on a read-only export?"""
    server = read_only_server(fresh_export)
    c = connect(ref_client, server)
    prefix = advertised(c, TxFlag.SEND_WRITE_ZEROES)
    answer = prefix + ask(c, server.export, Cmd.WRITE_ZEROES, RO_SIZE - SECTOR, SECTOR)
    record(verdict, answer, "WR-001", "WZ-031")
    _read_only(verdict, c, answer, "WZ-031")
    after(ref_client, server, server.export, answer)


# --------------------------------------------------------------------------------------------------
# Alignment: "if a read or write request is not aligned to advertised minimum block sizes" the server
# SHOULD answer NBD_EINVAL (ERR-004); without advertised constraints a server "SHOULD support" a minimum
# block size of 1 (BSZ-007), so an unaligned request then must work.


def _unaligned(verdict, c, answer: str) -> str:
    minimum = c.get_block_size("minimum")
    got = head(answer)
    if minimum > 1:
        if got != HARD:
            verdict.expect(got == "NBD_EINVAL", "ERR-004", expected=f"NBD_EINVAL (minimum block {minimum})",
                           observed=answer)
        return f"minimum {minimum}: "
    if not minimum:
        verdict.expect(got.startswith("ok"), "BSZ-007", expected="served (no constraints advertised)",
                       observed=answer)
    return "minimum 1: " if minimum else "no block size: "


@pytest.mark.req("ERR-004", "BSZ-007")
def test_unaligned_read(server_peer, shared_server, shared_export, ref_client, verdict):
    """What does a server answer to an NBD_CMD_READ of 511 bytes at offset 1?"""
    c = connect(ref_client, shared_server)
    buf_answer = ask(c, shared_export, Cmd.READ, 1, SECTOR - 1)
    answer = _unaligned(verdict, c, buf_answer) + buf_answer
    if head(buf_answer).startswith("ok"):
        assert c.pread(SECTOR - 1, 1) == expected_bytes(shared_export, 1, SECTOR - 1), "unaligned read: wrong data"
    record(verdict, answer, "ERR-004", "BSZ-007")
    after(ref_client, shared_server, shared_export, answer)


@pytest.mark.req("ERR-004", "BSZ-007")
def test_unaligned_write(server_peer, writable_server, writable_export, region, ref_client, verdict):
    """What does a server answer to an NBD_CMD_WRITE of 511 bytes at an odd offset?"""
    c = connect(ref_client, writable_server)
    offset = region() + 1
    data = bytes(range(256)) * 2
    raw = ask(c, writable_export, Cmd.WRITE, offset, SECTOR - 1, payload=data[:SECTOR - 1])
    answer = _unaligned(verdict, c, raw) + raw
    if head(raw).startswith("ok"):
        assert c.pread(SECTOR - 1, offset) == data[:SECTOR - 1], "unaligned write does not read back"
    record(verdict, answer, "ERR-004", "BSZ-007")
    after(ref_client, writable_server, writable_export, answer)


# --------------------------------------------------------------------------------------------------
# Reserved fields and odd requests


# NBD_CMD_FLUSH: "offset and length are reserved and MUST be zero" for the client (FLUSH-004); what the
# server does with non-zero ones is not said.
@pytest.mark.req("FLUSH-004")
def test_flush_with_offset_length(server_peer, writable_server, writable_export, ref_client, verdict):
    """What does a server answer to an NBD_CMD_FLUSH with a non-zero offset and length?"""
    c = connect(ref_client, writable_server)
    prefix = advertised(c, TxFlag.SEND_FLUSH)
    answer = prefix + ask(c, writable_export, Cmd.FLUSH, 4096, 4096)
    record(verdict, answer, "FLUSH-004")
    after(ref_client, writable_server, writable_export, answer)

