"""Structured replies: simple vs structured, NBD_CMD_FLAG_DF, and many requests in flight."""

from __future__ import annotations

import contextlib
import itertools

import pytest
from nbdref._strict import Strictness
from nbdref.client import ClientError, CmdFlag

from fixtures.exports import expected_bytes
from suites.server._common import REGION, server_chunks

SECTION = "Structured replies"


# "If structured replies were not negotiated, every request must be answered with a simple reply"
# (SR-002) and "NBD_CMD_READ must never get a simple reply" once they are (SR-006): the core checks.
# Without negotiation: "the server must send only simple replies" (SR-001), never a chunk (SR-004), and
# "should not advertise extensions needing reply payloads" (SR-019: NBD_FLAG_SEND_DF clear).  With it:
# "any reply carrying a payload must be a structured reply" (SR-005), reads get structured replies
# (SR-017), whose chunks the core checks: DONE last (SR-011, SR-022, SR-023), OFFSET_DATA at least 9
# bytes (SR-031), inside the request (SR-032), not overlapping (SR-033), within the maximum payload
# (SR-028); and "the server should keep the number of chunks per reply small" (SR-012).
@pytest.mark.feature("NBD_OPT_STRUCTURED_REPLY")
@pytest.mark.parametrize("structured", [
    pytest.param(False, id="simple", marks=pytest.mark.req("SR-001", "SR-002", "SR-004", "SR-019", "RD-002",
                                                            "RD-007")),
    pytest.param(True, id="structured", marks=pytest.mark.req(
        "SR-005", "SR-006", "SR-011", "SR-012", "SR-017", "SR-022", "SR-023", "SR-028", "SR-031", "SR-032",
        "SR-033", "RD-007"))])
def test_reply_kinds(server_peer, shared_server, shared_export, ref_client, verdict, structured):
    """Reads are answered with simple replies, or with structured ones once negotiated."""
    def setup(c):
        c.set_request_extended_headers(False)
        c.set_request_structured_replies(structured)

    c = ref_client(shared_server, setup=setup)
    negotiated = c.get_structured_replies_negotiated()
    if structured:
        verdict.timeline("NBD_OPT_STRUCTURED_REPLY", negotiated, export=shared_export)
    else:
        assert not negotiated, "structured replies on though the client did not ask"
    offset = shared_export.size - 3 * REGION
    assert c.pread(3 * REGION, offset) == expected_bytes(shared_export, offset, 3 * REGION)
    kinds = [type(e).__name__ for e in server_chunks(c)]
    if not negotiated:
        verdict.expect(set(kinds) == {"SimpleReply"}, "SR-001", "SR-004", "RD-007", expected="only simple replies",
                       observed=str(sorted(set(kinds))))
        # "NBD_FLAG_SEND_DF ... MUST be clear if structured replies were not negotiated" (RD-002)
        verdict.expect(not c.can_df(), "RD-002", "SR-019", expected="NBD_FLAG_SEND_DF clear without structured "
                       "replies", observed="NBD_FLAG_SEND_DF set")
        return
    verdict.expect("SimpleReply" not in kinds, "SR-005", "SR-017", "RD-007", expected="the READ answered in chunks",
                   observed=str(kinds))
    chunks = server_chunks(c)
    verdict.expect(bool(chunks) and chunks[-1].done and not any(e.done for e in chunks[:-1]), "SR-011", "SR-022",
                   "SR-023", expected="DONE on the last chunk only", observed=str([(k, e.done) for k, e in
                                                                                 zip(kinds, chunks, strict=True)]))
    # "No variable-length part of a chunk may exceed the advertised maximum payload" (SR-028); without
    # NBD_INFO_BLOCK_SIZE the default maximum is 32 MiB
    limit = c.get_block_size("maximum") or 32 << 20
    longest = max((getattr(e, "length", 0) for e in chunks), default=0)
    verdict.expect(longest <= limit, "SR-028", expected=f"chunks of at most {limit} bytes", observed=f"{longest}")
    # advisory: a 192 KiB read in more than one chunk per 4 KiB is not "small"
    verdict.expect(len(kinds) <= 3 * REGION // 4096, "SR-012", expected="few chunks for one READ",
                   observed=f"{len(kinds)} chunks")


# NBD_CMD_FLAG_DF: "the server MUST send at most one content chunk" and "MUST support unfragmented reads
# in which the client's request length does not exceed 65,536 bytes" (RD-050); with structured replies
# it "MUST NOT use a simple reply for NBD_CMD_READ (even for the case of an early NBD_EINVAL due to bad
# flags)" (SR-006).  A lenient client records what the peer does; the core names the ids.
@pytest.mark.req("RD-001", "RD-050", "SR-006")
@pytest.mark.feature("NBD_CMD_FLAG_DF")
def test_read_df(server_peer, shared_server, shared_export, ref_client, verdict):
    """An advertised NBD_CMD_FLAG_DF read of 64 KiB succeeds in one chunk."""
    c = ref_client(shared_server, strictness=Strictness.lenient())
    verdict.timeline("NBD_CMD_FLAG_DF", c.can_df(), export=shared_export)
    if not c.can_df():
        return
    offset = 7 * REGION
    try:
        data = c.pread(REGION, offset, CmdFlag.DF)
    except ClientError as e:
        verdict.fail("RD-050", "RD-001", expected=f"a {REGION}-byte DF read succeeds", observed=f"failed: {e}")
        return
    verdict.expect(data == expected_bytes(shared_export, offset, REGION), "RD-050", "RD-001",
                   expected=f"the advertised DF flag works: {REGION} bytes in one chunk", observed="other bytes")


# Several requests in flight, answered in any order and matched by cookie: "A structured reply may span
# several chunks sharing one cookie" (SR-009); the core pairs every reply with its request.
@pytest.mark.req("RD-007")
@pytest.mark.feature("NBD_OPT_STRUCTURED_REPLY")
def test_requests_in_flight(server_peer, shared_server, shared_export, ref_client, verdict):
    """Eight reads in flight at once all come back right."""
    c = ref_client(shared_server)
    buffers = [bytearray(REGION) for _ in range(8)]
    offsets = [shared_export.size - (i + 1) * REGION for i in range(8)]
    cookies = [c.aio_pread(buf, off) for buf, off in zip(buffers, offsets, strict=True)]
    for cookie in cookies:
        c.wait(cookie)
    right = [bytes(buf) == expected_bytes(shared_export, off, REGION) for buf, off in zip(buffers, offsets, strict=True)]
    kinds = {type(e).__name__ for e in server_chunks(c)}
    structured = c.get_structured_replies_negotiated()
    verdict.expect(all(right) and (("SimpleReply" not in kinds) if structured else kinds == {"SimpleReply"}),
                   "RD-007", expected="eight reads right, in the negotiated reply style",
                   observed=f"{sum(right)} of 8 right; replies {sorted(kinds)}")




def _structured(c) -> None:
    c.set_request_extended_headers(False)
    c.set_request_structured_replies(True)


# A read over data, zeroes (a hole where the server punches one) and data again: holes may come as
# NBD_REPLY_TYPE_OFFSET_HOLE, which the core checks — length exactly 12 (SR-035), inside the request
# (SR-036), not overlapping (SR-037), nonzero (SR-039) — and the chunks together must cover exactly the
# request: every byte once (SR-032, SR-033), DONE on the last (SR-011, SR-022, SR-023).
@pytest.mark.req("SR-011", "SR-022", "SR-023", "SR-032", "SR-033", "SR-035", "SR-036", "SR-037", "SR-039")
@pytest.mark.feature("NBD_OPT_STRUCTURED_REPLY")
def test_sparse_read_chunks(server_peer, writable_server, writable_export, region, ref_client, verdict):
    """A read over data and a zeroed hole is covered exactly once by its chunks."""
    base = region(4 * REGION)
    c = ref_client(writable_server, setup=_structured)
    verdict.timeline("NBD_OPT_STRUCTURED_REPLY", c.get_structured_replies_negotiated(), export=writable_export)
    if not c.get_structured_replies_negotiated():
        return
    data = bytes(range(256)) * (REGION // 256)
    c.pwrite(data, base)
    if c.can_zero():
        c.zero(2 * REGION, base + REGION)
    else:
        c.pwrite(bytes(2 * REGION), base + REGION)
    c.pwrite(data, base + 3 * REGION)
    cookie = c.aio_pread(buf := bytearray(4 * REGION), base)
    c.wait(cookie)
    assert bytes(buf) == data + bytes(2 * REGION) + data, "the read does not match what was written"
    chunks = [e for e in server_chunks(c, cookie)]
    spans = sorted((e.offset, e.length if e.length >= 0 else 0) for e in chunks
                   if type(e).__name__ in ("OffsetData", "OffsetHole"))
    covered = sum(n for _, n in spans)
    overlap = any(a[0] + a[1] > b[0] for a, b in itertools.pairwise(spans))
    verdict.expect(covered == 4 * REGION and not overlap and spans[0][0] == base, "SR-032", "SR-033",
                   expected=f"chunks covering [{base}, +{4 * REGION}) exactly once", observed=str(spans))
    verdict.expect(bool(chunks) and chunks[-1].done and not any(e.done for e in chunks[:-1]), "SR-011",
                   "SR-022", "SR-023", expected="DONE on the last chunk only",
                   observed=str([(type(e).__name__, e.done) for e in chunks]))
    holes = [e for e in chunks if type(e).__name__ == "OffsetHole"]
    verdict.info(f"{len(chunks)} chunks, {len(holes)} of them holes")
    if holes:
        verdict.expect(all(e.length > 0 for e in holes), "SR-039", "SR-035", "SR-036", "SR-037",
                       expected="holes of nonzero size inside the request", observed=str([(e.offset, e.length)
                                                                                           for e in holes]))


# Errors with structured replies: a READ past the end is answered with an error chunk, never a simple
# reply "not even for an early NBD_EINVAL" (SR-006); the server "should prefer structured replies for
# errors" (SR-008); NBD_REPLY_TYPE_ERROR is at least 6 bytes (SR-040), its message within 4096 bytes
# (SR-043), its error nonzero (SR-044), at most one per reply (SR-042) — the core checks each.
@pytest.mark.req("SR-006", "SR-008", "SR-040", "SR-042", "SR-043", "SR-044", "SR-011", "SR-023")
@pytest.mark.feature("NBD_OPT_STRUCTURED_REPLY")
def test_error_chunk(server_peer, shared_server, shared_export, ref_client, verdict):
    """A READ past the end gets a well-formed error chunk."""
    c = ref_client(shared_server, setup=_structured, strictness=Strictness(check_local=False),
                   allow=("RD-004",))
    verdict.timeline("NBD_OPT_STRUCTURED_REPLY", c.get_structured_replies_negotiated(), export=shared_export)
    if not c.get_structured_replies_negotiated():
        return
    cookie = c.aio_pread(bytearray(4096), shared_export.size)       # "past the end": a client breach
    try:
        c.wait(cookie)
        failed = None
    except ClientError as e:
        failed = e
    replies = server_chunks(c, cookie)
    kinds = [type(e).__name__ for e in replies]
    if failed is None:
        verdict.info(f"a READ past the end succeeded?! {kinds}")
        verdict.fail("SR-008", expected="an error for a READ past the end", observed=f"success: {kinds}")
        return
    errors = [e for e in replies if type(e).__name__ == "ErrorChunk"]
    verdict.expect("SimpleReply" not in kinds, "SR-006", expected="an error chunk, not a simple reply",
                   observed=str(kinds))
    verdict.expect(bool(errors), "SR-008", expected="NBD_REPLY_TYPE_ERROR", observed=str(kinds))
    verdict.expect(bool(replies) and replies[-1].done, "SR-023", "SR-011", expected="the error reply ends with DONE",
                   observed=str([(k, getattr(e, "done", None)) for k, e in zip(kinds, replies, strict=True)]))
    verdict.expect(all(e.error != 0 for e in errors) and len(errors) <= 1, "SR-044", "SR-042",
                   expected="one error chunk with a nonzero error",
                   observed=str([(e.error, e.message) for e in errors]))
    verdict.info(f"READ past the end: {failed}; chunks {kinds}")


# A zero-length READ (the client "SHOULD NOT" send one; the server "SHOULD NOT disconnect"): a server
# that answers with NBD_REPLY_TYPE_NONE must give it length 0 (SR-029) and NBD_REPLY_FLAG_DONE (SR-024,
# SR-030).  Other answers the spec allows (an empty data chunk is not one: SR-031) are recorded.
@pytest.mark.req("SR-024", "SR-029", "SR-030")
@pytest.mark.feature("NBD_OPT_STRUCTURED_REPLY")
def test_zero_length_read_none_chunk(server_peer, shared_server, shared_export, ref_client, verdict):
    """A zero-length READ, if answered with NBD_REPLY_TYPE_NONE, gets a well-formed one."""
    c = ref_client(shared_server, setup=_structured, strictness=Strictness(check_local=False))
    verdict.timeline("NBD_OPT_STRUCTURED_REPLY", c.get_structured_replies_negotiated(), export=shared_export)
    if not c.get_structured_replies_negotiated():
        return
    cookie = c.aio_pread(bytearray(0), 4096)
    with contextlib.suppress(ClientError):
        c.wait(cookie)
    replies = server_chunks(c, cookie)
    nones = [e for e in replies if type(e).__name__ == "NoneChunk"]
    if not nones:
        verdict.info(f"zero-length READ answered {[type(e).__name__ for e in replies]}", only=True)
        return
    verdict.expect(all(e.done for e in nones) and replies[-1] is nones[-1], "SR-024", "SR-030",
                   expected="NBD_REPLY_TYPE_NONE with DONE, last", observed=str([(type(e).__name__, e.done)
                                                                                 for e in replies]))


def _raw_chunks(sock, cookies: set[int]) -> list[tuple[int, int, int]]:
    """(flags, type, cookie) of each chunk header until every cookie of ``cookies`` got its DONE chunk
    (replies may interleave), read raw: the core keeps only NBD_REPLY_FLAG_DONE of the flags."""
    import struct

    from suites.server._haggle import recv_exact
    out, left = [], set(cookies)
    while left:
        head = recv_exact(sock, 16)
        if struct.unpack(">I", head[:4])[0] == 0x67446698:        # a simple reply (SR-006's business)
            cookie = struct.unpack(">Q", head[8:16])[0]
            left.discard(cookie)
            out.append((-1, -1, cookie))
            continue
        magic, flags, rtype, cookie, length = struct.unpack(">IHHQI", head + recv_exact(sock, 4))
        assert magic == 0x668E33EF and cookie in cookies, f"not a structured chunk of {cookies}: {magic:#x} {cookie}"
        recv_exact(sock, length)
        out.append((flags, rtype, cookie))
        if flags & 1:
            left.discard(cookie)
    return out


# "The server MUST NOT set any other flags [than NBD_REPLY_FLAG_DONE] without first negotiating the
# extension with the client, unless the client can reasonably detect and ignore the flag" (SR-025): the
# raw chunk headers of a READ and of a failing READ (past the end) carry only bit 0.
@pytest.mark.req("SR-025")
@pytest.mark.feature("NBD_OPT_STRUCTURED_REPLY")
def test_reply_flags_defined(server_peer, shared_server, shared_export, verdict):
    """Structured reply chunks carry no reply flag but NBD_REPLY_FLAG_DONE."""
    import struct

    from nbdref import events as ev

    from fixtures.expectations import option_haggling
    from suites.server._haggle import Plain
    if option_haggling(server_peer) is not None:
        verdict.not_applicable(f"needs option haggling: {option_haggling(server_peer)}")
    plain = Plain(shared_server)
    try:
        sr = plain.option(ev.OptStructuredReply())[-1]
        verdict.timeline("NBD_OPT_STRUCTURED_REPLY", isinstance(sr, ev.RepAck), export=shared_export)
        if not isinstance(sr, ev.RepAck):
            return
        assert isinstance(plain.option(ev.OptGo(name=shared_export.name))[-1], ev.RepAck)
        request = ">IHHQQI"
        plain.sock.sendall(struct.pack(request, 0x25609513, 0, 0, 7, 0, 3 * REGION)
                           + struct.pack(request, 0x25609513, 0, 0, 8, shared_export.size, 4096))
        chunks = _raw_chunks(plain.sock, {7, 8})
        plain.sock.sendall(struct.pack(request, 0x25609513, 0, 2, 9, 0, 0))
    finally:
        plain.close()
    simple = [k for f, _, k in chunks if f < 0]
    if simple:
        verdict.info(f"simple replies to cookies {simple} (judged by test_error_chunk: SR-006)")
    verdict.expect(all(f & ~1 == 0 for f, _, _ in chunks if f >= 0), "SR-025", expected="reply flags within bit 0",
                   observed=str([f"{f:#06x}/type {t}" for f, t, _ in chunks if f >= 0]))
