"""libnbd's tools (nbdinfo, nbdsh, nbdcopy) against the reference server, which checks every
client-bound rule on the wire.  Other client peers are not-applicable: these cases drive libnbd's tools.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from nbdref._constants import Opt

from fixtures.peers.libnbd_clients import NBDSH_CLOSE
from suites.client._common import REGION, TOOL_TIMEOUT, extended_headers, ok, server_bytes, tool_fixture
from suites.client._own import flush_before_write_replies, judge_write_payload_len, options_sent

SECTION = "Client behaviour: libnbd"
tool = tool_fixture("nbdinfo")



# nbdinfo uses NBD_OPT_INFO (or GO) with NBD_INFO_* requests, NBD_OPT_LIST with --list, and
# base:allocation block status with --map; the server checks each option and request.
@pytest.mark.req("BSZ-001", "OPT-017", "BS-003", "BS-064")
def test_nbdinfo(client_peer, tool, client_runner, reference_server, reference_export, reference_session,
             reference_region, verdict):
    info = json.loads(ok(client_runner.run(client_runner.tool_argv("nbdinfo", reference_server, "--json"), TOOL_TIMEOUT)).stdout)
    export = info["exports"][0]
    assert export["export-size"] == reference_export.size
    if "description" in export:
        assert export["description"] == reference_export.description
    listing = ok(client_runner.run(client_runner.tool_argv("nbdinfo", reference_server, "--list"), TOOL_TIMEOUT)).stdout
    assert "export=" in listing or reference_export.name in listing
    mapped = ok(client_runner.run(client_runner.tool_argv("nbdinfo", reference_server, "--map"), TOOL_TIMEOUT)).stdout
    rows = [line.split() for line in mapped.splitlines() if line.strip()]
    assert sum(int(r[1]) for r in rows) == reference_export.size, mapped
    verdict.timeline("NBD_OPT_EXTENDED_HEADERS", extended_headers(reference_session))
    # "A client able to honour size constraints SHOULD ... request NBD_INFO_BLOCK_SIZE" (BSZ-001)
    from nbdref import events as ev
    from nbdref._constants import Info
    asks = [Info.BLOCK_SIZE in e.event.info for r in reference_session.records() for e in r.transcript or []
            if e.direction == "C" and isinstance(e.event, ev.OptGo | ev.OptInfo)]
    verdict.expect(bool(asks) and all(asks), "BSZ-001", expected="NBD_INFO_BLOCK_SIZE in every NBD_OPT_INFO/GO",
                   observed=f"requested in {sum(asks)} of {len(asks)}")


NBDSH_SCRIPT = """
import json
out = {{"extended": h.get_extended_headers_negotiated() if hasattr(h, "get_extended_headers_negotiated") else None,
       "structured": h.get_structured_replies_negotiated()}}
h.pwrite(b"\\x77" * 65536, {w})
if h.can_fua():
    h.pwrite(b"\\x66" * 4096, {w} + 4096, nbd.CMD_FLAG_FUA)
if h.can_zero():
    h.zero(65536, {z})
if h.can_trim():
    h.trim(65536, {t})
if h.can_cache():
    h.cache(65536, {w})
if h.can_flush():
    h.flush()
seen = []
h.block_status(65536, {w}, lambda ctx, off, entries, err: seen.append((ctx, list(entries))))
out["block_status"] = seen
# libnbd >= 1.18: the payload form of NBD_CMD_BLOCK_STATUS (EXT-056), when the server offers it (EXT-013)
if hasattr(h, "can_block_status_payload") and h.can_block_status_payload():
    h.block_status_filter(65536, {w}, ["base:allocation"], lambda ctx, off, entries, err: 0)
    out["filter"] = True
out["read"] = h.pread(16, {w}).hex()
print(json.dumps(out))
"""


# libnbd through its API: every command the reference server advertises, plus block status; with
# extended headers (libnbd >= 1.18) the WRITEs must carry PAYLOAD_LEN (EXT-002), and the server checks
# that no flag is used it did not advertise (FUA-003, WZ-004, TRIM-006, CACHE-006).
@pytest.mark.req("WR-002", "EXT-002", "EXT-042", "FLUSH-004", "TRIM-006", "BS-003", "EXT-014", "WR-003", "WZ-010", "TRIM-003",
                 "BS-064", "BS-043", "BS-046", "EXT-013", "EXT-056", "EXT-043")
def test_nbdsh_commands(client_peer, tool, client_runner, reference_server, reference_export, reference_session,
             reference_region, verdict):
    w, z, t = (reference_region(REGION) for _ in range(3))
    script = NBDSH_SCRIPT.format(w=w, z=z, t=t)
    connect = f"h.add_meta_context('base:allocation'); h.connect_uri({reference_server.uri!r})"
    argv = ["nbdsh", "-c", connect, "-c", script, "-c", NBDSH_CLOSE]
    out = json.loads(ok(client_runner.run(argv, TOOL_TIMEOUT)).stdout.strip().splitlines()[-1])
    assert out["read"] == (b"\x77" * 16).hex()
    assert [ctx for ctx, _ in out["block_status"]] == ["base:allocation"]
    assert server_bytes(reference_server, w + 4096, 16, reference_session) == b"\x66" * 16
    assert server_bytes(reference_server, z, REGION, reference_session) == bytes(REGION)
    if out["extended"] is not None:
        assert bool(out["extended"]) == extended_headers(reference_session)
    judge_write_payload_len(verdict, reference_session)
    if extended_headers(reference_session):
        used = [r.id for r in reference_session.records() if Opt.EXPORT_NAME in options_sent(r)]
        verdict.expect(not used, "EXT-014", expected="no NBD_OPT_EXPORT_NAME once extended headers are negotiated",
                       observed=f"EXPORT_NAME on {used}" if used else "GO only")
    verdict.info(f"nbdsh: extended headers {out['extended']}, structured replies {out['structured']}")


# nbdcopy writes a whole image with many requests in flight (and several connections when the server
# offers NBD_FLAG_CAN_MULTI_CONN), then reads it back: every request is checked by the server.
@pytest.mark.req("WR-002", "MC-001", "RD-008", "CMD-001")
def test_nbdcopy_round_trip(client_peer, tool, client_runner, reference_server, reference_export, reference_session,
             reference_region, verdict):
    src = Path(reference_server.workdir) / f"src-{client_peer.id.replace('@', '-')}.raw"
    # The whole export is rewritten with its own content (pattern), so other tests' expectations hold
    # except in the regions they wrote; nbdcopy is told to copy exactly the export's size.
    src.write_bytes(server_bytes(reference_server, 0, reference_export.size, reference_session))
    ok(client_runner.run(client_runner.tool_argv("nbdcopy", reference_server, str(src), "{uri}"), TOOL_TIMEOUT))
    # "A client using several connections MUST NOT send FLUSH until it has the replies to all writes the
    # flush is meant to cover" (MC-001): every earlier WRITE, on any connection, answered first.
    late = flush_before_write_replies(reference_session.records())
    verdict.expect(not late, "MC-001", expected="each FLUSH after the replies to every earlier WRITE",
                   observed="; ".join(late[:4]) or "in order")
    back = Path(reference_server.workdir) / f"back-{client_peer.id.replace('@', '-')}.raw"
    ok(client_runner.run(client_runner.tool_argv("nbdcopy", reference_server, "{uri}", str(back)), TOOL_TIMEOUT))
    assert back.read_bytes() == src.read_bytes()
