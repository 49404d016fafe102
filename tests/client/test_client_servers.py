"""The reference client against real host servers: qemu-nbd 7.2, nbdkit 1.32, nbd-server 3.24.

Each test starts its own server (a few ms over a Unix socket) and stops it, even on failure.  The client
must record zero violations against these servers, except where a comment quotes the spec sentence the
server breaks.
"""

from __future__ import annotations

import dataclasses
import errno
from collections.abc import Iterator
from pathlib import Path

import pytest
from nbdref.client import Client, ClientError, CmdFlag, RemoteProtocolError, Strict

from fixtures.exports import ExportRequest
from fixtures.launchers.base import RunningServer
from fixtures.tls_material import TlsMaterial
from tests.helpers.servers import start_host

SIZE = 4 << 20
# A 4 MiB disk with a recognisable first and last sector; the rest is a hole.
DISK = ExportRequest(size=SIZE, writes=((0, b"\x01" * 512), (SIZE - 512, b"\x02" * 512)))
OPTIONS: dict[str, dict[str, str]] = {
    "qemu-nbd": {},
    # The exportname filter makes nbdkit serve only "exp", like the other two, and list it.
    "nbdkit": {"filters": "exportname", "plugin_args": "exportname=exp exportname-strict=true exportname-list=explicit"},
    # Switch on what nbd-server 3.24 can do but does not advertise by default.
    "nbd-server": {"export_config": "flush = true; fua = true; trim = true"},
}
SERVERS = sorted(OPTIONS)
# What each host version negotiates (timeline: structured replies came to nbd-server in 3.25).
STRUCTURED = {"qemu-nbd": True, "nbdkit": True, "nbd-server": False}
ADVERTISED = {
    "qemu-nbd": {"fua", "flush", "zero", "fast_zero", "trim", "cache", "df"},
    "nbdkit": {"fua", "flush", "zero", "trim", "cache", "df"},  # the file plugin: no fast zero in 1.32
    "nbd-server": {"fua", "flush", "zero", "trim"},  # no structured replies, so no DF; no cache
}




def start(name: str, workdir: Path, export: ExportRequest = DISK, **kw: object) -> RunningServer:
    """``name`` on the host with this file's options; ``kw``: more options, or ``tls=`` material."""
    return start_host(name, export, workdir=workdir, **{**OPTIONS[name], **kw})  # type: ignore[arg-type]


def name_of(server: RunningServer) -> str:
    return str(server.spec.implementation)


@pytest.fixture(params=SERVERS)
def server(request: pytest.FixtureRequest, workdir: Path) -> Iterator[RunningServer]:
    with start(request.param, workdir) as running:
        yield running


def connect(uri: str, **settings: object) -> Client:
    client = Client(timeout=10)
    for name, value in settings.items():
        getattr(client, f"set_{name}")(value)
    client.connect_uri(uri)
    return client


def test_handshake(server: RunningServer) -> None:
    with connect(server.uri) as c:
        assert c.get_protocol() == "newstyle-fixed"
        assert c.get_size() == SIZE
        assert c.get_structured_replies_negotiated() is STRUCTURED[name_of(server)]
        assert c.get_extended_headers_negotiated() is False  # none of these versions has them
        assert c.get_tls_negotiated() is False
        assert not c.is_read_only()
        assert c.pread(512, 0) == b"\x01" * 512
        assert c.pread(512, SIZE - 512) == b"\x02" * 512
        assert c.violations == []


def test_every_advertised_command(server: RunningServer) -> None:
    with connect(server.uri) as c:
        done = []
        c.pwrite(b"a" * 4096, 8192)
        assert c.pread(4096, 8192) == b"a" * 4096
        if c.can_fua():
            c.pwrite(b"b" * 512, 0, CmdFlag.FUA)
            assert c.pread(512, 0) == b"b" * 512
            done.append("fua")
        if c.can_flush():
            c.flush()
            done.append("flush")
        if c.can_zero():
            c.zero(4096, 8192)
            assert c.pread(4096, 8192) == bytes(4096)
            done.append("zero")
            if c.can_fast_zero():
                try:
                    c.zero(4096, 8192, CmdFlag.FAST_ZERO)
                except ClientError as exc:  # "the server MUST fail quickly with NBD_ENOTSUP" if slow
                    assert exc.errno == errno.ENOTSUP
                done.append("fast_zero")
        if c.can_trim():
            c.trim(4096, 65536)
            done.append("trim")
        if c.can_cache():
            c.cache(4096, 0)
            done.append("cache")
        if c.can_df() and c.get_structured_replies_negotiated():
            assert c.pread(4096, 8192, CmdFlag.DF) == bytes(4096)
            done.append("df")
        assert c.violations == []
    # What these versions advertise (nbd-server with flush/fua/trim set in its config): a change
    # here means the advertisement changed, which a conformance run should notice.
    assert set(done) == ADVERTISED[name_of(server)], done


def test_many_requests_in_flight(server: RunningServer) -> None:
    with connect(server.uri) as c:
        pattern = bytes(range(256)) * 256  # 64 KiB
        for i in range(8):
            c.pwrite(pattern[i:] + pattern[:i], i * 65536)
        buffers = [bytearray(65536) for _ in range(8)]
        cookies = [c.aio_pread(buf, i * 65536) for i, buf in enumerate(buffers)]
        assert c.aio_in_flight() == 8
        for cookie in reversed(cookies):
            c.wait(cookie)
        assert c.aio_in_flight() == 0
        for i, buf in enumerate(buffers):
            assert buf == pattern[i:] + pattern[:i]
        assert c.violations == []


def test_read_past_end_fails_cleanly(server: RunningServer) -> None:
    with connect(server.uri, strict_mode=0) as c:  # lenient: let the request reach the server
        with pytest.raises(ClientError) as info:
            c.pread(4096, SIZE)
        assert info.value.errno in (errno.EINVAL, errno.ENOSPC, errno.EIO, errno.EOVERFLOW)
        assert c.pread(512, 0) == b"\x01" * 512  # the connection is still usable


def test_opt_mode_info_list_go(server: RunningServer) -> None:
    lenient = name_of(server) == "nbd-server"  # see below: it breaks GO-022, so let the client carry on
    with connect(server.uri, opt_mode=True, full_info=True, strict_mode=0 if lenient else Strict.ALL) as c:
        assert not c.aio_is_ready()
        exports = c.opt_list()
        assert server.export_name in [name for name, _ in exports]
        c.opt_info()
        info_size = c.get_size()
        c.opt_go()
        assert c.aio_is_ready()
        assert c.get_size() == SIZE
        assert c.pread(512, 0) == b"\x01" * 512
        if lenient:
            # Known quirk of nbd-server 3.24: NBD_INFO_EXPORT in reply to NBD_OPT_INFO says size 0, and the
            # NBD_OPT_GO right after it the real size.  proto.md: "If there are no intervening option
            # requests between a successful NBD_OPT_INFO ... and an NBD_OPT_GO with the same parameters
            # ..., then the server MUST reply with the same set of information" (GO-022).
            assert info_size == 0
            assert [v.req_id for v in c.violations] == ["GO-022"]
        else:
            assert info_size == SIZE
            assert c.violations == []


def test_nbd_server_info_then_go_is_fatal_when_strict(workdir: Path) -> None:
    # The same GO-022 breach under the default strictness (MUST is fatal): GO raises.
    with start("nbd-server", workdir) as server, connect(server.uri, opt_mode=True) as c:
        c.opt_info()
        with pytest.raises(RemoteProtocolError) as info:
            c.opt_go()
        assert info.value.violation is not None and info.value.violation.req_id == "GO-022"


def test_opt_abort(server: RunningServer) -> None:
    c = connect(server.uri, opt_mode=True)
    c.opt_abort()
    assert c.violations == []
    c.close()


def test_unknown_export_is_refused(server: RunningServer) -> None:
    client = Client(timeout=10)
    client.set_export_name("no-such-export")
    with pytest.raises(ClientError, match=r"NBD_REP_ERR|closed"):
        client.connect_uri(server.uri.replace(f"/{server.export_name}?", "/no-such-export?"))
    client.close()


@pytest.mark.parametrize("name", ["qemu-nbd", "nbdkit"])
def test_block_status_base_allocation(name: str, workdir: Path) -> None:
    sparse = ExportRequest(size=SIZE, writes=((1 << 20, b"x" * 65536),))  # a hole, 64 KiB of data, a hole
    with start(name, workdir, sparse) as server:
        c = Client(timeout=10)
        c.add_meta_context("base:allocation")
        c.connect_uri(server.uri)
        assert c.can_meta_context("base:allocation")
        seen: list[tuple[str, int, list[int]]] = []
        c.block_status(SIZE, 0, lambda ctx, off, entries, err: seen.append((ctx, off, entries)))
        assert seen and all(ctx == "base:allocation" and off == 0 for ctx, off, _ in seen)
        entries = seen[0][2]
        extents = list(zip(entries[0::2], entries[1::2], strict=True))
        # Walk the extents: the data range [1 MiB, 1 MiB + 64 KiB) must be reported as data (flags 0),
        # the start as a hole that reads as zeroes (HOLE|ZERO = 3).
        assert extents[0] == (1 << 20, 3)
        assert extents[1][1] == 0 and extents[1][0] >= 65536
        assert sum(length for length, _ in extents) <= SIZE
        assert c.violations == []
        c.close()


def test_qemu_allocation_depth_and_dirty_bitmap(workdir: Path) -> None:
    # An empty qcow2 with the persistent bitmap b0, then 64 KiB of 7s written at 64 KiB through qemu.
    image = ExportRequest(size=SIZE, image_format="qcow2", dirty_bitmaps=("b0",), allocation_depth=True,
                          writes=((65536, b"\x07" * 65536),))
    with start("qemu-nbd", workdir, image) as server:
        c = Client(timeout=10)
        c.set_opt_mode(True)
        c.connect_uri(server.uri)
        available = c.opt_list_meta_context([])
        assert {"base:allocation", "qemu:allocation-depth", "qemu:dirty-bitmap:b0"} <= set(available)
        for context in ("qemu:allocation-depth", "qemu:dirty-bitmap:b0"):
            c.add_meta_context(context)
        c.opt_go()
        assert c.can_meta_context("qemu:dirty-bitmap:b0") and c.can_meta_context("qemu:allocation-depth")
        seen: dict[str, list[int]] = {}
        c.block_status(SIZE, 0, lambda ctx, off, entries, err: seen.setdefault(ctx, entries))
        dirty = list(zip(seen["qemu:dirty-bitmap:b0"][0::2], seen["qemu:dirty-bitmap:b0"][1::2], strict=True))
        depth = list(zip(seen["qemu:allocation-depth"][0::2], seen["qemu:allocation-depth"][1::2], strict=True))
        # The 64 KiB written at 64 KiB is dirty (NBD_STATE_DIRTY = 1) and allocated at depth 1; the first
        # 64 KiB is clean and unallocated (depth 0).
        assert dirty[0] == (65536, 0) and dirty[1] == (65536, 1)
        assert depth[0] == (65536, 0) and depth[1] == (65536, 1)
        assert c.pread(4, 65536) == b"\x07" * 4
        assert c.violations == []
        c.close()


TLS_CASES = [
    ("qemu-nbd", "x509"),
    ("qemu-nbd", "psk"),
    ("nbdkit", "x509"),
    ("nbdkit", "psk"),
    ("nbd-server", "x509"),  # nbd-server has no PSK
]


@pytest.mark.parametrize(("name", "kind"), TLS_CASES, ids=[f"{n}-{k}" for n, k in TLS_CASES])
def test_tls(name: str, kind: str, workdir: Path, tls_material: TlsMaterial) -> None:
    # qemu-nbd and nbdkit also demand a client certificate (X.509); nbd-server's check is not wired up.
    export = dataclasses.replace(DISK, tls=kind, tls_verify_peer=kind == "x509" and name != "nbd-server")
    with start(name, workdir, export, tls=tls_material) as server:
        assert server.uri.startswith("nbds+unix://")
        with connect(server.uri) as c:
            assert c.get_tls_negotiated()
            assert c.pread(512, 0) == b"\x01" * 512
            c.pwrite(b"t" * 512, 4096)
            assert c.pread(512, 4096) == b"t" * 512
            assert c.violations == []
        # A plaintext client is refused: these servers answer GO with an error before TLS.
        plain = server.uri.replace("nbds+unix", "nbd+unix")
        with pytest.raises(ClientError):
            connect(plain, tls="off").close()


def test_tls_tcp_hostname(workdir: Path, tls_material: TlsMaterial) -> None:
    export = dataclasses.replace(DISK, tls="x509", tls_verify_peer=True)
    with start_host("nbdkit", export, workdir=workdir, tls=tls_material, transport="tcp") as server:
        assert server.uri.startswith("nbds://127.0.0.1:")
        with connect(server.uri) as c:  # the host 127.0.0.1 is checked against the certificate
            assert c.get_tls_negotiated()
        with pytest.raises(Exception, match=r"certificate|hostname"):
            connect(server.uri + "&tls-hostname=wrong.example").close()


def test_nbds_against_plain_server_fails(workdir: Path, tls_material: TlsMaterial) -> None:
    # uri.md: "nbds: ... If encryption cannot be negotiated then the connection MUST fail" (URI-003/005)
    with start_host("nbdkit", DISK, workdir=workdir) as server:
        secure = server.uri.replace("nbd+unix", "nbds+unix") + f"&tls-certificates={tls_material.x509_dir}"
        with pytest.raises(ClientError, match="TLS required"):
            connect(secure).close()
        with connect(server.uri, tls="allow", tls_certificates=tls_material.x509_dir) as c:  # opportunistic
            assert not c.get_tls_negotiated()
            assert c.pread(512, 0) == b"\x01" * 512


def test_tcp_and_ipv4(workdir: Path) -> None:
    with start("qemu-nbd", workdir, transport="tcp") as server:
        assert server.uri.startswith("nbd://127.0.0.1:")
        with connect(server.uri) as c:
            assert c.get_size() == SIZE
            assert c.violations == []


# What NBD_INFO_BLOCK_SIZE these versions send (nbdkit 1.32 and nbd-server 3.24: none, so libnbd's 0).
BLOCK_SIZES = {"qemu-nbd": (1, 4096, 32 << 20), "nbdkit": (0, 0, 0), "nbd-server": (0, 0, 0)}


def test_block_sizes(server: RunningServer) -> None:
    with connect(server.uri) as c:
        got = tuple(c.get_block_size(which) for which in ("minimum", "preferred", "maximum"))
        assert got == BLOCK_SIZES[name_of(server)]
        # proto.md: without a maximum, "the client SHOULD NOT send ... larger than 32 MiB"
        assert c.get_block_size("payload") == 32 << 20


def test_full_info_name_and_description(workdir: Path) -> None:
    with start("qemu-nbd", workdir, dataclasses.replace(DISK, description="a test disk")) as server:
        with connect(server.uri, full_info=True) as c:
            assert c.get_export_description() == "a test disk"
            assert c.get_canonical_export_name() == "exp"
            assert c.violations == []
        with connect(server.uri) as c:
            # "The server MAY send information requests back which are not explicitly requested":
            # qemu-nbd 7.2 sends the description even unasked.
            assert c.get_export_description() == "a test disk"
    with start_host("nbdkit", ExportRequest(size=1 << 20), workdir=workdir, plugin="memory") as server:
        client = connect(server.uri, full_info=True)
        with client, pytest.raises(ClientError, match="DESCRIPTION"):
            client.get_export_description()  # nbdkit's memory plugin has none


def test_strict_mode_refuses_out_of_range_locally(workdir: Path) -> None:
    from nbdref import LocalProtocolError

    with start("qemu-nbd", workdir) as server, connect(server.uri) as c:
        before = len(list(c.transcript))
        with pytest.raises(LocalProtocolError):
            c.pread(4096, SIZE)  # past the end: the core refuses to send it
        assert len(list(c.transcript)) == before  # nothing went on the wire
        assert c.pread(512, 0) == b"\x01" * 512


def test_big_reads_land_in_place(workdir: Path) -> None:
    # 1 MiB reads take the driver's header-sized recv path (payload straight into the caller's buffer).
    eight = ExportRequest(size=8 << 20)
    with start_host("nbdkit", eight, workdir=workdir, plugin="memory") as server, connect(server.uri) as c:
        pattern = bytes(range(256)) * 4096
        for i in range(8):
            c.pwrite(pattern[i:] + pattern[:i], i << 20)
        buffers = [bytearray(1 << 20) for _ in range(8)]
        cookies = [c.aio_pread(buf, i << 20) for i, buf in enumerate(buffers)]
        c.wait_all()
        assert all(c.aio_command_completed(cookie) for cookie in cookies)
        assert all(buf == pattern[i:] + pattern[:i] for i, buf in enumerate(buffers))
        assert c.violations == []


def test_tls_allow_and_api_settings(workdir: Path, tls_material: TlsMaterial) -> None:
    # set_tls("allow") upgrades when the server offers TLS; credentials set through the API, not the URI.
    with start("qemu-nbd", workdir, dataclasses.replace(DISK, tls="psk"), tls=tls_material) as server:
        c = Client(timeout=10)
        c.set_tls("allow")
        c.set_tls_psk_file(tls_material.psk_file)
        c.set_tls_username("alice")
        c.set_opt_mode(True)
        c.connect_unix(str(server.socket))
        assert c.get_tls_negotiated()
        assert c.get_structured_replies_negotiated()  # negotiated again after STARTTLS
        c.set_export_name("exp")
        c.opt_go()
        assert c.pread(512, 0) == b"\x01" * 512
        assert c.violations == []
        c.close()
