"""Metadata contexts and NBD_CMD_BLOCK_STATUS: base:allocation, with and without REQ_ONE."""

from __future__ import annotations

import pytest
from nbdref._constants import MAX_EXTENTS_PER_CHUNK, Err
from nbdref._strict import Strictness
from nbdref.client import Client, ClientError, CmdFlag, Strict

from fixtures.exports import ExportRequest, expected_bytes
from suites.server._common import BASE, HOLE, REGION, ZERO, collect_extents, held

SECTION = "Metadata querying: NBD_CMD_BLOCK_STATUS"


# "A successful NBD_CMD_BLOCK_STATUS must be answered with one NBD_REPLY_TYPE_BLOCK_STATUS chunk per
# selected context" (BS-002); "With NBD_CMD_FLAG_REQ_ONE the server must not describe more than one
# extent" (BS-054) that "must not exceed the request length" (BS-069); the core checks these.
@pytest.mark.req("BS-002", "BS-054", "BS-058", "BS-069", "BS-023")
@pytest.mark.feature("NBD_CMD_BLOCK_STATUS")
@pytest.mark.parametrize("headers", ["compact", "extended"])
def test_block_status_base_allocation(server_peer, writable_server, writable_export, region, ref_client,
                                      verdict, headers):
    """base:allocation over the whole export, then REQ_ONE on data just written."""
    def setup(c):
        c.set_request_extended_headers(headers == "extended")
        c.add_meta_context(BASE)

    c = ref_client(writable_server, setup=setup)
    if headers == "extended" and not c.get_extended_headers_negotiated():
        verdict.timeline("NBD_OPT_EXTENDED_HEADERS", False, export=writable_export)
        return
    selected = c.can_meta_context(BASE)
    verdict.timeline("NBD_CMD_BLOCK_STATUS", selected, export=writable_export)
    if not selected:
        return
    # A data region we just wrote is not a hole.
    offset = region(REGION)
    c.pwrite(b"\xa5" * REGION, offset)
    whole = collect_extents(c, writable_export.size, 0)[BASE]
    verdict.info(f"{len(whole)} extent(s) over the export")
    assert sum(length for length, _ in whole) <= writable_export.size
    assert all(length > 0 for length, _ in whole)
    one = collect_extents(c, REGION, offset, CmdFlag.REQ_ONE)[BASE]
    verdict.expect(len(one) == 1 and 0 < one[0][0] <= REGION, "BS-054", "BS-069",
                   expected=f"one extent of at most {REGION} bytes", observed=f"REQ_ONE answered with {one}")
    # "The server MAY report a hole even where no TRIM was sent" (BS-019): recorded, not judged.
    verdict.info(f"data just written at {offset}: status {one[0][1] if one else None}")


# A sparse export, the same on every server: holes with data at a few places, and a long hole up to a
# last data block at the very end, 8 GiB in all (a sparse file: nothing of the holes is on disk).  Large
# enough that a 32-bit request cannot cover it, and that with extended headers one extent may be longer
# than 2^32 (the draft's 64-bit lengths).
GiB = 1 << 30
SPARSE_DATA = ((64 * 1024, 64 * 1024), (192 * 1024, 4096), (1 << 20, 512 * 1024), (8 * GiB - 65536, 65536))
SPARSE = ExportRequest(name="exp", size=8 * GiB, content="zero", read_only=True,
                       writes=tuple((at, b"\x5a" * n) for at, n in SPARSE_DATA))
HEAD = 2 << 20                          # the fragmented start: [0, 2 MiB)
U32_MAX = 0xFFFFFFFF


@pytest.fixture
def sparse_server(request, server_peer):
    """The run's read-only sparse export of the server peer (one per peer and run)."""
    from fixtures.plugin import shared_peer_server
    return shared_peer_server(request, server_peer, SPARSE, "sparse")


def status_client(ref_client, server, headers: str, strictness: Strictness | None = None,
                  strict: Strict | None = None) -> Client:
    def setup(c: Client) -> None:
        c.set_request_extended_headers(headers == "extended")
        c.add_meta_context(BASE)
        if strict is not None:
            c.set_strict_mode(strict)
    return ref_client(server, setup=setup, strictness=strictness)


def negotiated(c: Client, verdict, export, headers: str) -> bool:
    """base:allocation selected (and extended headers, when asked for); else the timeline's verdict."""
    if headers == "extended" and not c.get_extended_headers_negotiated():
        verdict.timeline("NBD_OPT_EXTENDED_HEADERS", False, export=export)
        return False
    selected = c.can_meta_context(BASE)
    verdict.timeline("NBD_CMD_BLOCK_STATUS", selected, export=export)
    return selected


def chunks(c: Client, count: int, offset: int, flags: int = 0) -> list[list[tuple[int, int]]]:
    """The status chunks of one BLOCK_STATUS, each a list of (length, flags)."""
    seen: list[list[tuple[int, int]]] = []

    def callback(_name: str, _offset: int, entries: list[int], _err: int) -> None:
        seen.append(list(zip(entries[0::2], entries[1::2], strict=True)))

    c.block_status(count, offset, callback, flags)
    return seen


def walk(c: Client, offset: int, length: int) -> list[tuple[int, int, int]]:
    """(offset, length, flags) of every extent over [offset, offset + length): a server "may describe
    less than the requested range" (BS-072), so ask again from the first byte not described."""
    out: list[tuple[int, int, int]] = []
    pos, end = offset, offset + length
    while pos < end:
        got = chunks(c, end - pos, pos)
        assert len(got) == 1, f"{len(got)} chunks for one context"
        for n, f in got[0]:
            out.append((pos, n, f))
            pos += n
    return out


# Without REQ_ONE over the fragmented start of the sparse export: every chunk has at least one
# descriptor (BS-074; a descriptor count that is nonzero, EXT-047) and at most 2^20 (BS-062 / BS-073);
# the core checks lengths (BS-055 / EXT-044, BS-057 / EXT-048, BS-060), the chunk type per header kind
# (EXT-045 / EXT-049), one chunk per context (BS-002 / BS-056 / EXT-053), reserved bits (BS-023 / EXT-050).
# SHOULDs judged here: consecutive descriptors differ (BS-075), lengths are multiples of 512 (BS-077) and of
# the advertised minimum block size (BS-078), and a sparse export's holes show NBD_STATE_HOLE or
# NBD_STATE_ZERO (BS-080).  With REQ_ONE, at each hole and data run: one descriptor (BS-054 / BS-058) no
# longer than the request (BS-059 / BS-069).
@pytest.mark.req("BS-002", "BS-005", "BS-011", "BS-023", "BS-054", "BS-055", "BS-056", "BS-057", "BS-058",
                 "BS-059", "BS-060", "BS-062", "BS-067", "BS-069", "BS-073", "BS-074", "BS-075", "BS-077",
                 "BS-078", "BS-080", "EXT-053")
@pytest.mark.feature("NBD_CMD_BLOCK_STATUS")
@pytest.mark.parametrize("headers", [pytest.param("compact", marks=pytest.mark.req("EXT-045")),
                                     pytest.param("extended", marks=pytest.mark.req("EXT-049"))])
def test_extents_of_a_sparse_export(server_peer, sparse_server, ref_client, verdict, headers):
    """The fragmented start of a sparse export, with and without REQ_ONE."""
    c = status_client(ref_client, sparse_server, headers)
    if not negotiated(c, verdict, SPARSE, headers):
        return
    minimum = c.get_block_size("minimum") or 1
    extents = walk(c, 0, HEAD)
    verdict.info(f"{len(extents)} extent(s) over the first {HEAD} bytes: "
                 + ", ".join(f"{o}+{n}:{f}" for o, n, f in extents[:12]))
    for got in (chunks(c, HEAD, 0), chunks(c, HEAD, 64 * 1024)):
        verdict.expect(len(got) == 1 and 0 < len(got[0]) <= MAX_EXTENTS_PER_CHUNK, "BS-074", "BS-073", "BS-067",
                       "EXT-053", expected="one chunk of 1 to 2^20 descriptors",
                       observed=f"{[len(x) for x in got]} descriptors")
        flat = [x for chunk in got for x in chunk]
        verdict.expect(all(n > 0 for n, _ in flat), "BS-057", expected="nonzero extent lengths", observed=str(flat[:8]))
        # "All information a context provides must be representable in the 32-bit status flags" (BS-011)
        verdict.expect(all(0 <= f <= U32_MAX for _, f in flat), "BS-011", expected="32-bit status values",
                       observed=str([f for _, f in flat][:8]))
        same = [i for i in range(1, len(got[0])) if got[0][i][1] == got[0][i - 1][1]]
        verdict.expect(not same, "BS-075", expected="consecutive descriptors with different status",
                       observed=f"descriptors {same} repeat the status before them: {got[0][:8]}")
    odd = [(o, n) for o, n, _ in extents if n % 512 or o % 512]
    verdict.expect(not odd, "BS-077", expected="extents in multiples of 512", observed=f"{odd[:4]}")
    unaligned = [(o, n) for o, n, _ in extents if n % minimum or o % minimum]
    verdict.expect(not unaligned, "BS-078", expected=f"extents in multiples of the minimum block size {minimum}",
                   observed=f"{unaligned[:4]}")
    first = extents[0]
    verdict.expect(first[2] & (HOLE | ZERO) != 0, "BS-080", expected="the hole at 0 shows HOLE or ZERO",
                   observed=f"{first}")
    written = [f for o, n, f in extents if o < SPARSE_DATA[0][0] + SPARSE_DATA[0][1] and o + n > SPARSE_DATA[0][0]]
    verdict.info(f"status over the data at {SPARSE_DATA[0][0]}: {written}")
    # "BLOCK_STATUS_EXT MUST NOT be used unless extended headers were negotiated" (EXT-045): the core
    # records a breach on any such chunk of a compact connection.
    rid = "EXT-049" if headers == "extended" else "EXT-045"
    verdict.expect(held(c, rid), rid, expected="the chunk type of the negotiated header kind",
                   observed=", ".join(str(v) for v in c.violations) or "as negotiated")
    # REQ_ONE at a hole, at each data run and across a data/hole boundary
    for at in (0, 64 * 1024, 192 * 1024, 1 << 20, (1 << 20) + 256 * 1024):
        for length in (4096, 256 * 1024):
            got = chunks(c, length, at, CmdFlag.REQ_ONE)
            verdict.expect(len(got) == 1 and len(got[0]) == 1 and 0 < got[0][0][0] <= length, "BS-054", "BS-058",
                           "BS-059", "BS-069", expected=f"one descriptor of at most {length} bytes",
                           observed=f"REQ_ONE {length} at {at}: {got}")


# Huge lengths: with compact headers the largest 32-bit request (4 GiB - 512 of the hole after the data
# start); with extended headers the whole 8 GiB in one 64-bit request, answered with
# NBD_REPLY_TYPE_BLOCK_STATUS_EXT (EXT-049, the core checks its length EXT-044, count EXT-046, nonzero
# lengths EXT-048 and the upper status bits EXT-050); its count is nonzero (EXT-047).  The descriptors
# must still add up: all but the last stay below the request (BS-060), and the hole's extent may be
# longer than 2^32 there (recorded).  The tail of the export, data, is not a hole.
@pytest.mark.req("BS-060", "BS-074")
@pytest.mark.feature("NBD_CMD_BLOCK_STATUS")
@pytest.mark.parametrize("headers", [
    pytest.param("compact", marks=pytest.mark.req("BS-057")),
    pytest.param("extended", marks=pytest.mark.req("EXT-044", "EXT-046", "EXT-047", "EXT-048", "EXT-049", "EXT-050"))])
def test_huge_lengths(server_peer, sparse_server, ref_client, verdict, headers):
    """BLOCK_STATUS over 4 GiB (compact) and over the whole 8 GiB export (extended)."""
    c = status_client(ref_client, sparse_server, headers)
    if not negotiated(c, verdict, SPARSE, headers):
        return
    length = SPARSE.size if headers == "extended" else U32_MAX & ~511
    got = chunks(c, length, 0)
    extended = headers == "extended"
    verdict.expect(len(got) == 1 and len(got[0]) > 0, "BS-074", *(("EXT-047",) if extended else ()),
                   expected="one chunk, descriptors in it", observed=f"{[len(x) for x in got]}")
    verdict.expect(all(n > 0 for n, _ in got[0]), "EXT-048" if extended else "BS-057",
                   expected="nonzero extent lengths", observed=str(got[0][:8]))
    if extended:
        verdict.expect(held(c, "EXT-049"), "EXT-049", expected="NBD_REPLY_TYPE_BLOCK_STATUS_EXT chunks",
                       observed=", ".join(str(v) for v in c.violations) or "BLOCK_STATUS_EXT")
    longest = max(n for n, _ in got[0])
    verdict.info(f"BLOCK_STATUS {length} at 0: {len(got[0])} descriptor(s), the longest {longest} bytes"
                 + (" (over 2^32: 64-bit lengths)" if longest > U32_MAX else ""))
    tail = chunks(c, 65536, SPARSE.size - 65536, CmdFlag.REQ_ONE)
    verdict.info(f"status of the last 64 KiB (data): {tail}")


# Past the end: "BLOCK_STATUS reaching past the end of the export SHOULD fail with NBD_EINVAL" (BS-085;
# with extended headers the effect length, EXT-057) in an error chunk (BS-081); a request starting at the
# end, one straddling it, and (extended) a 2^40 length.  The connection must stay usable.
@pytest.mark.req("BS-085", "BS-081")
@pytest.mark.feature("NBD_CMD_BLOCK_STATUS")
@pytest.mark.parametrize("headers", ["compact", pytest.param("extended", marks=pytest.mark.req("EXT-057"))])
def test_block_status_past_the_end(server_peer, shared_server, shared_export, ref_client, verdict, headers):
    """Requests past the end fail with NBD_EINVAL in an error chunk; the next command still works."""
    c = status_client(ref_client, shared_server, headers, strictness=Strictness(disabled={"BSZ-033"}))
    if not negotiated(c, verdict, shared_export, headers):
        return
    size = shared_export.size
    cases = [(size, 4096), (size - 4096, 8192)] + ([(0, 1 << 40)] if headers == "extended" else [])
    rid = "EXT-057" if headers == "extended" else "BS-085"
    for offset, length in cases:
        before = len(c.transcript)
        try:
            chunks(c, length, offset)
            outcome = "success"
        except ClientError as e:
            outcome = "EINVAL" if e.errno == Err.EINVAL else str(e)
        verdict.expect(outcome == "EINVAL", *dict.fromkeys((rid, "BS-085")), expected="NBD_EINVAL",
                       observed=f"BLOCK_STATUS {length} at {offset} (size {size}): {outcome}")
        if outcome != "success":
            kinds = [type(e.event).__name__ for e in list(c.transcript)[before:] if e.direction == "S"]
            verdict.expect("ErrorChunk" in kinds, "BS-081", expected="an error chunk", observed=str(kinds))
        assert c.pread(512, 0) == expected_bytes(shared_export, 0, 512)


# "The server SHOULD NOT disconnect on a zero-length BLOCK_STATUS" (BS-065): any answer is allowed (a
# success with descriptors, or an error), recorded; the connection must go on.
@pytest.mark.req("BS-065")
@pytest.mark.feature("NBD_CMD_BLOCK_STATUS")
@pytest.mark.parametrize("headers", ["compact", "extended"])
def test_zero_length_block_status(server_peer, shared_server, shared_export, ref_client, verdict, headers):
    """A zero-length BLOCK_STATUS gets an answer, not a disconnect."""
    c = status_client(ref_client, shared_server, headers, strict=Strict.ALL & ~Strict.ZERO_SIZE)
    if not negotiated(c, verdict, shared_export, headers):
        return
    for offset in (0, shared_export.size - 4096):
        try:
            outcome = f"success {chunks(c, 0, offset)}"
        except ClientError as e:
            outcome = str(e)
        verdict.info(f"zero-length BLOCK_STATUS at {offset}: {outcome}")
        alive = "closed" not in outcome
        verdict.expect(alive, "BS-065", expected="an answer, the connection open", observed=outcome)
        if not alive:
            return
        assert c.pread(512, 0) == expected_bytes(shared_export, 0, 512)
