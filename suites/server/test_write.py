"""NBD_CMD_WRITE, WRITE_ZEROES, TRIM, FLUSH and FUA: what was written reads back, at every place.

Writes at the start, the middle and the end of an export of its own (fresh_export, so the end can be
written) are read back and compared by checksum; the export's size is not a multiple of the preferred
block size, so the tail is an unaligned one.  WRITE_ZEROES and TRIM are followed by a READ and, where
the server offers base:allocation, by NBD_CMD_BLOCK_STATUS.
"""

from __future__ import annotations

import errno
import hashlib

import pytest
from nbdref._constants import Cmd, CmdFlag, Err, TxFlag
from nbdref._strict import Strictness
from nbdref.client import ClientError

from fixtures.exports import ExportRequest
from suites.server._common import BASE, HOLE, collect_extents, error_name, outcome

SECTION = "Request types: NBD_CMD_WRITE"

TAIL = 1536                             # the export ends 1536 bytes past a 4096 boundary
EDGE_EXPORT = ExportRequest(size=(1 << 20) + TAIL, content="pattern")
SPOT = 8192


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def spots(size: int) -> dict[str, tuple[int, int]]:
    """(offset, length) written at the start, the middle, the end, and over the unaligned tail."""
    middle = (size // 2 - SPOT // 2) // 4096 * 4096  # aligned: a persona may enforce a 512 minimum
    return {"start": (0, SPOT), "middle": (middle, SPOT), "end": (size - SPOT, SPOT),
            "tail": (size - TAIL, TAIL)}


# "The server must write the data before sending the reply" (WR-005): every place reads back at once --
# plain WRITEs, then FUA WRITEs where advertised ("If NBD_FLAG_SEND_FUA was advertised the server must
# accept FUA", FUA-002), on one export of its own.
@pytest.mark.req("WR-005", "FUA-002")
@pytest.mark.feature("NBD_CMD_FLAG_FUA")
def test_write_start_middle_end(server_peer, fresh_export, ref_client, verdict):
    """Data written at the start, middle, end and unaligned tail reads back (checksums), with FUA too."""
    c = ref_client(fresh_export(EDGE_EXPORT))
    verdict.timeline("NBD_CMD_FLAG_FUA", c.can_fua(), export=EDGE_EXPORT)
    for fua in (False, True) if c.can_fua() else (False,):
        for where, (offset, length) in spots(EDGE_EXPORT.size).items():
            data = hashlib.sha256(f"{where}{fua}".encode()).digest() * (length // 32)
            try:
                c.pwrite(data, offset, CmdFlag.FUA if fua else 0)
            except ClientError as e:
                if e.errno is None:
                    raise
                verdict.fail("FUA-002" if fua else "WR-005", expected=f"a {'FUA ' if fua else ''}WRITE at {where} "
                             "succeeds", observed=str(e))
                return
            back = c.pread(length, offset)
            verdict.expect(back == data, "WR-005", *(("FUA-002",) if fua else ()),
                           expected=f"{where} ({offset}+{length}{', FUA' if fua else ''}): sha256 {digest(data)}",
                           observed=f"sha256 {digest(back)}")


# Zero-length requests: the server "should not disconnect on a zero-length WRITE" (WR-004), TRIM (TRIM-004)
# or WRITE_ZEROES (WZ-011); whatever it answers, the next command is served.
ZERO_LENGTH = {"WRITE": (Cmd.WRITE, None, "WR-004"), "TRIM": (Cmd.TRIM, TxFlag.SEND_TRIM, "TRIM-004"),
               "WRITE_ZEROES": (Cmd.WRITE_ZEROES, TxFlag.SEND_WRITE_ZEROES, "WZ-011")}


@pytest.mark.parametrize("name", [pytest.param(k, id=k, marks=pytest.mark.req(v[2])) for k, v in ZERO_LENGTH.items()])
def test_zero_length(server_peer, writable_server, writable_export, region, ref_client, verdict, name):
    """A zero-length WRITE / TRIM / WRITE_ZEROES does not end the connection."""
    command, flag, req_id = ZERO_LENGTH[name]
    c = ref_client(writable_server, strictness=Strictness.lenient())
    if flag is not None and not c.get_transmission_flags() & flag:
        verdict.info(f"{name} not advertised: nothing to send", only=True)
        return
    offset = region(4096)
    try:
        error = outcome(c, command, offset, 0, payload=b"" if command == Cmd.WRITE else None)
        c.pwrite(b"\x42" * 4096, offset)
        back = c.pread(4096, offset)
    except ClientError as e:
        verdict.fail(req_id, expected=f"a reply to a zero-length {name}, the connection kept", observed=str(e))
        return
    verdict.info(f"zero-length {name}: {error_name(error)}")
    verdict.expect(back == b"\x42" * 4096, req_id, expected="the next WRITE and READ served",
                   observed="different bytes")


def allocation(c, length: int, offset: int) -> list[tuple[int, int]] | None:
    """base:allocation extents of the range, or None when the context was not negotiated."""
    if not c.can_meta_context(BASE):
        return None
    return collect_extents(c, length, offset).get(BASE, [])


# WRITE_ZEROES "must zero the range before sending the reply" (WZ-012) and it "must read back as zeroes"
# (WZ-017); with NO_HOLE "the zeroed area must be fully provisioned" (WZ-019): base:allocation must not
# call it a hole.  "If SEND_FAST_ZERO is advertised but FAST_ZERO is not set, the server must not fail with
# NBD_ENOTSUP" (WZ-020), nor without SEND_FAST_ZERO (WZ-025).
@pytest.mark.req("WZ-007", "WZ-012", "WZ-017", "WZ-019", "WZ-020")
@pytest.mark.feature("NBD_CMD_FLAG_NO_HOLE")
def test_write_zeroes_no_hole(server_peer, writable_server, writable_export, region, ref_client, verdict):
    """WRITE_ZEROES with NO_HOLE reads back as zeroes and is not reported as a hole."""
    c = ref_client(writable_server, setup=lambda cl: cl.add_meta_context(BASE))
    verdict.timeline("NBD_CMD_FLAG_NO_HOLE", c.can_zero(), export=writable_export)
    if not c.can_zero():
        return
    offset = region(65536)
    c.pwrite(b"\xee" * 65536, offset)
    failure: ClientError | None = None
    try:
        c.zero(65536, offset, CmdFlag.NO_HOLE)
    except ClientError as e:
        failure = e
    # NO_HOLE sets no FAST_ZERO: NBD_ENOTSUP is wrong whether SEND_FAST_ZERO is advertised (WZ-020) or not
    # (WZ-025, judged in test_errors where the flag is absent)
    if c.can_fast_zero():
        verdict.expect(failure is None or failure.errno != errno.ENOTSUP, "WZ-020",
                       expected="no NBD_ENOTSUP without FAST_ZERO", observed=str(failure or "success"))
    verdict.expect(failure is None, "WZ-007", expected="WRITE_ZEROES with NO_HOLE succeeds",
                   observed=str(failure))
    if failure is not None:
        return
    verdict.expect(c.pread(65536, offset) == bytes(65536), "WZ-012", "WZ-017",
                   expected="the range reads back as zeroes", observed="other bytes")
    # "fully provisioned so later writes cannot fragment or fail for lack of space" (WZ-019): a WRITE
    # over the zeroed range succeeds.  base:allocation is recorded: a hole there is no proof of missing
    # provisioning (ext4 and XFS report fallocated, unwritten extents as holes to SEEK_HOLE, which is what
    # qemu's file driver asks), so it is not judged.
    extents = allocation(c, 65536, offset)
    holes = [e for e in (extents or []) if e[1] & HOLE]
    verdict.info(f"base:allocation after NO_HOLE zeroing: {extents if extents is not None else 'not offered'}"
                 + (" (holes reported)" if holes else ""))
    try:
        c.pwrite(b"\x5e" * 65536, offset)
    except ClientError as e:
        verdict.fail("WZ-019", expected="a WRITE over a NO_HOLE-zeroed range succeeds", observed=str(e))
        return
    verdict.expect(c.pread(65536, offset) == b"\x5e" * 65536, "WZ-019",
                   expected="the WRITE over the zeroed range reads back", observed="other bytes")


# FAST_ZERO: either the range is zeroed, or "the server must fail quickly with NBD_ENOTSUP" (WZ-022) and
# the failure "should leave the export contents unchanged" (WZ-023); "With FAST_ZERO set the server should
# not fail with NBD_EOVERFLOW, whatever the length" (WZ-021: a fast zero of a whole 40 MiB export, more
# than any maximum payload here).
@pytest.mark.req("WZ-021", "WZ-022", "WZ-008")
@pytest.mark.feature("NBD_CMD_FLAG_FAST_ZERO")
def test_fast_zero(server_peer, fresh_export, ref_client, verdict):
    """FAST_ZERO zeroes or fails fast with NBD_ENOTSUP leaving the data; never NBD_EOVERFLOW."""
    export = ExportRequest(size=40 << 20, content="zero", writes=((4096, b"\x99" * 4096),))
    c = ref_client(fresh_export(export), strictness=Strictness.lenient())
    verdict.timeline("NBD_CMD_FLAG_FAST_ZERO", c.can_fast_zero(), export=export)
    if not c.can_fast_zero():
        return
    error = outcome(c, Cmd.WRITE_ZEROES, 0, 12288, CmdFlag.FAST_ZERO)
    verdict.info(f"FAST_ZERO of 12 KiB: {error_name(error)}")
    verdict.expect(error in (0, Err.ENOTSUP), "WZ-022", "WZ-008", expected="success or NBD_ENOTSUP",
                   observed=error_name(error))
    back = c.pread(12288, 0)
    if error == Err.ENOTSUP:
        verdict.expect(back[4096:8192] == b"\x99" * 4096, "WZ-023", expected="the data unchanged",
                       observed="the range changed")
    elif not error:
        verdict.expect(back == bytes(12288), "WZ-022", expected="zeroes", observed="other bytes")
    error = outcome(c, Cmd.WRITE_ZEROES, 0, export.size, CmdFlag.FAST_ZERO)
    verdict.info(f"FAST_ZERO of the whole {export.size}-byte export: {error_name(error)}")
    verdict.expect(error != Err.EOVERFLOW, "WZ-021", expected="no NBD_EOVERFLOW for FAST_ZERO",
                   observed=error_name(error))


# TRIM: "The server may discard the trimmed range but is not required to"; after it the content is
# unspecified until written again.  What is read and what base:allocation says is recorded; a WRITE over
# the trimmed range reads back (WR-005).
@pytest.mark.req("WR-005")
@pytest.mark.feature("NBD_CMD_TRIM")
def test_trim_then_read(server_peer, writable_server, writable_export, region, ref_client, verdict):
    """TRIM succeeds; afterwards the range reads, reports its status, and takes new data."""
    c = ref_client(writable_server, setup=lambda cl: cl.add_meta_context(BASE))
    verdict.timeline("NBD_CMD_TRIM", c.can_trim(), export=writable_export)
    if not c.can_trim():
        return
    offset = region(65536)
    c.pwrite(b"\xcc" * 65536, offset)
    c.trim(65536, offset)
    back = c.pread(65536, offset)
    state = "zeroes" if back == bytes(65536) else "the old data" if back == b"\xcc" * 65536 else "mixed"
    verdict.info(f"after TRIM the range reads as {state}; base:allocation {allocation(c, 65536, offset)}")
    c.pwrite(b"\x3c" * 65536, offset)
    verdict.expect(c.pread(65536, offset) == b"\x3c" * 65536, "WR-005", expected="a WRITE after TRIM reads back",
                   observed="other bytes")


# FLUSH after writes in flight, and FUA on every command where advertised: "If NBD_FLAG_SEND_FUA was
# advertised the server must accept FUA on every command, even if it ignores it" (FUA-002).
@pytest.mark.req("FUA-002", "WR-005")
@pytest.mark.feature("NBD_CMD_FLAG_FUA")
def test_fua_on_every_command(server_peer, writable_server, writable_export, region, ref_client, verdict):
    """FUA is accepted on READ, WRITE, TRIM, WRITE_ZEROES, CACHE and FLUSH."""
    c = ref_client(writable_server, strictness=Strictness.lenient())
    verdict.timeline("NBD_CMD_FLAG_FUA", c.can_fua(), export=writable_export)
    if not c.can_fua():
        return
    offset = region(65536)
    tx = c.get_transmission_flags()
    commands = [("WRITE", Cmd.WRITE, None), ("READ", Cmd.READ, None), ("TRIM", Cmd.TRIM, TxFlag.SEND_TRIM),
                ("WRITE_ZEROES", Cmd.WRITE_ZEROES, TxFlag.SEND_WRITE_ZEROES), ("CACHE", Cmd.CACHE, TxFlag.SEND_CACHE),
                ("FLUSH", Cmd.FLUSH, TxFlag.SEND_FLUSH)]
    seen = []
    for name, command, flag in commands:
        if flag is not None and not tx & flag:
            continue
        length = 0 if command == Cmd.FLUSH else 4096
        error = outcome(c, command, 0 if command == Cmd.FLUSH else offset, length, CmdFlag.FUA,
                        payload=b"\x11" * 4096 if command == Cmd.WRITE else None)
        seen.append(f"{name}: {error_name(error)}")
        verdict.expect(error == 0, "FUA-002", expected=f"{name} with FUA accepted", observed=error_name(error))
    verdict.info("; ".join(seen))
    c.pwrite(b"\x12" * 4096, offset, CmdFlag.FUA)
    verdict.expect(c.pread(4096, offset) == b"\x12" * 4096, "WR-005", expected="a FUA WRITE reads back",
                   observed="other bytes")


ODD_SIZE = (1 << 20) + 1000             # ends 488 bytes into a sector
ODD_TAIL = ODD_SIZE % 512


def odd_size_server(request, server_peer, fresh_export, tmp_path, verdict):
    """A server of an export whose size is not a multiple of 512: from fresh_export where the harness
    can make one, else (the reference server) an in-memory export of that size."""
    try:
        export = ExportRequest(size=ODD_SIZE, content="zero")
    except ValueError as e:
        if server_peer.implementation != "nbdref":
            verdict.not_applicable(f"the harness makes only exports whose size is a multiple of 512 ({e})")
        from nbdref.server import Export, Server

        from suites.server._common import InProcessServer
        srv = Server([Export.memory("exp", ODD_SIZE)], persona=server_peer.persona, unix=str(tmp_path / "o.sock"))
        srv.start()
        request.addfinalizer(lambda: srv.stop(timeout=5))
        return InProcessServer(srv)
    return fresh_export(export)


# The unaligned tail of an export whose size is not a multiple of 512: the last 488 bytes can be written
# and read back (WR-005); a READ or WRITE crossing the end fails -- READ with NBD_EINVAL (ERR-003), WRITE
# with NBD_ENOSPC (ERR-001) or NBD_EINVAL (BSZ-034: a spec tension, both accepted).
@pytest.mark.req("WR-005", "ERR-003", "ERR-001")
def test_unaligned_tail(request, server_peer, writable_server, fresh_export, tmp_path, ref_client, verdict):
    """The last, partial sector of an odd-sized export is readable and writable; past it is refused."""
    from suites.server.test_errors import BSZ034_TEXT, ERR001_TEXT

    minimum = ref_client(writable_server).get_block_size(0)
    if minimum > 1:
        # "If a server advertises a minimum block size, the advertised export size SHOULD be an integer
        # multiple of that block size" (BSZ-016): such a server has no addressable unaligned tail.
        verdict.not_applicable(f"the server advertises a minimum block size of {minimum}: an export with an "
                               "unaligned tail is not one it should serve")
    server = odd_size_server(request, server_peer, fresh_export, tmp_path, verdict)
    c = ref_client(server, strictness=Strictness.lenient(), allow=("ERR-001", "ERR-003", "BSZ-033"))
    size = c.get_size()
    verdict.info(f"export of {ODD_SIZE} bytes advertised as {size}; block sizes "
                 f"{tuple(c.get_block_size(i) for i in range(3))}")
    if size != ODD_SIZE:
        verdict.info(f"the server rounds the size to {size}: the tail is not at {ODD_SIZE}")
    tail = size % 512 or 512
    data = hashlib.sha256(b"tail").digest() * (tail // 32) + b"\x7e" * (tail % 32)
    c.pwrite(data, size - tail)
    back = c.pread(tail, size - tail)
    verdict.expect(back == data, "WR-005", expected=f"the last {tail} bytes read back", observed="other bytes")
    error = outcome(c, Cmd.READ, size - tail, 512 + tail)
    verdict.info(f"READ crossing the end: {error_name(error)}")
    verdict.expect(error == Err.EINVAL, "ERR-003", expected="READ past the end: NBD_EINVAL",
                   observed=error_name(error))
    error = outcome(c, Cmd.WRITE, size - tail, 512 + tail, payload=b"\x01" * (512 + tail))
    verdict.info(f"WRITE crossing the end: {error_name(error)}")
    if error in (Err.EINVAL, Err.ENOSPC):  # each follows one section of the spec: a tension either way
        verdict.tension("ERR-001", "BSZ-034", texts=(ERR001_TEXT, BSZ034_TEXT),
                        observed=f"WRITE crossing the end: {error_name(error)}")
    else:
        verdict.expect(error == Err.ENOSPC, "ERR-001", expected="WRITE past the end: NBD_ENOSPC",
                       observed=error_name(error))
    verdict.info("the tail after the refused WRITE: " + ("unchanged" if c.pread(tail, size - tail) == data
                                                         else "partly written (no rule forbids it)"))


# TRIM and WRITE_ZEROES of a whole 40 MiB export: an effect length over any maximum payload here (2^25
# at most, besides nbdkit's 4 GiB - 1).  "the server SHOULD NOT disconnect, but MAY reply with an
# NBD_EOVERFLOW or NBD_EINVAL error" (BSZ-029); either, or success, is accepted and recorded.
@pytest.mark.req("BSZ-029")
def test_oversize_effect_length(server_peer, fresh_export, ref_client, verdict):
    """TRIM / WRITE_ZEROES longer than the maximum payload are answered, the connection kept."""
    export = ExportRequest(size=40 << 20, content="zero", writes=((4096, b"\x99" * 4096),))
    c = ref_client(fresh_export(export), strictness=Strictness.lenient(), allow=("ERR-006",))
    maximum = c.get_block_size(2) or 1 << 25
    seen = []
    for name, command, flag in (("TRIM", Cmd.TRIM, TxFlag.SEND_TRIM),
                                ("WRITE_ZEROES", Cmd.WRITE_ZEROES, TxFlag.SEND_WRITE_ZEROES)):
        if not c.get_transmission_flags() & flag:
            continue
        try:
            error = outcome(c, command, 0, export.size)
        except ClientError as e:
            verdict.fail("BSZ-029", expected=f"a reply to a {export.size}-byte {name}", observed=str(e))
            return
        seen.append(f"{name} of {export.size} (maximum payload {maximum}): {error_name(error)}")
        verdict.expect(error in (0, Err.EOVERFLOW, Err.EINVAL), "BSZ-029",
                       expected="success, NBD_EOVERFLOW or NBD_EINVAL", observed=error_name(error))
    if not seen:
        verdict.info("neither TRIM nor WRITE_ZEROES advertised", only=True)
        return
    verdict.info("; ".join(seen))
    verdict.expect(len(c.pread(512, 0)) == 512, "BSZ-029", expected="the connection still serves",
                   observed="no data")


# "A fast-zero NBD_ENOTSUP failure should leave the export contents unchanged" (WZ-023).  A server that can
# zero fast never refuses; the reference server's export here has storage that cannot (its backend says
# so), which makes it refuse every FAST_ZERO.  Elsewhere the refusal is judged when it happens.
@pytest.mark.req("WZ-023", "WZ-022")
@pytest.mark.feature("NBD_CMD_FLAG_FAST_ZERO")
def test_fast_zero_refused(request, server_peer, fresh_export, tmp_path, ref_client, verdict):
    """A refused FAST_ZERO (NBD_ENOTSUP) leaves the data as it was."""
    pattern = b"\x99" * 4096
    if server_peer.implementation == "nbdref":
        from nbdref.backends import MemoryBackend
        from nbdref.server import Export, Server

        from suites.server._common import InProcessServer

        class NoFastZero(MemoryBackend):
            def fast_zero_possible(self, offset: int, length: int, *, may_trim: bool) -> bool:
                return False

        backend = NoFastZero(1 << 20)
        backend.pwrite(4096, pattern)
        srv = Server([Export(name="exp", backend=backend)], persona=server_peer.persona,
                     unix=str(tmp_path / "z.sock"))
        srv.start()
        request.addfinalizer(lambda: srv.stop(timeout=5))
        server, export = InProcessServer(srv), None
    else:
        export = ExportRequest(size=1 << 20, content="zero", writes=((4096, pattern),))
        server = fresh_export(export)
    c = ref_client(server, strictness=Strictness.lenient())
    verdict.timeline("NBD_CMD_FLAG_FAST_ZERO", c.can_fast_zero(), export=export)
    if not c.can_fast_zero():
        return
    error = outcome(c, Cmd.WRITE_ZEROES, 0, 12288, CmdFlag.FAST_ZERO)
    verdict.expect(error in (0, Err.ENOTSUP), "WZ-022", expected="success or NBD_ENOTSUP", observed=error_name(error))
    if error != Err.ENOTSUP:
        verdict.info(f"FAST_ZERO answered {error_name(error)}: no refusal to judge", only=True)
        return
    verdict.expect(c.pread(4096, 4096) == pattern, "WZ-023", expected="the data unchanged after NBD_ENOTSUP",
                   observed="the range changed")
