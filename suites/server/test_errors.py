"""Error values: which NBD error a server owes a request it must or should refuse, and that it stays usable.

proto.md "Error values" says which error a server SHOULD return (ENOSPC for writes past the end, EINVAL
for reads and trims past the end, for unknown commands and flags, EPERM on a read-only export); "Size
constraints" says it SHOULD answer EINVAL to a request that "would exceed the export size" -- for a
WRITE or WRITE_ZEROES past the end the two sections name different errors, and either is accepted as a
spec tension.  The reference client is lenient here (it sends what a strict client refuses); the core's
own judgement of these ids is replaced by the test's, so each id is judged exactly once.  After every
refusal the next request must still be answered.
"""

from __future__ import annotations

import pytest
from nbdref._constants import Cmd, CmdFlag, Err, TxFlag
from nbdref._strict import Strictness
from nbdref.client import ClientError

from fixtures.exports import ExportRequest, expected_bytes
from suites.server._common import error_name, nbd_error_values, outcome

SECTION = "Error values"

UNKNOWN_FLAG = 1 << 15                  # no command flag is defined at bit 15
UNKNOWN_COMMAND = 0x1F                  # no request type 31 is defined
# Every id whose error value these tests judge themselves (the core's judgement of them is dropped).
JUDGED = ("ERR-001", "ERR-003", "ERR-005", "ERR-006", "ERR-007", "ERR-008", "ERR-009", "ERR-010", "WZ-030",
          "WZ-031", "WZ-026", "WR-001", "CACHE-006", "BS-085")

ERR001_TEXT = ("proto.md \"Error values\": \"The server SHOULD return NBD_ENOSPC if it receives a write request "
               "including one or more sectors beyond the size of the device\" (ERR-001; WZ-030 for WRITE_ZEROES)")
BSZ034_TEXT = ("proto.md \"Size constraints\": \"The server SHOULD report an NBD_EINVAL error if the client's "
               "request is not aligned to advertised minimum block size boundaries or would exceed the export "
               "size\" (BSZ-034)")


def lenient_client(ref_client, server, **kw):
    """A reference client that sends what its strict mode refuses, and leaves judging errors to us."""
    return ref_client(server, strictness=Strictness.lenient(), allow=JUDGED, **kw)


# Per command, the rule that asks for "an appropriate error code" on failure.
APPROPRIATE = {"READ": "RD-011", "WRITE": "WR-007", "WRITE_ZEROES": "WZ-029", "CACHE": "CACHE-002"}


def judge_error_value(verdict, error: int, command: str, flags: int = 0, *, df_or_oversize: bool = False) -> None:
    """The rules every reply obeys (judged on each, success included): only defined error values, ENOTSUP
    only for a fast zero, EOVERFLOW only for DF reads or oversize requests, ENOMEM avoided."""
    seen = f"{command}: {error_name(error)}"
    if command in APPROPRIATE:
        verdict.expect(not error or error in nbd_error_values(), APPROPRIATE[command],
                       expected="success, or one of the NBD error values proto.md defines", observed=seen)
    verdict.expect(error != Err.ENOTSUP or (command == "WRITE_ZEROES" and bool(flags & CmdFlag.FAST_ZERO)),
                   "ERR-007", expected="NBD_ENOTSUP only for WRITE_ZEROES with NBD_CMD_FLAG_FAST_ZERO", observed=seen)
    verdict.expect(error != Err.EOVERFLOW or df_or_oversize, "ERR-006",
                   expected="NBD_EOVERFLOW only for DF reads or oversize payload-less requests", observed=seen)
    # "The server SHOULD NOT return NBD_ENOMEM if at all possible" (ERR-011)
    verdict.expect(error != Err.ENOMEM, "ERR-011", expected="no NBD_ENOMEM for a small request", observed=seen)


def still_serving(c, export, verdict, after: str) -> None:
    """The request after a refusal is understood: a READ of the first sector comes back right."""
    data = c.pread(512, 0)
    # the data of a READ: "exactly length bytes" of a simple reply (RD-010), chunks covering it (RD-027)
    verdict.expect(data == expected_bytes(export, 0, 512),
                   "RD-027" if c.get_structured_replies_negotiated() else "RD-010",
                   expected=f"the export's first sector after {after}", observed="different bytes")


def expect_error(verdict, error: int, req_id: str, wanted: int, what: str) -> None:
    """`wanted` is the error the rule names: anything else (success included) breaks it."""
    verdict.expect(error == wanted, req_id, expected=f"{what} fails with {error_name(wanted)}",
                   observed=error_name(error))


# "The server SHOULD return NBD_EINVAL if it receives an unknown command" (ERR-008); "an unknown command
# flag" (ERR-009); "a request with a flag not explicitly documented as applicable to the given request"
# (ERR-010: NO_HOLE and REQ_ONE on a READ).  Structured replies or not, the core checks the framing of the
# error reply ("NBD_CMD_READ must never get a simple reply" once they are on, SR-006).
CASES = {
    "unknown-command": (UNKNOWN_COMMAND, 0, "ERR-008"),
    "unknown-flag": (Cmd.READ, UNKNOWN_FLAG, "ERR-009"),
    "read-no-hole": (Cmd.READ, CmdFlag.NO_HOLE, "ERR-010"),
    "read-req-one": (Cmd.READ, CmdFlag.REQ_ONE, "ERR-010"),
}


@pytest.mark.parametrize("case", [pytest.param(k, marks=pytest.mark.req(v[2], "ERR-006", "ERR-007",
                                                                        "ERR-011", *(("RD-011",) if v[0] == Cmd.READ
                                                                                     else ())), id=k)
                                  for k, v in CASES.items()])
def test_invalid_request(server_peer, shared_server, shared_export, ref_client, verdict, case):
    """An unknown command, an unknown flag, a flag not for READ: NBD_EINVAL, and the connection goes on."""
    command, flags, req_id = CASES[case]
    c = lenient_client(ref_client, shared_server)
    error = outcome(c, command, 0, 512, flags)
    verdict.info(f"{case}: {error_name(error)}")
    expect_error(verdict, error, req_id, Err.EINVAL, case)
    judge_error_value(verdict, error, "READ" if command == Cmd.READ else f"command {command}", flags)
    still_serving(c, shared_export, verdict, f"the {case} request")


# Reads past the end: "SHOULD return NBD_EINVAL if it receives a read or trim request including one or
# more sectors beyond the size of the device" (ERR-003); without structured replies, no payload follows
# the error ("If it stays connected after a simple-reply READ error, the server must send no payload",
# RD-013, checked by the core: a payload would be parsed as the next reply); with them, an error chunk
# ends the reply (RD-034), "If NBD_REPLY_TYPE_ERROR is used it should be the only error chunk" (RD-037),
# and no mixing of offset errors with a generic one (RD-041).
@pytest.mark.parametrize("structured", [
    pytest.param(False, id="simple", marks=pytest.mark.req("ERR-003", "RD-011", "RD-013", "ERR-006", "ERR-011")),
    pytest.param(True, id="structured", marks=pytest.mark.req("ERR-003", "RD-011", "RD-034", "RD-037", "RD-041",
                                                              "ERR-006", "ERR-011"))])
@pytest.mark.parametrize("where", ["beyond", "straddling"])
def test_read_past_end(server_peer, shared_server, shared_export, ref_client, verdict, structured, where):
    """A READ reaching past the end fails with NBD_EINVAL, framed right, and the connection goes on."""
    from nbdref import events as ev

    from suites.server._common import server_chunks

    def setup(cl):
        cl.set_request_extended_headers(False)
        cl.set_request_structured_replies(structured)

    c = lenient_client(ref_client, shared_server, setup=setup)
    if structured and not c.get_structured_replies_negotiated():
        verdict.timeline("NBD_OPT_STRUCTURED_REPLY", False, export=shared_export)
        return
    size = shared_export.size
    offset, length = (size, 512) if where == "beyond" else (size - 512, 1024)
    cookie = c.aio_command(Cmd.READ, offset, length, buffer=bytearray(length))
    error = outcome_of(c, cookie)
    verdict.info(f"READ {length} at {offset} (size {size}): {error_name(error)}")
    expect_error(verdict, error, "ERR-003", Err.EINVAL, "a READ past the end")
    judge_error_value(verdict, error, "READ")
    if not structured:
        # "If it stays connected after a simple-reply READ error, the server must send no payload" (RD-013):
        # one simple reply without data, and the next reply parses as a reply (still_serving below).
        replies = server_chunks(c, cookie)
        verdict.expect(len(replies) == 1 and (not error or not replies[0].data), "RD-013",
                       expected="one simple error reply without payload",
                       observed=f"{[type(r).__name__ for r in replies]}")
    if structured:
        chunks = server_chunks(c, cookie)
        errors = [ch for ch in chunks if isinstance(ch, ev.ErrorChunk)]
        if error:
            # "After detecting an error the server must include an error chunk" (RD-034)
            verdict.expect(bool(errors), "RD-034", expected="an error chunk in the failed READ's reply",
                           observed=f"chunks {[type(ch).__name__ for ch in chunks]}")
        generic = [ch for ch in errors if ch.offset is None]
        verdict.expect(len(generic) <= 1 and (not generic or len(errors) == 1), "RD-037", "RD-041",
                       expected="NBD_REPLY_TYPE_ERROR alone, or only offset-bearing error chunks",
                       observed=f"{len(generic)} generic and {len(errors) - len(generic)} offset error chunks")
    still_serving(c, shared_export, verdict, "a READ past the end")


def outcome_of(c, cookie: int) -> int:
    """Wait for `cookie`: its NBD error (0 = success)."""
    from nbdref.client import ClientError

    try:
        c.wait(cookie)
    except ClientError as e:
        if e.errno is None:
            raise
        return int(e.errno)
    return 0


# Writes past the end of a writable export.  Entirely past it (offset = size), so a server that writes
# what fits cannot touch the bytes other tests read.  WRITE: ENOSPC ("Error values", ERR-001) or EINVAL
# ("Size constraints", BSZ-034) -- a spec tension, both accepted and recorded; "On a write error the
# server must set an appropriate error code" (WR-007).  TRIM: EINVAL (ERR-003).  WRITE_ZEROES: ENOSPC
# (WZ-030; EINVAL by BSZ-034 again), "an appropriate error code" (WZ-029).  CACHE: "On a CACHE error the
# server must set an appropriate error code" (CACHE-002): a CACHE past the end may also succeed.
WRITES = {
    "WRITE": (Cmd.WRITE, None, "ERR-001", Err.ENOSPC, ("ERR-001", "BSZ-034", "WR-007")),
    "TRIM": (Cmd.TRIM, TxFlag.SEND_TRIM, "ERR-003", Err.EINVAL, ("ERR-003", "BSZ-034")),
    "WRITE_ZEROES": (Cmd.WRITE_ZEROES, TxFlag.SEND_WRITE_ZEROES, "WZ-030", Err.ENOSPC, ("WZ-030", "BSZ-034", "WZ-029")),
    "CACHE": (Cmd.CACHE, TxFlag.SEND_CACHE, None, None, ("CACHE-002",)),
}


@pytest.mark.parametrize("name", [pytest.param(k, id=k, marks=pytest.mark.req(*v[4], "ERR-006", "ERR-007", "ERR-011"))
                                  for k, v in WRITES.items()])
def test_write_past_end(server_peer, writable_server, writable_export, ref_client, verdict, name):
    """WRITE, TRIM, WRITE_ZEROES, CACHE past the end: the error the spec names, and the connection goes on."""
    command, flag, req_id, wanted, _ = WRITES[name]
    c = lenient_client(ref_client, writable_server)
    if flag is not None and not c.get_transmission_flags() & flag:
        verdict.info(f"{name} not advertised: nothing to send", only=True)
        return
    size = writable_export.size
    payload = b"\xa5" * 512 if command == Cmd.WRITE else None
    error = outcome(c, command, size, 512, payload=payload)
    verdict.info(f"{name} of 512 bytes at the end ({size}): {error_name(error)}")
    if command == Cmd.CACHE:
        pass                            # success allowed; an error value is judged below (CACHE-002)
    elif wanted == Err.ENOSPC and error in (Err.ENOSPC, Err.EINVAL):
        # Each of the two follows one section and breaks the other's letter: a spec tension either way.
        verdict.tension(req_id, "BSZ-034", texts=(ERR001_TEXT, BSZ034_TEXT),
                        observed=f"{name} past the end: {error_name(error)}")
    else:
        expect_error(verdict, error, req_id, wanted, f"{name} past the end")
        verdict.expect(error == Err.EINVAL, "BSZ-034", expected=f"{name} past the end: NBD_EINVAL",
                       observed=error_name(error))
    judge_error_value(verdict, error, name)
    c.pread(512, size - 512)            # still answered (the core checks the reply)


# A read-only export: "If NBD_FLAG_READ_ONLY is set the server MUST fail subsequent write operations"
# (WR-001) -- and the data stays as it was; it "SHOULD return NBD_EPERM if it receives a write or trim
# request on a read-only export" (ERR-005), WRITE_ZEROES likewise (WZ-031).  TRIM and WRITE_ZEROES are
# sent only where advertised (an unadvertised command is refused for that reason, EINVAL).  On a
# read-only server of its own: nbdkit in oldstyle mode aborts on such a WRITE (baseline), which must not
# take the shared server of the other tests down.
READ_ONLY = {
    "WRITE": (Cmd.WRITE, None, "ERR-005"),
    "TRIM": (Cmd.TRIM, TxFlag.SEND_TRIM, "ERR-005"),
    "WRITE_ZEROES": (Cmd.WRITE_ZEROES, TxFlag.SEND_WRITE_ZEROES, "WZ-031"),
}
READ_ONLY_EXPORT = ExportRequest(size=1 << 20, content="pattern", read_only=True)


@pytest.mark.req("WR-001", "ERR-005", "WZ-031", "ERR-007", "ERR-011")
def test_read_only_export(server_peer, fresh_export, ref_client, verdict):
    """WRITE, TRIM, WRITE_ZEROES on a read-only export fail (NBD_EPERM) and change nothing."""
    server = fresh_export(READ_ONLY_EXPORT)
    c = lenient_client(ref_client, server)
    if not c.is_read_only():
        verdict.fail("WR-001", expected="a read-only export advertised NBD_FLAG_READ_ONLY", observed="not set")
        return
    offset = 3 * 4096
    for name, (command, flag, req_id) in READ_ONLY.items():
        # Sent also where not advertised (a server need not offer TRIM or WRITE_ZEROES on a read-only
        # export): then NBD_EINVAL, "not offered", is as good an answer as NBD_EPERM.
        advertised = flag is None or bool(c.get_transmission_flags() & flag)
        payload = b"\x5a" * 4096 if command == Cmd.WRITE else None
        error = outcome(c, command, offset, 4096, payload=payload)
        verdict.info(f"{name} on a read-only export ({'advertised' if advertised else 'not advertised'}): "
                     f"{error_name(error)}")
        verdict.expect(error != 0, "WR-001", expected=f"{name} on a read-only export fails", observed="success")
        if error and advertised:
            expect_error(verdict, error, req_id, Err.EPERM, f"{name} on a read-only export")
        elif error:
            verdict.expect(error in (Err.EPERM, Err.EINVAL), req_id,
                           expected=f"unadvertised {name} on a read-only export: NBD_EPERM or NBD_EINVAL",
                           observed=error_name(error))
        judge_error_value(verdict, error, name)
        verdict.expect(c.pread(4096, offset) == expected_bytes(READ_ONLY_EXPORT, offset, 4096), "WR-001",
                       expected="the read-only export unchanged", observed=f"the range {name} targeted changed")


# "A server advertising NBD_FLAG_SEND_CACHE must reject CACHE requests carrying command flags it does not
# recognise" (CACHE-006), with NBD_EINVAL (ERR-009).
@pytest.mark.req("CACHE-006", "ERR-009")
@pytest.mark.feature("NBD_CMD_CACHE")
def test_cache_unknown_flag(server_peer, shared_server, shared_export, ref_client, verdict):
    """CACHE with an undefined flag bit is rejected."""
    c = lenient_client(ref_client, shared_server)
    verdict.timeline("NBD_CMD_CACHE", c.can_cache(), export=shared_export)
    if not c.can_cache():
        return
    error = outcome(c, Cmd.CACHE, 0, 4096, UNKNOWN_FLAG)
    verdict.info(f"CACHE with flag bit 15: {error_name(error)}")
    verdict.expect(error != 0, "CACHE-006", expected="CACHE with an unknown flag fails", observed="success")
    if error:
        expect_error(verdict, error, "ERR-009", Err.EINVAL, "CACHE with an unknown flag")
    still_serving(c, shared_export, verdict, "CACHE with an unknown flag")


# A server that does not advertise NBD_FLAG_SEND_FAST_ZERO "should fail with NBD_EINVAL if FAST_ZERO is set
# anyway" (WZ-026); succeeding would mean it supports the flag, which it then "MUST" advertise (WZ-001).
# Sent to a server of its own (fresh_export): nbdkit up to at least 1.46 aborts on it (an assertion in
# backend_zero), which must not take the shared server of the other tests down with it.
@pytest.mark.req("WZ-026", "WZ-001", "WZ-025")
@pytest.mark.feature("NBD_CMD_FLAG_FAST_ZERO")
def test_fast_zero_not_advertised(server_peer, writable_server, writable_export, fresh_export, ref_client, verdict):
    """FAST_ZERO sent to a server that does not advertise it: NBD_EINVAL, the data unchanged."""
    probe = ref_client(writable_server)
    if probe.can_fast_zero() or not probe.can_zero():
        verdict.not_applicable("NBD_FLAG_SEND_FAST_ZERO advertised (or WRITE_ZEROES not): the case does not arise")
    verdict.timeline("NBD_CMD_FLAG_FAST_ZERO", False, export=writable_export)
    server = fresh_export(size=1 << 20, content="pattern")
    c = lenient_client(ref_client, server)
    c.pwrite(b"\x77" * 4096, 8192)
    try:
        error = outcome(c, Cmd.WRITE_ZEROES, 8192, 4096, CmdFlag.FAST_ZERO)
    except ClientError as e:            # no reply at all: the server went away (nbdkit aborts, baseline)
        verdict.fail("WZ-026", expected="an NBD_EINVAL reply, the connection kept",
                     observed=f"no reply: {e}")
        return
    verdict.info(f"FAST_ZERO without NBD_FLAG_SEND_FAST_ZERO: {error_name(error)}")
    verdict.expect(error != 0, "WZ-001", expected="FAST_ZERO refused (or NBD_FLAG_SEND_FAST_ZERO advertised)",
                   observed="success while NBD_FLAG_SEND_FAST_ZERO is clear")
    expect_error(verdict, error, "WZ-026", Err.EINVAL, "FAST_ZERO without SEND_FAST_ZERO")
    # "A server not advertising SEND_FAST_ZERO should not fail WRITE_ZEROES with NBD_ENOTSUP" (WZ-025)
    verdict.expect(error != Err.ENOTSUP, "WZ-025", expected="no NBD_ENOTSUP without SEND_FAST_ZERO",
                   observed=error_name(error))
    if error:
        verdict.expect(c.pread(4096, 8192) == b"\x77" * 4096, "WZ-026",
                       expected="a refused WRITE_ZEROES changes nothing", observed="the range changed")


# "The server should map EDQUOT and EFBIG to NBD_ENOSPC" (ERR-002).  Only a backend that fails that way
# shows it: the reference server's exports can have one (a backend whose writes fail with EFBIG / EDQUOT);
# no other implementation lets the harness make its storage fail on purpose.
@pytest.mark.req("ERR-002", "WR-007")
@pytest.mark.parametrize("host_errno", ["EFBIG", "EDQUOT"])
def test_quota_errors_are_enospc(server_peer, tmp_path, ref_client, verdict, host_errno):
    """A WRITE failing with EFBIG or EDQUOT in the backend is answered NBD_ENOSPC."""
    import errno as _errno

    from nbdref.backends import BackendError, MemoryBackend
    from nbdref.server import Export, Server

    from suites.server._common import InProcessServer

    if server_peer.implementation != "nbdref":
        verdict.not_applicable(f"{server_peer.implementation}: the harness cannot make its storage fail "
                               "with EFBIG or EDQUOT")
    code = getattr(_errno, host_errno)

    class Full(MemoryBackend):
        def pwrite(self, offset: int, data: bytes | memoryview, *, fua: bool = False) -> None:
            raise BackendError(code, f"{host_errno} from the test backend")

    srv = Server([Export(name="exp", backend=Full(1 << 20))], persona=server_peer.persona,
                 unix=str(tmp_path / "q.sock"))
    srv.start()
    try:
        c = ref_client(InProcessServer(srv))
        error = outcome(c, Cmd.WRITE, 0, 4096, payload=b"\x01" * 4096)
        verdict.info(f"backend {host_errno}: {error_name(error)}")
        expect_error(verdict, error, "ERR-002", Err.ENOSPC, f"a WRITE failing with {host_errno}")
        verdict.expect(error in nbd_error_values(), "WR-007", expected="a defined NBD error value",
                       observed=error_name(error))
    finally:
        srv.stop(timeout=5)
