"""The reference client, strict, against every Docker server peer of matrix.yaml (4 servers x 4 suites).

One writable server per peer and module (``peer``); every test opens its own strict connection and
exercises what the peer advertises: NBD_OPT_GO with the NBD_INFO_* replies, NBD_OPT_LIST, structured
replies, extended headers, base:allocation block status (with and without REQ_ONE) and each command
the transmission flags announce.  Writes go to a region of their own, so test order does not matter.
A MUST-level breach by the peer fails the test (the core raises or records it); weaker ones warn.
"""

from __future__ import annotations

import contextlib
import errno
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from nbdref._constants import Cmd, TxFlag
from nbdref._strict import Strictness
from nbdref.client import Client, ClientError, CmdFlag

from fixtures.exports import ExportRequest, expected_bytes
from fixtures.launch import export_workdir, start_server
from fixtures.launchers.base import PeerUnsupported, RunningServer
from fixtures.peerspec import PeerSpec
from fixtures.timeline import parse_version
from tests.interop.helpers import Observer, assert_clean, flag_names, observer_for, require_docker

MiB = 1 << 20
EXPORT = ExportRequest(name="exp", size=4 * MiB, content="pattern", description="nbd interop export")
REGION = 64 * 1024                      # each writing test owns [index * REGION, (index + 1) * REGION)
BASE = "base:allocation"
# base:allocation: "NBD_STATE_HOLE (bit 0)", "NBD_STATE_ZERO (bit 1)"; bits 2-31 reserved (BS-023).
HOLE, ZERO = 1, 2


@dataclass
class Peer:
    """A running server peer and what a first connection learned about it."""

    spec: PeerSpec
    server: RunningServer


@pytest.fixture(scope="module")
def peer(docker_server_spec: PeerSpec) -> Iterator[Peer]:
    require_docker(docker_server_spec)
    workdir = export_workdir(docker_server_spec.implementation)
    try:
        server = start_server(docker_server_spec, EXPORT, workdir=workdir)
    except PeerUnsupported as e:
        pytest.skip(str(e))
    with server:
        yield Peer(docker_server_spec, server)


@pytest.fixture
def observe(request: pytest.FixtureRequest, peer: Peer) -> Observer:
    return observer_for(request, peer.spec)


@contextlib.contextmanager
def connected(peer: Peer, *, setup: Callable[[Client], Any] | None = None, go: bool = True,
              allowed: frozenset[str] = frozenset()) -> Iterator[Client]:
    """A strict reference client connected to ``peer`` (set up by ``setup`` first); on the way out
    the connection is closed and its violations judged (``allowed``: ids the test judges itself)."""
    client = Client(timeout=10)
    if setup is not None:
        setup(client)
    if not go:
        client.set_opt_mode(True)
    try:
        client.connect_uri(peer.server.uri)
        yield client
    finally:
        violations = client.violations
        client.close()
    assert_clean(peer.spec.id, violations, allowed=allowed)


def region(index: int) -> int:
    return index * REGION


# ---------------------------------------------------------------------------------------------- handshake

# NBD_OPT_GO: "the server MUST send at least one NBD_REP_INFO of type NBD_INFO_EXPORT" (GO-012);
# NBD_INFO_NAME / NBD_INFO_DESCRIPTION lengths "MUST" be at least 2 (GO-034/035) and
# NBD_INFO_BLOCK_SIZE's values obey the BSZ rules: the core checks all of them on every reply.
@pytest.mark.req("GO-012", "GO-034", "GO-035", "BSZ-003")
def test_go_with_info_replies(peer: Peer, observe: Observer) -> None:
    with connected(peer, setup=lambda c: c.set_full_info(True)) as c:
        assert c.get_size() == EXPORT.size
        sizes = tuple(c.get_block_size(i) for i in range(3))
        name = c.get_canonical_export_name()
        try:
            description: str | None = c.get_export_description()
        except ClientError:
            description = None
        flags = TxFlag(c.get_transmission_flags())
        observe("protocol", c.get_protocol())
        observe("INFO_BLOCK_SIZE", sizes if any(sizes) else "none")
        observe("INFO_NAME", repr(name))
        observe("INFO_DESCRIPTION", repr(description) if description is not None else "none")
        observe("flags", flag_names(flags))
        if any(sizes):
            minimum, preferred, _maximum = sizes
            # "The preferred block size MUST be a power of 2 and at least as large as the minimum"
            assert minimum <= preferred and preferred & (preferred - 1) == 0
        if description is not None:
            # Every adapter that can pass a description passes EXPORT.description: what comes back
            # must be that text, not some other string.
            assert description == EXPORT.description
        assert name in ("exp", "")
        assert c.pread(4096, 8192) == expected_bytes(EXPORT, 8192, 4096)


# NBD_OPT_LIST: "Every implementation MUST support NBD_OPT_LIST" (INTEROP-008): a list of exports, or an
# error reply (a server may restrict listing); the core checks the framing.  Every name listed must be an
# export the server really serves: NBD_OPT_GO on it gives our export.  (nbdkit's file plugin serves any
# name and lists its default export "", not "exp": that is honest, not a breach.)
@pytest.mark.req("INTEROP-008", "OPT-017", "GO-012")
def test_list(peer: Peer, observe: Observer) -> None:
    with connected(peer, go=False) as c:
        try:
            exports = c.opt_list()
        except ClientError as e:
            observe("LIST", f"refused: {e}")
            pytest.skip(f"{peer.spec.id} refused NBD_OPT_LIST: {e}")
        names = [name for name, _ in exports]
        observe("LIST", names)
        assert names, f"{peer.spec.id} listed no export at all"
        c.opt_abort()
    for name in names[:4]:
        with connected(peer, setup=lambda cl, n=name: cl.set_export_name(n)) as c:
            assert c.get_size() == EXPORT.size, f"{peer.spec.id} listed {name!r}, which is not our export"


# Peers seen to answer NBD_OPT_INFO differently from the NBD_OPT_GO that follows it: implementation ->
# first version.  proto.md: between a successful NBD_OPT_INFO and "an NBD_OPT_GO with the same parameters
# ... the server MUST reply with the same set of information, such as transmission flags" (GO-022).
# - nbd-server (3.21 to 3.27) sends NBD_INFO_EXPORT with size 0 to NBD_OPT_INFO, the real size to GO.
# - qemu >= 8.2 with extended headers sets NBD_FLAG_BLOCK_STATUS_PAYLOAD in the INFO reply and clears it
#   in the GO reply when no meta context was set: it follows the ext-header draft's "SHOULD NOT advertise
#   this bit in response to NBD_OPT_GO if the client does not negotiate metacontexts" (EXT-012) but
#   could satisfy both rules by leaving the bit out of the INFO reply too; GO-022 is a MUST.
INFO_GO_BREAKERS: dict[str, tuple[int, ...]] = {"nbd-server": (3, 21), "qemu-nbd": (8, 2),
                                                 "qemu-storage-daemon": (8, 2)}


@pytest.mark.req("GO-022", "GO-012")
def test_info_then_go(peer: Peer, observe: Observer) -> None:
    client = Client(timeout=10, strictness=Strictness.lenient())
    with client as c:
        c.set_opt_mode(True)
        c.connect_uri(peer.server.uri)
        c.opt_info()
        info = (c.get_size(), flag_names(c.get_transmission_flags()))
        c.opt_go()
        go = (c.get_size(), flag_names(c.get_transmission_flags()))
        violations = list(c.violations)
    ids = {v.req_id for v in violations}
    first = INFO_GO_BREAKERS.get(peer.spec.implementation)
    if first is not None and parse_version(peer.spec.version) >= first:
        observe("INFO vs GO", f"BROKEN (GO-022): INFO {info} GO {go}")
        assert info != go and "GO-022" in ids, "INFO and GO now agree: the bug is fixed, update INFO_GO_BREAKERS"
        return
    observe("INFO vs GO", "same")
    assert info == go, f"{peer.spec.id}: GO-022: INFO said {info}, GO said {go}"
    assert_clean(peer.spec.id, violations)


# The ext-header draft: servers "SHOULD NOT advertise this bit in response to NBD_OPT_GO if the client
# does not negotiate metacontexts" (EXT-012): a rule about the GO reply only.  An NBD_OPT_INFO reply
# carrying NBD_FLAG_BLOCK_STATUS_PAYLOAD (qemu >= 8.2 does) is no EXT-012 breach.
@pytest.mark.req("EXT-011", "EXT-012")
def test_info_reply_may_offer_block_status_payload(peer: Peer) -> None:
    client = Client(timeout=10, strictness=Strictness.lenient())
    with client as c:
        c.set_opt_mode(True)
        c.connect_uri(peer.server.uri)
        c.opt_info()
        offered = bool(c.get_transmission_flags() & TxFlag.BLOCK_STATUS_PAYLOAD)
        ids = {v.req_id for v in c.violations}
    if not offered:
        pytest.skip(f"{peer.spec.id} sets no BLOCK_STATUS_PAYLOAD in its NBD_OPT_INFO reply")
    assert "EXT-012" not in ids, f"{peer.spec.id}: EXT-012 applied to an NBD_OPT_INFO reply ({sorted(ids)})"


# ---------------------------------------------------------------------------------------------- replies

# "If structured replies were not negotiated, every request must be answered with a simple reply"
# (SR-002) and "NBD_CMD_READ must never get a simple reply" once they are (SR-006): the core checks.
@pytest.mark.req("SR-002", "SR-006", "RD-007")
@pytest.mark.parametrize("structured", [False, True], ids=["simple", "structured"])
def test_reply_kinds(peer: Peer, observe: Observer, structured: bool) -> None:
    def setup(c: Client) -> None:
        c.set_request_extended_headers(False)
        c.set_request_structured_replies(structured)

    with connected(peer, setup=setup) as c:
        negotiated = c.get_structured_replies_negotiated()
        if structured:
            observe.judge("NBD_OPT_STRUCTURED_REPLY", negotiated)
        else:
            assert not negotiated
        offset = EXPORT.size - 3 * REGION
        assert c.pread(3 * REGION, offset) == expected_bytes(EXPORT, offset, 3 * REGION)
        if not negotiated:
            # "NBD_FLAG_SEND_DF ... MUST be clear if structured replies were not negotiated" (RD-002)
            assert not c.can_df()


# Extended headers draft: once negotiated, "every reply must be an extended reply chunk" (EXT-006) whose
# "offset field must equal the request offset" (EXT-007), and a WRITE "MUST" carry PAYLOAD_LEN (EXT-002,
# ours): read, write, zero and block status exercise both directions.
@pytest.mark.req("EXT-005", "EXT-006", "EXT-007", "EXT-011", "EXT-016")
def test_extended_headers(peer: Peer, observe: Observer) -> None:
    def setup(c: Client) -> None:
        c.add_meta_context(BASE)

    with connected(peer, setup=setup) as c:
        negotiated = c.get_extended_headers_negotiated()
        observe.judge("NBD_OPT_EXTENDED_HEADERS", negotiated)
        if not negotiated:
            pytest.skip(f"{peer.spec.id} did not negotiate extended headers")
        offset = region(1)
        assert c.pread(REGION, offset) == expected_bytes(EXPORT, offset, REGION)
        data = secrets.token_bytes(REGION)
        c.pwrite(data, offset)
        assert c.pread(REGION, offset) == data
        if c.can_zero():
            c.zero(4096, offset)
            assert c.pread(4096, offset) == bytes(4096)
        if c.can_meta_context(BASE):
            extents = collect_extents(c, EXPORT.size, 0)
            assert extents[BASE], "no base:allocation extents over extended headers"


# ---------------------------------------------------------------------------------------------- block status

def collect_extents(c: Client, count: int, offset: int, flags: int = 0) -> dict[str, list[tuple[int, int]]]:
    """context name -> [(length, flags)] of one NBD_CMD_BLOCK_STATUS."""
    seen: dict[str, list[tuple[int, int]]] = {}

    def callback(name: str, _offset: int, entries: list[int], _err: int) -> None:
        seen.setdefault(name, []).extend(zip(entries[0::2], entries[1::2], strict=True))

    c.block_status(count, offset, callback, flags)
    return seen


# "A successful NBD_CMD_BLOCK_STATUS must be answered with one NBD_REPLY_TYPE_BLOCK_STATUS chunk per
# selected context" (BS-002); "With NBD_CMD_FLAG_REQ_ONE the server must not describe more than one
# extent" (BS-054) that "must not exceed the request length" (BS-069); the core checks these.
@pytest.mark.req("BS-002", "BS-054", "BS-058", "BS-060", "BS-069", "BS-023")
@pytest.mark.parametrize("headers", ["compact", "extended"])
def test_block_status_base_allocation(peer: Peer, observe: Observer, headers: str) -> None:
    def setup(c: Client) -> None:
        c.set_request_extended_headers(headers == "extended")
        c.add_meta_context(BASE)

    with connected(peer, setup=setup) as c:
        if headers == "extended" and not c.get_extended_headers_negotiated():
            pytest.skip(f"{peer.spec.id} has no extended headers")
        selected = c.can_meta_context(BASE)
        if headers == "compact":
            observe.judge("NBD_CMD_BLOCK_STATUS", selected)
        if not selected:
            pytest.skip(f"{peer.spec.id} did not select {BASE}")
        # A data region we just wrote is not a hole (BS-018 would make ENOSPC on it illegal).
        offset = region(2 if headers == "compact" else 3)
        if not c.is_read_only():
            c.pwrite(b"\xa5" * REGION, offset)
        whole = collect_extents(c, EXPORT.size, 0)[BASE]
        observe(f"BLOCK_STATUS {headers}", f"{len(whole)} extent(s)")
        assert sum(length for length, _ in whole) <= EXPORT.size
        assert all(length > 0 for length, _ in whole)
        one = collect_extents(c, REGION, offset, CmdFlag.REQ_ONE)[BASE]
        assert len(one) == 1 and 0 < one[0][0] <= REGION
        assert not one[0][1] & HOLE, f"{peer.spec.id} reports written data at {offset} as a hole"


# ---------------------------------------------------------------------------------------------- commands

@dataclass(frozen=True)
class Command:
    name: str
    flag: TxFlag                         # what advertises it
    run: Callable[[Client, int], None]   # do it on the region at the offset, and check the outcome


def _write(c: Client, offset: int, flags: int = 0) -> None:
    data = secrets.token_bytes(REGION)
    c.pwrite(data, offset, flags)
    assert c.pread(REGION, offset) == data


def _zero(c: Client, offset: int, flags: int = 0) -> None:
    c.pwrite(b"\xff" * REGION, offset)
    try:
        c.zero(REGION, offset, flags)
    except ClientError as e:
        # FAST_ZERO: "if zeroing cannot be faster than an equivalent write the server must fail quickly
        # with NBD_ENOTSUP" (WZ-008): that failure is a correct answer, and nothing was zeroed.
        if flags & CmdFlag.FAST_ZERO and e.errno == errno.ENOTSUP:
            return
        raise
    assert c.pread(REGION, offset) == bytes(REGION)


def _trim(c: Client, offset: int) -> None:
    # "The server may discard the trimmed range but is not required to" (TRIM-001): only success counts.
    c.trim(REGION, offset)


COMMANDS = [
    Command("WRITE", TxFlag.HAS_FLAGS, _write),
    Command("WRITE+FUA", TxFlag.SEND_FUA, lambda c, o: _write(c, o, CmdFlag.FUA)),
    Command("FLUSH", TxFlag.SEND_FLUSH, lambda c, o: (_write(c, o), c.flush())[0]),
    Command("TRIM", TxFlag.SEND_TRIM, _trim),
    Command("WRITE_ZEROES", TxFlag.SEND_WRITE_ZEROES, _zero),
    Command("WRITE_ZEROES+NO_HOLE", TxFlag.SEND_WRITE_ZEROES, lambda c, o: _zero(c, o, CmdFlag.NO_HOLE)),
    Command("WRITE_ZEROES+FAST_ZERO", TxFlag.SEND_FAST_ZERO, lambda c, o: _zero(c, o, CmdFlag.FAST_ZERO)),
    Command("CACHE", TxFlag.SEND_CACHE, lambda c, o: c.cache(REGION, o)),
]


# Each advertised command succeeds on a writable export and does what it says; a flag the server
# advertised "MUST" be accepted (FUA-002, WZ-007 for NO_HOLE, CACHE-006).  READ+DF: test_read_df.
@pytest.mark.req("WR-005", "FUA-002", "FLUSH-002", "WZ-007", "WZ-008", "CACHE-003", "TRIM-001")
@pytest.mark.parametrize("index", range(len(COMMANDS)), ids=[cmd.name for cmd in COMMANDS])
def test_advertised_command(peer: Peer, observe: Observer, index: int) -> None:
    command = COMMANDS[index]
    with connected(peer) as c:
        if not c.get_transmission_flags() & command.flag:
            observe(command.name, "not advertised")
            pytest.skip(f"{peer.spec.id} does not advertise {command.flag.name}")
        command.run(c, region(8 + index))
        observe(command.name, "ok")


# Peers seen to break the DF rules, from this version on: (implementation, first version) -> ids.
# nbd-server 3.26 and 3.27 advertise NBD_FLAG_SEND_DF but fail every DF read, even 512 bytes, with
# NBD_EINVAL in a *simple* reply.  proto.md: with structured replies the server "MUST NOT use a simple
# reply for NBD_CMD_READ (even for the case of an early NBD_EINVAL due to bad flags)" (SR-006), and "the
# server MUST support unfragmented reads in which the client's request length does not exceed 65,536
# bytes" (RD-050).  When a fixed release lands, this test fails for it: move the bound up.
DF_BREAKERS: dict[str, tuple[int, ...]] = {"nbd-server": (3, 26)}


def _breaks_df(spec: PeerSpec) -> bool:
    first = DF_BREAKERS.get(spec.implementation)
    return first is not None and parse_version(spec.version) >= first


# NBD_CMD_FLAG_DF: "the server MUST send at most one content chunk" and "MUST support unfragmented reads
# in which the client's request length does not exceed 65,536 bytes" (RD-050): a lenient client records
# what the peer does, then the verdict names the exact ids.
@pytest.mark.req("RD-001", "RD-050", "SR-006")
def test_read_df(peer: Peer, observe: Observer) -> None:
    client = Client(timeout=10, strictness=Strictness.lenient())
    with client as c:
        c.connect_uri(peer.server.uri)
        if not c.can_df():
            observe("READ+DF", "not advertised")
            pytest.skip(f"{peer.spec.id} does not advertise SEND_DF")
        offset = region(7)
        try:
            data: bytes | None = c.pread(REGION, offset, CmdFlag.DF)
            failure = None
        except ClientError as e:
            data, failure = None, e
        ids = {v.req_id for v in c.violations}
    if _breaks_df(peer.spec):
        observe("READ+DF", f"BROKEN: {failure}; violations {sorted(ids)}")
        assert failure is not None and failure.errno == errno.EINVAL, "the DF bug is fixed: update DF_BREAKERS"
        assert "SR-006" in ids, f"expected SR-006 (simple reply to a READ), saw {sorted(ids)}"
        return
    observe("READ+DF", "ok" if failure is None else f"failed: {failure}")
    assert failure is None, f"{peer.spec.id} failed a {REGION}-byte DF read (RD-050): {failure}"
    assert data == expected_bytes(EXPORT, offset, REGION)
    assert_clean(peer.spec.id, client.violations)


# Several requests in flight, answered in any order and matched by cookie: "A structured reply may span
# several chunks sharing one cookie" (SR-009); the core pairs every reply with its request.
@pytest.mark.req("SR-009", "RD-007")
def test_requests_in_flight(peer: Peer) -> None:
    with connected(peer) as c:
        buffers = [bytearray(REGION) for _ in range(8)]
        offsets = [EXPORT.size - (i + 1) * REGION for i in range(8)]
        cookies = [c.aio_pread(buf, off) for buf, off in zip(buffers, offsets, strict=True)]
        for cookie in cookies:
            c.wait(cookie)
        for buf, off in zip(buffers, offsets, strict=True):
            assert bytes(buf) == expected_bytes(EXPORT, off, REGION)


def test_commands_table_covers_every_data_command() -> None:
    """Every transmission-phase data command of constants.yaml is exercised above (or by block status)."""
    names = {cmd.name.split("+")[0] for cmd in COMMANDS} | {"READ", "BLOCK_STATUS"}
    assert {c.name for c in Cmd} - {"DISC", "RESIZE"} <= names
