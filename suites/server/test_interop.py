"""Baseline interoperability ("Baseline" in proto.md): what every server must support — NOTLS, fixed
newstyle, NBD_OPT_INFO and NBD_OPT_GO with NBD_INFO_EXPORT, NBD_OPT_ABORT, NBD_OPT_LIST, simple replies,
NBD_CMD_READ, NBD_CMD_WRITE, NBD_CMD_DISC — and the SHOULDs for maximum interoperability.

(NOTLS, NBD_OPT_LIST and TLS have tests of their own: test_smoke, test_list, test_tls; fixed newstyle and
NBD_OPT_EXPORT_NAME: test_handshake; unknown options: test_option_haggling.)
"""

from __future__ import annotations

import hashlib

import pytest
from nbdref import events as ev
from nbdref._constants import Cmd, Rep
from nbdref.client import ClientError

from fixtures.expectations import option_haggling
from fixtures.exports import expected_bytes
from suites.server._haggle import Plain, final, names

SECTION = "Baseline"


def _need_options(server_peer, verdict) -> None:
    why = option_haggling(server_peer)
    if why is not None:
        verdict.not_applicable(f"needs option haggling: {why}")


# "Every implementation MUST support NBD_OPT_INFO and NBD_OPT_GO with the NBD_INFO_EXPORT response"
# (INTEROP-004): NBD_OPT_INFO on one connection, NBD_OPT_GO on another, each with NBD_INFO_EXPORT and the
# export's size.  (INFO then GO on one connection, GO-022: test_info_go.)
@pytest.mark.req("INTEROP-004", "GO-012")
@pytest.mark.feature("NBD_OPT_INFO")
def test_info_and_go(server_peer, shared_server, shared_export, ref_client, verdict):
    """NBD_OPT_INFO and NBD_OPT_GO both answer with NBD_INFO_EXPORT."""
    c = ref_client(shared_server, opt_mode=True)
    c.set_export_name(shared_export.name)
    try:
        c.opt_info()
    except ClientError as e:
        if e.reply is None:
            raise
        # a release before NBD_OPT_INFO is unsupported-ok; one the timeline says has it is `missing`
        verdict.timeline("NBD_OPT_INFO", False, export=shared_export, how=str(e))
        return
    verdict.timeline("NBD_OPT_INFO", True, export=shared_export)
    verdict.expect(c.get_size() == shared_export.size, "INTEROP-004", expected=f"INFO: size {shared_export.size}",
                   observed=str(c.get_size()))
    c.opt_abort()
    g = ref_client(shared_server, opt_mode=True)
    g.set_export_name(shared_export.name)
    g.opt_go()
    verdict.expect(g.get_size() == shared_export.size, "INTEROP-004", expected=f"GO: size {shared_export.size}",
                   observed=str(g.get_size()))
    assert g.pread(4096, 0) == expected_bytes(shared_export, 0, 4096)


# "Servers implementing size constraints and wanting maximum interoperability should not require
# clients to request them" (INTEROP-015): NBD_OPT_GO with no information request at all succeeds.
@pytest.mark.req("INTEROP-015", "GO-012")
@pytest.mark.feature("NBD_OPT_GO")
def test_go_without_block_size_request(server_peer, shared_server, shared_export, verdict):
    """NBD_OPT_GO without any NBD_INFO request enters transmission."""
    _need_options(server_peer, verdict)
    plain = Plain(shared_server)
    verdict.watch(plain.conn)
    try:
        replies = plain.option(ev.OptGo(name=shared_export.name, info=()))
        last = final(replies)
        if isinstance(last, ev.RepError) and last.reply_type == Rep.ERR_UNSUP:
            # no NBD_OPT_GO at all (qemu before 2.10): judged by the timeline, not by INTEROP-015
            verdict.timeline("NBD_OPT_GO", False, export=shared_export, how=names(replies))
            return
        verdict.expect(isinstance(last, ev.RepAck), "INTEROP-015",
                       expected="NBD_REP_ACK without NBD_INFO_BLOCK_SIZE requested", observed=names(replies))
        if isinstance(final(replies), ev.RepAck):
            plain.sock.sendall(plain.conn.send(ev.Request(command=Cmd.DISC, cookie=1)))
    finally:
        plain.close()


# "Every implementation MUST support NBD_OPT_ABORT and its response" (INTEROP-007): NBD_REP_ACK.
@pytest.mark.req("INTEROP-007", "OPT-011")
@pytest.mark.feature("NBD_OPT_ABORT")
def test_abort(server_peer, shared_server, verdict):
    """NBD_OPT_ABORT is acknowledged."""
    _need_options(server_peer, verdict)
    plain = Plain(shared_server)
    verdict.watch(plain.conn)
    try:
        replies = plain.option(ev.OptAbort())
    finally:
        plain.close()
    # "Every implementation MUST support NBD_OPT_ABORT" (INTEROP-007): ending the session (an ACK or a
    # close) supports it, an error does not.  Its response: "The server MUST reply with NBD_REP_ACK"
    # (OPT-011).  The client "SHOULD gracefully handle the server closing the connection ... without it
    # sending a reply" (OPT-014) because "previous versions of this document were unclear": a close is
    # tolerated by clients, not the reply the server owes.
    verdict.expect(isinstance(final(replies), ev.RepAck | ev.ConnectionClosed), "INTEROP-007",
                   expected="NBD_OPT_ABORT ends the session (NBD_REP_ACK or a close)", observed=names(replies))
    verdict.expect(isinstance(final(replies), ev.RepAck), "OPT-011", expected="NBD_REP_ACK",
                   observed=names(replies))


# Simple replies (INTEROP-009; without structured replies every reply is simple: SR-001, SR-004, checked
# by the core) to NBD_CMD_READ (INTEROP-010) and NBD_CMD_WRITE (INTEROP-011), read back by checksum at
# the start, middle and end of a private region.  (NBD_CMD_DISC, INTEROP-012: test_disconnect.)
@pytest.mark.req("INTEROP-009", "INTEROP-010", "INTEROP-011", "SR-001", "SR-004", "SR-002")
@pytest.mark.feature("NBD_OPT_GO")
def test_simple_write_read_disc(server_peer, writable_server, region, ref_client, verdict):
    """Writes and reads in simple replies, checked by checksum."""
    offset = region(192 * 1024)

    def setup(c):
        c.set_request_structured_replies(False)
        c.set_request_extended_headers(False)
    c = ref_client(writable_server, setup=setup)
    verdict.expect(not c.get_structured_replies_negotiated(), "SR-001", expected="no structured replies",
                   observed="structured replies on")
    blobs = [hashlib.sha256(f"{server_peer.id}:{i}".encode()).digest() * 2048 for i in range(3)]   # 64 KiB each
    for i, blob in enumerate(blobs):
        c.pwrite(blob, offset + i * len(blob))
    for i, blob in enumerate(blobs):
        back = c.pread(len(blob), offset + i * len(blob))
        verdict.expect(hashlib.sha256(back).digest() == hashlib.sha256(blob).digest(), "INTEROP-010",
                       "INTEROP-011", expected=f"piece {i} reads back as written", observed="other bytes")
    kinds = {type(e.event).__name__ for e in c.transcript if e.direction == "S" and e.event is not None
             and type(e.event).__name__ in ("SimpleReply", "OffsetData", "OffsetHole", "ErrorChunk", "NoneChunk")}
    verdict.expect(kinds == {"SimpleReply"}, "INTEROP-009", "SR-004", "SR-002", expected="only simple replies",
                   observed=str(kinds))
