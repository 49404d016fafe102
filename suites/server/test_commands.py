"""Transmission: each advertised command succeeds on a writable export and does what it says.

Whether a command is advertised is judged against the timeline *and* the peer's configuration
(fixtures/expectations.py): nbd-server advertises FLUSH, FUA and TRIM only when configured to.
"""

from __future__ import annotations

import errno
import secrets
from collections.abc import Callable
from dataclasses import dataclass

import pytest
from nbdref._constants import TxFlag
from nbdref.client import ClientError, CmdFlag

from suites.server._common import REGION

SECTION = "Transmission: request types"


@dataclass(frozen=True)
class Command:
    name: str
    flag: TxFlag                         # what advertises it
    feature: str | None                  # timeline feature (None: always present)
    run: Callable[..., None]             # do it on the region at the offset, and check the outcome
    reqs: tuple[str, ...] = ()           # ids this command's run observes of the server


def _write(c, verdict, offset: int, flags: int = 0) -> None:
    data = secrets.token_bytes(REGION)
    c.pwrite(data, offset, flags)
    verdict.expect(c.pread(REGION, offset) == data, "WR-005", expected="the written data reads back",
                   observed="read back differs from what was written")


def _zero(c, verdict, offset: int, flags: int = 0) -> None:
    c.pwrite(b"\xff" * REGION, offset)
    try:
        c.zero(REGION, offset, flags)
    except ClientError as e:
        # FAST_ZERO: "if zeroing cannot be faster than an equivalent write the server must fail quickly
        # with NBD_ENOTSUP" (WZ-008): that failure is a correct answer, and nothing was zeroed.
        if flags & CmdFlag.FAST_ZERO and e.errno == errno.ENOTSUP:
            return
        raise
    verdict.expect(c.pread(REGION, offset) == bytes(REGION), "WZ-012", "WZ-017",
                   expected="the zeroed range reads back as zeroes", observed="other bytes")


def _trim(c, verdict, offset: int) -> None:
    # "The server may discard the trimmed range but is not required to" (TRIM-001): only success counts.
    c.trim(REGION, offset)


def _cache(c, verdict, offset: int) -> None:
    # "CACHE (even a failed one) must not change the semantics of later reads and writes" (CACHE-003)
    before = c.pread(REGION, offset)
    try:
        c.cache(REGION, offset)
    except ClientError as e:
        verdict.info(f"CACHE failed: {e}")
    verdict.expect(c.pread(REGION, offset) == before, "CACHE-003", expected="the same data after CACHE",
                   observed="other bytes")
    data = secrets.token_bytes(REGION)
    c.pwrite(data, offset)
    verdict.expect(c.pread(REGION, offset) == data, "CACHE-003", expected="a WRITE after CACHE reads back",
                   observed="other bytes")


COMMANDS = [
    # "The server must write the data before sending the reply" (WR-005), seen by reading back; a flag
    # the server advertised must be accepted: FUA (FUA-002), NO_HOLE (WZ-007); WRITE_ZEROES "must zero the
    # range before sending the reply" (WZ-012) and it "must read back as zeroes" (WZ-017); FAST_ZERO
    # zeroes or fails fast with NBD_ENOTSUP (WZ-008/022), and "NBD_FLAG_SEND_FAST_ZERO MUST be clear if
    # NBD_FLAG_SEND_WRITE_ZEROES is clear" (WZ-002, the core on the flags); FLUSH (FLUSH-002); CACHE changes no later read
    # (CACHE-003).  TRIM only has to succeed ("may discard", a MAY): its marker is HAS_FLAGS (CMD-009),
    # which every connection checks.
    Command("WRITE", TxFlag.HAS_FLAGS, None, _write, ("WR-005",)),
    Command("WRITE+FUA", TxFlag.SEND_FUA, "NBD_CMD_FLAG_FUA", lambda c, v, o: _write(c, v, o, CmdFlag.FUA),
            ("WR-005", "FUA-002")),
    Command("FLUSH", TxFlag.SEND_FLUSH, "NBD_CMD_FLUSH", lambda c, v, o: (_write(c, v, o), c.flush())[0],
            ("FLUSH-002",)),
    Command("TRIM", TxFlag.SEND_TRIM, "NBD_CMD_TRIM", _trim, ("CMD-009",)),
    Command("WRITE_ZEROES", TxFlag.SEND_WRITE_ZEROES, "NBD_CMD_WRITE_ZEROES", _zero, ("WZ-012", "WZ-017")),
    Command("WRITE_ZEROES+NO_HOLE", TxFlag.SEND_WRITE_ZEROES, "NBD_CMD_FLAG_NO_HOLE",
            lambda c, v, o: _zero(c, v, o, CmdFlag.NO_HOLE), ("WZ-007", "WZ-012")),
    Command("WRITE_ZEROES+FAST_ZERO", TxFlag.SEND_FAST_ZERO, "NBD_CMD_FLAG_FAST_ZERO",
            lambda c, v, o: _zero(c, v, o, CmdFlag.FAST_ZERO), ("WZ-008", "WZ-022", "WZ-002")),
    Command("CACHE", TxFlag.SEND_CACHE, "NBD_CMD_CACHE", _cache, ("CACHE-003",)),
]


# Each advertised command succeeds on a writable export and does what it says; a flag the server
# advertised "MUST" be accepted (FUA-002, WZ-007 for NO_HOLE, CACHE-006).  READ+DF: test_read_df.
@pytest.mark.parametrize("index", [pytest.param(i, id=cmd.name, marks=[pytest.mark.req("CMD-007", *cmd.reqs)] +
                                                 ([pytest.mark.feature(cmd.feature)] if cmd.feature else []))
                                   for i, cmd in enumerate(COMMANDS)])
def test_advertised_command(server_peer, writable_server, writable_export, region, ref_client, verdict, index):
    """The command is advertised as the timeline and configuration expect, and works when it is."""
    command = COMMANDS[index]
    c = ref_client(writable_server)
    advertised = bool(c.get_transmission_flags() & command.flag)
    if command.feature:
        verdict.timeline(command.feature, advertised, export=writable_export)
    if not advertised:
        if not command.feature:
            verdict.fail("CMD-009", expected="NBD_FLAG_HAS_FLAGS", observed="not set")
        return
    # "The server must not set a transmission flag for a feature it does not support" (CMD-007): what it
    # advertised works.
    failure = ""
    try:
        command.run(c, verdict, region(REGION))
    except ClientError as e:
        if e.errno is None:
            raise
        failure = str(e)
    verdict.expect(not failure, "CMD-007", *command.reqs, expected=f"the advertised {command.name} works",
                   observed=failure)
