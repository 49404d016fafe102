"""Size constraints: NBD_INFO_BLOCK_SIZE, clients that do not negotiate sizes, and requests outside them.

Every server is asked what it advertises (the core checks the values: BSZ-013/014/016/017/021) and is
driven by a client that does not request NBD_INFO_BLOCK_SIZE.  Constrained exports -- a minimum block
of 512, a maximum payload of 1 MiB, optionally NBD_REP_ERR_BLOCK_SIZE_REQD -- can be configured only on
the reference server, so those cases run against the nbdref rows (each persona) and are not applicable
elsewhere: the harness has no way to impose constraints on another implementation's export.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from nbdref._constants import Cmd, Err, Info, Opt, Rep
from nbdref._strict import Strictness
from nbdref.client import ClientError

from suites.server._common import acked, error_name, go_without_block_size, outcome

SECTION = "Size constraints"

MIN, PREF, MAX = 512, 4096, 1 << 20
SIZE = 4 << 20


# What each server advertises when asked: the core checks the values ("MUST be a power of 2", "MUST NOT be
# larger than 2^16", "the export size SHOULD be an integer multiple", "at least max(minimum, 512)", "at
# least as large as the preferred block size": BSZ-013/014/016/017/021; NBD_INFO_BLOCK_SIZE "length must
# be 14", GO-037); the test adds "SHOULD be at least 2^20 if the export is that large" (BSZ-022), and
# that a client asking for the sizes is never refused with NBD_REP_ERR_BLOCK_SIZE_REQD (GO-016).
# A server with default constraints need not send NBD_INFO_BLOCK_SIZE at all (nbdkit's file plugin does
# not): its absence is recorded, not judged against the timeline.
@pytest.mark.req("BSZ-013", "BSZ-014", "BSZ-016", "BSZ-017", "BSZ-021", "BSZ-022", "GO-016", "GO-037")
def test_advertised_block_sizes(server_peer, writable_server, writable_export, ref_client, verdict):
    """NBD_INFO_BLOCK_SIZE, when sent, holds values the spec allows."""
    c = ref_client(writable_server, opt_mode=True)
    try:
        c.opt_go()
    except ClientError as e:
        refused = getattr(e.reply, "reply_type", None)
        verdict.expect(refused != Rep.ERR_BLOCK_SIZE_REQD, "GO-016",
                       expected="no NBD_REP_ERR_BLOCK_SIZE_REQD to a GO that requests NBD_INFO_BLOCK_SIZE",
                       observed=str(e))
        raise
    verdict.held("GO-016", expected="GO with NBD_INFO_BLOCK_SIZE accepted", observed="accepted")
    sizes = tuple(c.get_block_size(i) for i in range(3))
    if not any(sizes):
        verdict.info("no NBD_INFO_BLOCK_SIZE: default constraints")
        return
    verdict.info(f"minimum {sizes[0]}, preferred {sizes[1]}, maximum payload {sizes[2]}")
    if writable_export.size >= 1 << 20:
        verdict.expect(sizes[2] >= 1 << 20, "BSZ-022", expected="maximum payload >= 2^20 (export >= 1 MiB)",
                       observed=f"maximum payload {sizes[2]}")


# A client that does not request NBD_INFO_BLOCK_SIZE: "servers SHOULD NOT refuse clients that do not
# request sizing information when the server supports default sizing" (BSZ-010, GO-017).  Then an
# unaligned 1-byte WRITE: a server with stricter constraints "MUST cleanly error commands that fall
# outside the constraints without corrupting data" (BSZ-011) -- it either writes exactly that byte or
# fails and changes nothing; one that enforced constraints it did not advertise to a client asking for
# them would break BSZ-004 / GO-036, so the 1-byte write is also tried after a GO that asked.
@pytest.mark.req("BSZ-010", "GO-017", "BSZ-011", "BSZ-004", "GO-036")
def test_client_without_size_negotiation(server_peer, writable_server, writable_export, region, ref_client, verdict):
    """GO without NBD_INFO_BLOCK_SIZE is accepted; unaligned writes work or fail cleanly."""
    c = ref_client(writable_server, opt_mode=True, strictness=Strictness.lenient())
    go_without_block_size(c)
    try:
        c.opt_go()
    except ClientError as e:
        refused = getattr(e.reply, "reply_type", None)
        verdict.expect(refused != Rep.ERR_BLOCK_SIZE_REQD, "BSZ-010", "GO-017",
                       expected="a default-sized export served to a client that did not ask for sizes",
                       observed=str(e))
        raise
    verdict.held("BSZ-010", "GO-017", expected="GO without NBD_INFO_BLOCK_SIZE accepted", observed="ACK")
    unasked = tuple(c.get_block_size(i) for i in range(3))
    verdict.info("NBD_INFO_BLOCK_SIZE not requested: " + (f"sent anyway {unasked}" if any(unasked) else "not sent"))
    offset = region(4096)
    before = c.pread(4096, offset)
    error = outcome(c, Cmd.WRITE, offset + 1001, 1, payload=b"\x01")
    after = c.pread(4096, offset)
    wanted = before[:1001] + b"\x01" + before[1002:]
    verdict.info(f"1-byte WRITE at an odd offset, sizes not negotiated: {error_name(error)}")
    verdict.expect(after == (wanted if not error else before), "BSZ-011",
                   expected="exactly that byte written, or an error and nothing changed",
                   observed=f"{error_name(error)} and {sum(a != b for a, b in zip(after, before, strict=True))} "
                            "bytes changed")
    asked = ref_client(writable_server, strictness=Strictness.lenient())
    sizes = tuple(asked.get_block_size(i) for i in range(3))
    if sizes[0] in (0, 1):
        error = outcome(asked, Cmd.WRITE, offset + 2001, 1, payload=b"\x02")
        verdict.expect(error == 0, "BSZ-004", "GO-036",
                       expected=f"a 1-byte WRITE accepted (advertised minimum {sizes[0] or 'none'})",
                       observed=error_name(error))


# ---- constrained exports of the reference server

@dataclass
class _Constrained:
    """A RunningServer look-alike for ref_client: an nbdref Server with a constrained export."""

    server: Any
    spec: Any

    @property
    def uri(self) -> str:
        return self.server.uri

    def alive(self) -> bool:
        return True


@contextlib.contextmanager
def constrained(server_peer, tmp_path, *, required: bool) -> Iterator[_Constrained]:
    from nbdref.server import Export, Server

    export = Export.memory("exp", SIZE, block_size=(MIN, PREF, MAX), block_size_required=required)
    srv = Server([export], persona=server_peer.persona, unix=str(tmp_path / "c.sock"))
    srv.start()
    try:
        yield _Constrained(srv, server_peer)
    finally:
        srv.stop(timeout=5)


def need_reference(server_peer, verdict) -> None:
    if server_peer.implementation != "nbdref":
        verdict.not_applicable(f"{server_peer.implementation}: the harness cannot impose size constraints on "
                               "its export (only the reference server's exports are configurable)")


# A constrained export "SHOULD advertise the size constraints ... and MUST do so" (BSZ-003, BSZ-004;
# GO-036 when requested).  Requests "not aligned to advertised minimum block size boundaries" SHOULD get
# NBD_EINVAL (BSZ-034, ERR-004), and the data around them is untouched (BSZ-011).  A WRITE over the
# maximum payload but within 2^25 "SHOULD NOT be considered a denial of service" (BSZ-024): an error
# reply, no disconnect; TRIM / WRITE_ZEROES longer than the maximum: "the server SHOULD NOT disconnect"
# (BSZ-029), "MAY reply with an NBD_EOVERFLOW or NBD_EINVAL".
@pytest.mark.req("BSZ-003", "BSZ-004", "GO-036", "BSZ-034", "ERR-004", "BSZ-011", "BSZ-024", "BSZ-029")
@pytest.mark.feature("NBD_INFO_BLOCK_SIZE")
def test_constrained_export(server_peer, tmp_path, ref_client, verdict):
    """A constrained export advertises its sizes and refuses requests outside them cleanly."""
    need_reference(server_peer, verdict)
    with constrained(server_peer, tmp_path, required=False) as server:
        c = ref_client(server, strictness=Strictness.lenient(), allow=("ERR-004", "BSZ-034"))
        if not acked(c, Opt.GO):
            verdict.info("the persona has no NBD_OPT_GO: no NBD_INFO_BLOCK_SIZE", only=True)
            return
        sizes = tuple(c.get_block_size(i) for i in range(3))
        verdict.expect(sizes == (MIN, PREF, MAX), "BSZ-003", "BSZ-004", "GO-036",
                       expected=f"NBD_INFO_BLOCK_SIZE {MIN}/{PREF}/{MAX}", observed=f"{sizes}")
        c.pwrite(b"\xab" * 4096, 0)
        for what, offset, length in (("offset", 100, 512), ("length", 0, 100)):
            error = outcome(c, Cmd.WRITE, offset, length, payload=b"\xcd" * length)
            verdict.expect(error == Err.EINVAL, "BSZ-034", "ERR-004", expected=f"unaligned {what}: NBD_EINVAL",
                           observed=error_name(error))
            error = outcome(c, Cmd.READ, offset, length)
            verdict.expect(error == Err.EINVAL, "ERR-004", expected=f"unaligned READ {what}: NBD_EINVAL",
                           observed=error_name(error))
        verdict.expect(c.pread(4096, 0) == b"\xab" * 4096, "BSZ-011",
                       expected="refused unaligned WRITEs changed nothing", observed="the data changed")
        try:
            error = outcome(c, Cmd.WRITE, 0, 2 * MAX, payload=b"\xef" * (2 * MAX))
            verdict.info(f"WRITE of {2 * MAX} bytes over a {MAX} maximum: {error_name(error)}")
            verdict.expect(error != 0, "BSZ-024", expected="an error reply", observed="success")
            for name, command in (("TRIM", Cmd.TRIM), ("WRITE_ZEROES", Cmd.WRITE_ZEROES)):
                error = outcome(c, command, 0, 2 * MAX)
                verdict.info(f"{name} of {2 * MAX} bytes: {error_name(error)}")
                verdict.expect(error in (0, Err.EOVERFLOW, Err.EINVAL), "BSZ-029",
                               expected="success, NBD_EOVERFLOW or NBD_EINVAL", observed=error_name(error))
            c.pread(512, 0)
        except ClientError as e:
            verdict.fail("BSZ-024", "BSZ-029", expected="oversize requests answered, the connection kept",
                         observed=str(e))


# "A server sending NBD_REP_ERR_BLOCK_SIZE_REQD should first send an NBD_INFO_BLOCK_SIZE reply" (GO-018);
# after the refusal the next option (a GO that asks) must still be understood.
@pytest.mark.req("GO-018", "GO-016")
@pytest.mark.feature("NBD_INFO_BLOCK_SIZE")
def test_block_size_required(server_peer, tmp_path, ref_client, verdict):
    """An export that requires size negotiation refuses a GO without it, announcing its sizes first."""
    from nbdref import events as ev

    need_reference(server_peer, verdict)
    with constrained(server_peer, tmp_path, required=True) as server:
        c = ref_client(server, opt_mode=True, strictness=Strictness.lenient())
        if c.get_protocol() != "newstyle-fixed":
            verdict.info("not fixed newstyle: no NBD_OPT_GO", only=True)
            return
        go_without_block_size(c)
        try:
            c.opt_go()
        except ClientError as e:
            if e.reply is None and not acked(c, Opt.GO):
                # no NBD_OPT_GO: the fallback NBD_OPT_EXPORT_NAME is refused by a hard disconnect, as the
                # spec allows ("MAY refuse ... a client that uses NBD_OPT_EXPORT_NAME (via a hard disconnect)")
                verdict.info(f"no NBD_OPT_GO; NBD_OPT_EXPORT_NAME refused: {e}", only=True)
                return
            if getattr(e.reply, "reply_type", None) != Rep.ERR_BLOCK_SIZE_REQD:
                raise
        else:
            verdict.info("GO without NBD_INFO_BLOCK_SIZE accepted: the export did not insist")
            return
        replies = [e.event for e in c.transcript if e.direction == "S" and isinstance(e.event, ev.OptionReply)
                   and e.event.option == Opt.GO]
        before = replies[:-1]
        verdict.expect(any(getattr(r, "info_type", None) == Info.BLOCK_SIZE for r in before), "GO-018",
                       expected="NBD_INFO_BLOCK_SIZE before NBD_REP_ERR_BLOCK_SIZE_REQD",
                       observed=f"{[type(r).__name__ for r in before]}")
        c._info_request = lambda: (Info.BLOCK_SIZE,)
        c.opt_go()
        verdict.expect(c.get_size() == SIZE, "GO-016", expected="the GO that asks is served",
                       observed=f"size {c.get_size()}")
