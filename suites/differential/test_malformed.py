"""Differential: requests the server cannot take at face value (wrong magic, an option in transmission,
a payload over the limit), sent alike to every server peer.

The spec gives a server no answer to give here: the client broke a mandatory rule, and "Either side MAY
initiate a hard disconnect if it detects a violation by the other party of a mandatory condition"
(DISC-017).  So every reaction is recorded (a close, an error reply, silence) and only two things are
judged: the server still serves the next connection, and a payload over the limit does not desynchronize
a session that goes on (a follow-up read must return the right bytes).
"""

from __future__ import annotations

import pytest
from nbdref import _wire as w
from nbdref._constants import Cmd, Magic, Opt

from suites.differential._probe import (
    HARD,
    ask,
    connect,
    disconnected,
    follow_up,
    raw_reaction,
    still_serves,
)

SECTION = "Differential: Request message"
MiB = 1 << 20
SECTOR = 512
DEFAULT_MAX_PAYLOAD = 1 << 25        # "a maximum payload size of at least 2^25" absent constraints (BSZ-007)

MAGICS = {
    # a magic no document defines
    "random": 0xDEADBEEF,
    # "The following magic values are reserved and must not be used for future protocol extensions":
    # the request magic used until Linux 2.1.116pre2
    "historic": Magic.HISTORIC_REQUEST,
    # nbd-server's transaction log marker, "never sent over the network"
    "tracelog": Magic.TRACELOG,
}


def _record(verdict, answer: str) -> None:
    verdict.info(answer, requirements=("DISC-017",), only=True)


def _header_reaction(ref_client, server, export, verdict, header: bytes) -> None:
    """Send a request header the server should not take, record its reaction (and, when it did not
    hang up, what a READ after it gets), then check that the server still serves a new client."""
    c = connect(ref_client, server)
    answer = raw_reaction(c, header)
    if answer != HARD:
        answer += follow_up(c, export)
    _record(verdict, answer)
    still_serves(ref_client, server, export)


@pytest.mark.req("DISC-017")
@pytest.mark.parametrize("magic", list(MAGICS))
def test_bad_request_magic(server_peer, shared_server, shared_export, ref_client, verdict, magic):
    """How does a server react to a 28-byte READ header whose magic is not NBD_REQUEST_MAGIC?"""
    _header_reaction(ref_client, shared_server, shared_export, verdict,
                     w.REQUEST.pack(MAGICS[magic], 0, Cmd.READ, 0x4E4244, 0, SECTOR))


# The extended request header (32 bytes, magic 0x21e41c71) is only valid once NBD_OPT_EXTENDED_HEADERS
# was acknowledged (ext-header draft); the client here never asked for it.
@pytest.mark.req("DISC-017")
def test_extended_request_unnegotiated(server_peer, shared_server, shared_export, ref_client, verdict):
    """How does a server react to an extended (32-byte) request header it never agreed to?"""
    _header_reaction(ref_client, shared_server, shared_export, verdict,
                     w.EXTENDED_REQUEST.pack(Magic.EXTENDED_REQUEST, 0, Cmd.READ, 0x4E4244, 0, SECTOR))


# "NBD_OPT_GO twice": once NBD_OPT_GO was acknowledged the session is in transmission, and "the client
# MUST NOT send any further option requests" (GO-026): the server reads the option as a request header.
@pytest.mark.req("DISC-017")
def test_option_after_go(server_peer, shared_server, shared_export, ref_client, verdict):
    """How does a server react to a second NBD_OPT_GO sent after the first one succeeded?"""
    c = connect(ref_client, shared_server)
    name = b"exp"
    data = len(name).to_bytes(4, "big") + name + (0).to_bytes(2, "big")
    # 25 bytes, not a request's 28: whatever the server makes of them, the stream is out of step, so no
    # follow-up read on this connection
    answer = raw_reaction(c, w.OPTION_HEADER.pack(Magic.IHAVEOPT, Opt.GO, len(data)) + data)
    _record(verdict, answer)
    still_serves(ref_client, shared_server, shared_export)


# An NBD_CMD_WRITE longer than the maximum payload (the advertised one, else 2^25): "A client MUST NOT
# request a WRITE ... longer than the maximum payload size" (BSZ-025); "either side MAY hard-disconnect"
# on a payload large enough to be a denial of service (BSZ-023), and above 2^25 it may be one (BSZ-024
# protects only payloads up to 2^25).  Inside a fresh 64 MiB export, so it is oversize and nothing else.
@pytest.mark.req("BSZ-023")
def test_oversize_write(server_peer, fresh_export, ref_client, verdict):
    """How does a server answer an NBD_CMD_WRITE 4 KiB over its maximum payload?"""
    server = fresh_export(size=64 * MiB, content="zero")
    c = connect(ref_client, server, timeout=20.0)
    limit = c.get_block_size("maximum") or DEFAULT_MAX_PAYLOAD
    length = limit + 4096
    if length > server.export.size:
        verdict.not_applicable(f"advertises a maximum payload of {limit}: no WRITE inside the 64 MiB export "
                               "is over it")
    answer = ask(c, server.export, Cmd.WRITE, 0, length, payload=bytes(length))
    prefix = f"max {limit}: " if c.get_block_size("maximum") else "no max: "
    verdict.info(prefix + answer, requirements=("BSZ-023",), only=True)
    if not disconnected(answer):
        verdict.expect("wrong data" not in answer and "no answer" not in answer, "BSZ-023",
                       expected="the session goes on in step (or ends)", observed=answer)
    else:
        still_serves(ref_client, server, server.export)
