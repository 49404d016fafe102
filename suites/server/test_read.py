"""NBD_CMD_READ: the data, its framing in simple and structured replies, DF, zero-length and big reads.

Data is checked against what the export was made with (fixtures.exports.expected_bytes) at the start,
the middle and the end of the export, by checksum.  The chunks of a structured reply are read from the
client's transcript (offsets and lengths are exact there) and judged rule by rule.
"""

from __future__ import annotations

import hashlib
import itertools

import pytest
from nbdref import events as ev
from nbdref._constants import Cmd, CmdFlag, Err
from nbdref._strict import Strictness
from nbdref.client import ClientError

from fixtures.exports import expected_bytes
from suites.server._common import error_name, outcome, server_chunks

SECTION = "Request types: NBD_CMD_READ"

SPOT = 192 * 1024                       # bytes read at each place (not a power of two of chunks)


def places(size: int) -> dict[str, int]:
    """Offsets of the start, the middle and the end of an export of `size` bytes."""
    return {"start": 0, "middle": (size // 2) - SPOT // 2, "end": size - SPOT}


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def judge_chunks(verdict, chunks: list, offset: int, length: int) -> None:
    """The content chunks of one successful structured READ reply, rule by rule."""
    content = [ch for ch in chunks if isinstance(ch, ev.OffsetData | ev.OffsetHole)]
    spans = [(ch.offset, ch.length) for ch in content]
    shape = ", ".join(f"{type(ch).__name__}@{o}+{n}" for ch, (o, n) in zip(content, spans, strict=True))
    # "With structured replies a READ must get one or more structured chunks, the last flagged
    # NBD_REPLY_FLAG_DONE" (RD-016)
    verdict.expect(bool(chunks) and chunks[-1].done and not any(ch.done for ch in chunks[:-1]), "RD-016",
                   expected="structured chunks, only the last with NBD_REPLY_FLAG_DONE", observed=shape or "none")
    verdict.expect(all(n >= 1 for _, n in spans), "RD-018", expected="each content chunk describes >= 1 byte",
                   observed=shape)
    verdict.expect(all(offset <= o and o + n <= offset + length for o, n in spans), "RD-021",
                   expected=f"chunks inside [{offset}, {offset + length})", observed=shape)
    ordered = sorted(spans)
    overlap = any(a[0] + a[1] > b[0] for a, b in itertools.pairwise(ordered))
    verdict.expect(not overlap, "RD-020", expected="no overlapping content chunks", observed=shape)
    verdict.expect(sum(n for _, n in spans) == length and not overlap, "RD-027",
                   expected=f"content chunks covering all {length} bytes", observed=shape)
    # "Content chunk offsets and lengths should be multiples of 512 where possible" (RD-019): the request
    # is 512-aligned, so every chunk boundary can be.
    verdict.expect(all(o % 512 == 0 and n % 512 == 0 for o, n in spans), "RD-019",
                   expected="chunk offsets and lengths multiples of 512", observed=shape)


# The data read at the start, middle and end of the export is what the export holds; without structured
# replies "a READ must always get a simple reply carrying exactly length bytes on success" (RD-010), with
# them the chunk rules RD-016/018/019/020/021/027 (the core parses every chunk; the test judges them).
@pytest.mark.parametrize("structured", [
    pytest.param(False, id="simple", marks=pytest.mark.req("RD-007", "RD-010")),
    pytest.param(True, id="structured", marks=pytest.mark.req("RD-007", "RD-016", "RD-018", "RD-019", "RD-020",
                                                              "RD-021", "RD-027"))])
def test_read_start_middle_end(server_peer, shared_server, shared_export, ref_client, verdict, structured):
    """READs at the start, the middle and the end return the export's bytes, framed right."""
    def setup(cl):
        cl.set_request_extended_headers(False)
        cl.set_request_structured_replies(structured)

    c = ref_client(shared_server, setup=setup)
    negotiated = c.get_structured_replies_negotiated()
    if structured:
        verdict.timeline("NBD_OPT_STRUCTURED_REPLY", negotiated, export=shared_export)
    for where, offset in places(shared_export.size).items():
        buf = bytearray(SPOT)
        cookie = c.aio_pread(buf, offset)
        c.wait(cookie)
        want = expected_bytes(shared_export, offset, SPOT)
        chunks = server_chunks(c, cookie)
        # "READ must be answered with a simple or a structured reply according to whether structured
        # replies were negotiated" (RD-007)
        simple_replies = sum(isinstance(ch, ev.SimpleReply) for ch in chunks)
        verdict.expect(simple_replies == (0 if negotiated else len(chunks)), "RD-007",
                       expected="structured chunks" if negotiated else "a simple reply",
                       observed=str([type(ch).__name__ for ch in chunks]))
        if negotiated:
            judge_chunks(verdict, chunks, offset, SPOT)
            verdict.expect(bytes(buf) == want, "RD-027", expected=f"{where}: sha256 {digest(want)}",
                           observed=f"sha256 {digest(bytes(buf))}")
        else:
            simple = [ch for ch in chunks if isinstance(ch, ev.SimpleReply)]
            verdict.expect(len(simple) == 1 and bytes(buf) == want, "RD-010",
                           expected=f"{where}: one simple reply, sha256 {digest(want)}",
                           observed=f"{len(simple)} simple replies, sha256 {digest(bytes(buf))}")


# "The server should not disconnect on a zero-length READ (behaviour otherwise unspecified)" (RD-009):
# whatever it answers, the next command is served.
@pytest.mark.req("RD-009")
def test_read_zero_length(server_peer, shared_server, shared_export, ref_client, verdict):
    """A zero-length READ does not end the connection."""
    c = ref_client(shared_server, strictness=Strictness.lenient())
    try:
        error = outcome(c, Cmd.READ, 4096, 0)
    except ClientError as e:
        verdict.fail("RD-009", expected="a reply to a zero-length READ, the connection kept", observed=str(e))
        return
    verdict.info(f"zero-length READ: {error_name(error)}")
    verdict.expect(c.pread(512, 0) == expected_bytes(shared_export, 0, 512), "RD-009",
                   expected="the next READ served", observed="different bytes")


# With DF "the server must send at most one content chunk" (RD-045); a range holding data and a hole
# "must be sent as one OFFSET_DATA with explicit zeroes" (RD-047); a DF read it cannot send in one chunk
# fails with NBD_EOVERFLOW and then "must not send any content chunk" (RD-049; 64 KiB must work, RD-050).
# The export is sparse: 8 KiB of data at the start, a hole after it.
# A DF reply is also the payload limit "documented for a particular command" the server "MUST honor"
# (BSZ-027): one chunk, whatever the maximum payload lets a structured reply exceed it by.
@pytest.mark.req("RD-045", "RD-047", "RD-050", "BSZ-027")
@pytest.mark.feature("NBD_CMD_FLAG_DF")
def test_read_df_data_and_hole(server_peer, fresh_export, ref_client, verdict):
    """A DF read over data and a hole comes back as one OFFSET_DATA chunk with explicit zeroes."""
    from fixtures.exports import ExportRequest

    data = bytes(range(256)) * 32
    export = ExportRequest(size=1 << 20, content="zero", writes=((0, data),))
    c = ref_client(fresh_export(export), strictness=Strictness.lenient())
    verdict.timeline("NBD_CMD_FLAG_DF", c.can_df(), export=export)
    if not c.can_df():
        return
    plain = bytearray(65536)
    plain_cookie = c.aio_pread(plain, 0)
    c.wait(plain_cookie)
    kinds = [type(ch).__name__ for ch in server_chunks(c, plain_cookie)]
    verdict.info(f"without DF: {kinds}")
    buf = bytearray(65536)
    cookie = c.aio_command(Cmd.READ, 0, 65536, CmdFlag.DF, buffer=buf)
    error = 0
    try:
        c.wait(cookie)
    except ClientError as e:
        if e.errno is None:
            raise
        error = e.errno
    chunks = server_chunks(c, cookie)
    content = [ch for ch in chunks if isinstance(ch, ev.OffsetData | ev.OffsetHole)]
    shape = [type(ch).__name__ for ch in chunks]
    verdict.expect(not error, "RD-050", expected="a 64 KiB DF read succeeds", observed=error_name(error))
    if error:
        if error == Err.EOVERFLOW:
            verdict.expect(not content, "RD-049", expected="no content chunk in a DF reply failed with EOVERFLOW",
                           observed=str(shape))
        return
    verdict.expect(len(content) <= 1, "RD-045", "BSZ-027", expected="at most one content chunk with DF",
                   observed=str(shape))
    verdict.expect(len(content) == 1 and isinstance(content[0], ev.OffsetData), "RD-047",
                   expected="one NBD_REPLY_TYPE_OFFSET_DATA for data and hole", observed=str(shape))
    verdict.expect(bytes(buf) == data + bytes(65536 - len(data)), "RD-047",
                   expected="the data, then explicit zeroes", observed="different bytes")


# "Absent advertised constraints, a server should support minimum block 1, preferred block 4096 and a
# maximum payload of at least 2^25 bytes" (BSZ-007): a 1-byte READ at an odd offset and a 32 MiB READ.
@pytest.mark.req("BSZ-007")
def test_read_default_sizes(server_peer, writable_server, writable_export, ref_client, verdict):
    """Without advertised constraints a 1-byte unaligned READ and a 2^25-byte READ both work."""
    c = ref_client(writable_server, strictness=Strictness.lenient())
    sizes = tuple(c.get_block_size(i) for i in range(3))
    if any(sizes):
        verdict.info(f"constraints advertised {sizes}: BSZ-007 is about servers that advertise none")
    minimum = sizes[0] or 1
    if minimum == 1:
        odd = 12345
        data = c.pread(1, odd)
        verdict.expect(data == expected_bytes(writable_export, odd, 1), "BSZ-007",
                       expected="a 1-byte READ at an odd offset returns that byte", observed=repr(data))
    big = 1 << 25
    limit = sizes[2] or big
    if limit < big or writable_export.size < big:
        verdict.info(f"maximum payload {limit}: no 2^25-byte READ")
        return
    try:
        data = c.pread(big, 0)
    except ClientError as e:
        verdict.fail("BSZ-007", expected="a 2^25-byte READ succeeds", observed=str(e))
        return
    head = expected_bytes(writable_export, 0, 1 << 20)        # the first MiB stays as made
    verdict.expect(len(data) == big and data[: 1 << 20] == head, "BSZ-007",
                   expected=f"{big} bytes, the first MiB sha256 {digest(head)}",
                   observed=f"{len(data)} bytes, sha256 {digest(data[: 1 << 20])}")
