"""qemu's own metadata contexts on qemu-nbd / qemu-storage-daemon: allocation depth and a dirty bitmap.

The export is a qcow2 image with nothing allocated (content "zero") and one persistent bitmap b0,
served with qemu-nbd ``-A -B b0`` (qemu-storage-daemon: ``allocation-depth=on,bitmaps.0=b0``).  A
region starts unallocated (base:allocation hole+zero, depth 0, bitmap clean); after we write it, it
must read back as data, local depth 1 and - the bitmap being enabled - dirty.  So the contexts are not
only negotiated but report what happened.  Other servers are not-applicable: the contexts live in
qemu's namespace and need a qcow2 image with a persistent bitmap.
"""

from __future__ import annotations

import pytest
from nbdref._constants import Cmd, TxFlag
from nbdref._strict import Strictness
from nbdref._wire import encode_block_status_payload
from nbdref.client import Client, ClientError

from fixtures.exports import ExportRequest

SECTION = "Metadata querying: the qemu namespace"
MiB = 1 << 20
EXPORT = ExportRequest(name="exp", size=4 * MiB, content="zero", image_format="qcow2", dirty_bitmaps=("b0",),
                       allocation_depth=True)
REGION = 64 * 1024                     # one qcow2 cluster
BASE, DEPTH, BITMAP = "base:allocation", "qemu:allocation-depth", "qemu:dirty-bitmap:b0"
# base:allocation: NBD_STATE_HOLE bit 0, NBD_STATE_ZERO bit 1.  qemu's nbd.rst: allocation depth is
# "0 unallocated, 1 local image, 2+ backing depth"; a dirty bitmap sets "bit 0 (NBD_STATE_DIRTY)".
HOLE, ZERO, DIRTY = 1, 2, 1
QEMU_IMPLS = ("qemu-nbd", "qemu-storage-daemon")


@pytest.fixture
def qemu_server(request, server_peer, verdict):
    if server_peer.implementation not in QEMU_IMPLS:
        verdict.not_applicable(f"{server_peer.implementation}: qemu's contexts need a qcow2 export with a "
                               "persistent bitmap, served by qemu-nbd or qemu-storage-daemon")
    from fixtures.plugin import shared_peer_server
    return shared_peer_server(request, server_peer, EXPORT, "qcow2-contexts")


@pytest.fixture
def connected(qemu_server, ref_client):
    def make(strictness=None) -> Client:
        def setup(c):
            for name in (BASE, DEPTH, BITMAP):
                c.add_meta_context(name)
        return ref_client(qemu_server, setup=setup, strictness=strictness)
    return make


def status_at(c: Client, offset: int) -> dict[str, tuple[int, int]]:
    """context -> (length, flags) of the first extent at ``offset`` (REQ_ONE is not used: one chunk per
    context must come back either way, BS-002)."""
    seen: dict[str, tuple[int, int]] = {}

    def callback(name: str, _offset: int, entries: list[int], _err: int) -> None:
        seen.setdefault(name, (entries[0], entries[1]))

    c.block_status(REGION, offset, callback)
    return seen


# NBD_OPT_SET_META_CONTEXT selects what the server supports; NBD_CMD_BLOCK_STATUS then "must be answered
# with one NBD_REPLY_TYPE_BLOCK_STATUS chunk per selected context" (BS-002).
@pytest.mark.req("BS-002", "BS-009", "BS-011")
@pytest.mark.feature("qemu:dirty-bitmap")
def test_contexts_negotiated(server_peer, connected, verdict):
    """base:allocation, qemu:allocation-depth and qemu:dirty-bitmap:b0 are selected and answered."""
    c = connected()
    selected = set(c.get_meta_contexts().values())
    verdict.timeline("qemu:allocation-depth", DEPTH in selected, export=EXPORT)
    verdict.timeline("qemu:dirty-bitmap", BITMAP in selected, export=EXPORT)
    assert BASE in selected
    assert set(status_at(c, 0)) == selected


# The contexts describe the image: an untouched cluster of an empty qcow2 is a hole reading as zeroes,
# unallocated at every depth and clean; after a WRITE it is data, allocated locally and dirty.
@pytest.mark.req("BS-002")
@pytest.mark.feature("qemu:allocation-depth")
def test_contexts_follow_a_write(server_peer, connected, verdict):
    """An untouched cluster is a clean hole; after a WRITE it is data, allocated and dirty."""
    offset = 5 * REGION
    c = connected()
    if not {DEPTH, BITMAP} <= set(c.get_meta_contexts().values()):
        verdict.timeline("qemu:allocation-depth", DEPTH in c.get_meta_contexts().values(), export=EXPORT)
        verdict.timeline("qemu:dirty-bitmap", BITMAP in c.get_meta_contexts().values(), export=EXPORT)
        return
    before = status_at(c, offset)
    assert before[BASE][1] == HOLE | ZERO, before
    assert before[DEPTH][1] == 0, before
    assert before[BITMAP][1] & DIRTY == 0, before
    try:
        c.pwrite(b"\x5a" * REGION, offset)
    except ClientError as e:
        pytest.fail(f"WRITE to a writable export failed: {e}")
    after = status_at(c, offset)
    verdict.info(f"contexts after write: {({k.split(':')[-1]: v[1] for k, v in sorted(after.items())})}")
    assert after[BASE][1] & HOLE == 0, after
    assert after[DEPTH][1] == 1, after
    assert after[BITMAP][1] & DIRTY == DIRTY, after


def filtered_status(c: Client, wanted: str, offset: int) -> dict[str, list[int]]:
    """NBD_CMD_BLOCK_STATUS in the payload form, asking for the context ``wanted`` only."""
    ids = {name: ctx for ctx, name in c.get_meta_contexts().items()}
    payload = encode_block_status_payload(REGION, (ids[wanted],))
    seen: dict[str, list[int]] = {}

    def callback(name: str, _offset: int, entries: list[int], _err: int) -> None:
        seen.setdefault(name, []).extend(entries)

    c.wait(c.aio_command(Cmd.BLOCK_STATUS, offset, len(payload), payload=payload, extent_cb=callback))
    return seen


# Ext-header draft, NBD_CMD_BLOCK_STATUS: a server advertising NBD_FLAG_BLOCK_STATUS_PAYLOAD supports "an
# alternative request form where the client sets NBD_CMD_FLAG_PAYLOAD_LEN in order to pass a payload that
# informs the server to limit its replies to the metacontext id(s) in the client's request payload"; the
# payload "MUST occupy 8 + n*4 bytes" (EXT-056): effect length, then the ids.  One id asked, one answered;
# the core's BS-056 wants a chunk for exactly the ids of the payload (test_core_accepts_filtered_block_status).
@pytest.mark.req("EXT-011")
@pytest.mark.feature("NBD_FLAG_BLOCK_STATUS_PAYLOAD")
def test_block_status_payload_filter(server_peer, connected, verdict):
    """The payload form of NBD_CMD_BLOCK_STATUS answers only the context asked for."""
    c = connected()
    advertised = bool(c.get_transmission_flags() & TxFlag.BLOCK_STATUS_PAYLOAD)
    verdict.timeline("NBD_FLAG_BLOCK_STATUS_PAYLOAD", advertised, export=EXPORT)
    if not advertised:
        return
    assert c.get_extended_headers_negotiated()       # EXT-011, checked by the core as well
    offset = 6 * REGION
    seen = filtered_status(c, DEPTH, offset)
    verdict.info(f"BLOCK_STATUS payload filter answered {sorted(seen)}")
    assert set(seen) == {DEPTH}, f"asked for {DEPTH} only, got {sorted(seen)}"
    # The untouched cluster is unallocated: depth 0 over (at least part of) the effect length.
    assert seen[DEPTH][1] == 0 and seen[DEPTH][0] > 0


# Three contexts negotiated, one asked in the payload: "informs the server to limit its replies to the
# metacontext id(s) in the client's request payload", so one chunk is a complete successful reply and the
# core records nothing (BS-056 counts the ids of the payload, not every negotiated context).
@pytest.mark.req("BS-056")
@pytest.mark.feature("NBD_FLAG_BLOCK_STATUS_PAYLOAD")
def test_filtered_block_status_is_complete(server_peer, connected, verdict):
    """One chunk for the one id asked in the payload is a complete reply (nothing recorded)."""
    c = connected(strictness=Strictness.lenient())
    if not c.get_transmission_flags() & TxFlag.BLOCK_STATUS_PAYLOAD:
        verdict.timeline("NBD_FLAG_BLOCK_STATUS_PAYLOAD", False, export=EXPORT)
        return
    seen = filtered_status(c, DEPTH, 7 * REGION)
    assert set(seen) == {DEPTH}
