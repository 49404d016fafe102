"""qemu's own metadata contexts on qemu-nbd / qemu-storage-daemon: allocation depth and a dirty bitmap.

The export is a qcow2 image with nothing allocated (content "zero") and one persistent bitmap b0,
served with qemu-nbd ``-A -B b0`` (qemu-storage-daemon: ``allocation-depth=on,bitmaps.0=b0``).  A
region starts unallocated (base:allocation hole+zero, depth 0, bitmap clean); after we write it, it
must read back as data, local depth 1 and - the bitmap being enabled - dirty.  So the contexts are not
only negotiated but report what happened.  The reference server's personas (which emulate qemu's
contexts from the version that had them) serve the same from memory.  Other servers are not-applicable:
the contexts live in qemu's namespace and need a qcow2 image with a persistent bitmap.
"""

from __future__ import annotations

import pytest
from nbdref import events as ev
from nbdref._constants import Cmd, CmdFlag, Rep, TxFlag
from nbdref._strict import Strictness
from nbdref._wire import encode_block_status_payload
from nbdref.client import Client, ClientError

from fixtures.exports import ExportRequest
from suites.server._common import option_replies, reference_style, rep_name

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
    """The qcow2 export on qemu's servers; on the in-process reference server (whose personas emulate
    qemu's contexts) a memory export of the same size with the bitmap b0, a fresh one per test: the
    launcher serves raw files only, and the reference server keeps bitmaps in memory anyway."""
    if server_peer.launcher == "in-process" and server_peer.implementation == "nbdref":
        from nbdref.server import Export, Server
        srv = Server([Export.memory(EXPORT.name, EXPORT.size, bitmaps=EXPORT.dirty_bitmaps)],
                     persona=server_peer.persona, host="127.0.0.1", port=0, **reference_style(server_peer))
        srv.start()
        yield srv
        srv.stop(timeout=5)
        return
    if server_peer.implementation not in QEMU_IMPLS:
        verdict.not_applicable(f"{server_peer.implementation}: qemu's contexts need a qcow2 export with a "
                               "persistent bitmap, served by qemu-nbd or qemu-storage-daemon")
    from fixtures.plugin import shared_peer_server
    yield shared_peer_server(request, server_peer, EXPORT, "qcow2-contexts")


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
    if not selected:                    # no metadata contexts at all: the timelines said it
        return
    assert BASE in selected
    verdict.expect(all(n.partition(":")[0] in ("base", "qemu") for n in selected), "BS-009",
                   expected="base: and qemu: contexts", observed=str(sorted(selected)))
    seen = status_at(c, 0)
    assert set(seen) == selected
    # "All information a context provides must be representable in the 32-bit status flags" (BS-011)
    verdict.expect(all(0 <= f <= 0xFFFFFFFF for _, f in seen.values()), "BS-011", expected="32-bit status values",
                   observed=str(seen))


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


def option_client(qemu_server, ref_client) -> Client:
    """Stopped in the option phase with structured replies (and extended headers where offered)."""
    return ref_client(qemu_server, opt_mode=True)


def meta(c: Client, setting: bool, queries: list[str]) -> tuple[list[str], object]:
    cls = ev.OptSetMetaContext if setting else ev.OptListMetaContext
    replies = option_replies(c, cls(name=c.get_export_name(), queries=tuple(queries)))
    return [r.name for r in replies if isinstance(r, ev.RepMetaContext)], replies[-1]


# qemu's nbd.rst: "For NBD_OPT_LIST_META_CONTEXT the following queries are supported in addition to the
# specific "qemu:allocation-depth" and "qemu:dirty-bitmap:<dirty-bitmap-export-name>": "qemu:" - returns
# list of all available metadata contexts in the namespace; "qemu:dirty-bitmap:" - returns list of all
# available dirty-bitmap metadata contexts."  With queries the server "MUST return the selectable contexts
# matching at least one query" (BS-036), names in the registered qemu namespace (BS-007, BS-009).  For
# SET, an empty leaf "SHOULD NOT select any contexts" (BS-012) - neither "qemu:" nor
# "qemu:dirty-bitmap:" - and unknown qemu leaves select nothing either (a single ACK, BS-031; "MAY" fail
# with NBD_REP_ERR_INVALID, BS-029, accepted).
@pytest.mark.req("BS-007", "BS-009", "BS-012", "BS-031", "BS-036", "BS-040", "BS-041", "BS-047")
@pytest.mark.feature("qemu:dirty-bitmap")
def test_qemu_namespace_queries(server_peer, qemu_server, ref_client, verdict):
    """LIST 'qemu:' and 'qemu:dirty-bitmap:' list qemu's contexts; SET with them selects nothing."""
    c = option_client(qemu_server, ref_client)
    everything: list[str] = []
    if c.get_structured_replies_negotiated():
        everything, _ = meta(c, False, [])
    verdict.info(f"LIST with zero queries: {everything}")
    verdict.timeline("qemu:allocation-depth", DEPTH in everything, export=EXPORT)
    verdict.timeline("qemu:dirty-bitmap", BITMAP in everything, export=EXPORT)
    if not {DEPTH, BITMAP} & set(everything):
        return
    for name in everything:
        namespace, colon, _leaf = name.partition(":")
        verdict.expect(bool(colon) and namespace in ("base", "qemu"), "BS-007", "BS-009",
                       expected="base: or qemu: names", observed=repr(name))
    for query, wanted in (("qemu:", {n for n in (DEPTH, BITMAP) if n in everything}),
                          ("qemu:dirty-bitmap:", {BITMAP} & set(everything))):
        names, final = meta(c, False, [query])
        verdict.expect(isinstance(final, ev.RepAck) and set(names) == wanted, "BS-036",
                       expected=f"LIST {query!r} lists {sorted(wanted)}", observed=f"{names} then {rep_name(final)}")
    for query in ("qemu:", "qemu:dirty-bitmap:"):
        names, final = meta(c, True, [query])
        verdict.expect(isinstance(final, ev.RepAck) and not names, "BS-012", "BS-047",
                       expected=f"SET {query!r} selects nothing", observed=f"{names} then {rep_name(final)}")
    names, final = meta(c, True, ["qemu:dirty-bitmap:nosuch", "qemu:nosuch"])
    refused = isinstance(final, ev.RepError) and final.reply_type == Rep.ERR_INVALID
    verdict.expect((isinstance(final, ev.RepAck) and not names) or refused, "BS-031",
                   expected="unknown qemu: leaves select nothing (or NBD_REP_ERR_INVALID, BS-029)",
                   observed=f"{names} then {rep_name(final)}")


# Every context answers in its own chunk (BS-002 / BS-056), with REQ_ONE exactly one descriptor no longer
# than the request (BS-054 / BS-058 / BS-059), and extents in multiples of 512 (BS-077): qcow2 clusters
# are 64 KiB, so qemu has no reason for less.  Allocation depth and dirty bits fit in 32 bits (BS-011).
@pytest.mark.req("BS-002", "BS-011", "BS-054", "BS-056", "BS-058", "BS-059", "BS-077")
@pytest.mark.feature("qemu:allocation-depth")
def test_qemu_contexts_req_one_and_alignment(server_peer, connected, verdict):
    """REQ_ONE per context, and 512-aligned extents over the whole export, for all three contexts."""
    c = connected()
    selected = set(c.get_meta_contexts().values())
    if not {DEPTH, BITMAP} <= selected:
        verdict.timeline("qemu:allocation-depth", DEPTH in selected, export=EXPORT)
        verdict.timeline("qemu:dirty-bitmap", BITMAP in selected, export=EXPORT)
        return
    seen: dict[str, list[tuple[int, int]]] = {}

    def callback(name: str, _offset: int, entries: list[int], _err: int) -> None:
        seen.setdefault(name, []).extend(zip(entries[0::2], entries[1::2], strict=True))

    c.block_status(EXPORT.size, 0, callback)
    verdict.expect(all(0 <= f <= 0xFFFFFFFF for ext in seen.values() for _, f in ext), "BS-011",
                   expected="32-bit status values", observed=str(seen)[:200])
    odd = {name: [n for n, _ in ext if n % 512] for name, ext in seen.items()}
    verdict.expect(not any(odd.values()), "BS-077", expected="extents in multiples of 512", observed=str(odd))
    verdict.expect(set(seen) == selected, "BS-002", "BS-056", expected=str(sorted(selected)), observed=str(sorted(seen)))
    for offset in (0, 3 * REGION):
        seen.clear()
        c.block_status(REGION // 2, offset, callback, CmdFlag.REQ_ONE)
        verdict.expect(all(len(ext) == 1 and 0 < ext[0][0] <= REGION // 2 for ext in seen.values())
                       and set(seen) == selected, "BS-054", "BS-058", "BS-059",
                       expected="one descriptor per context, at most the request", observed=str(seen))
