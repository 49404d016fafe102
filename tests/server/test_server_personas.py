"""Personas seen by real clients: each client falls back exactly as the persona's version demands."""

from __future__ import annotations

import json
import shutil

import pytest
from nbdref.server import Export

from .conftest import NBDSH, clean, run

pytestmark = pytest.mark.skipif(not shutil.which("nbdinfo"), reason="libnbd-bin not installed")
MiB = 1 << 20


def _info(serve, persona: str) -> tuple[dict, object]:
    s = serve([Export.memory("exp", 4 * MiB, bitmaps=("b0",))], persona=persona)
    info = json.loads(run(["nbdinfo", "--json", s.uri]).stdout)
    return info, s


def test_qemu_2_6_no_go_no_structured_replies(serve):
    info, s = _info(serve, "qemu-2.6")
    (e,) = info["exports"]
    assert info["structured"] is False and "block_size_minimum" not in e
    assert e["can_zero"] is False and e["can_cache"] is False and e["export-size"] == 4 * MiB
    clean(s)
    wire = str(s.records[0].transcript)
    # libnbd tried NBD_OPT_GO, got NBD_REP_ERR_UNSUP, and fell back to NBD_OPT_EXPORT_NAME.
    assert "NBD_REP_ERR_UNSUP (to NBD_OPT_GO)" in wire or "NBD_REP_ERR_UNSUP (to NBD_OPT_INFO)" in wire, wire
    assert "NBD_OPT_EXPORT_NAME" in wire


def test_qemu_2_10_block_size_without_structured_replies(serve):
    info, s = _info(serve, "qemu-2.10")
    (e,) = info["exports"]
    assert info["structured"] is False
    assert (e["block_size_minimum"], e["block_size_preferred"]) == (512, 4096)
    assert e["can_zero"] is True and e["can_df"] is False
    clean(s)


def test_qemu_2_12_base_allocation_only(serve):
    info, s = _info(serve, "qemu-2.12")
    (e,) = info["exports"]
    assert info["structured"] is True and e["contexts"] == ["base:allocation"]
    assert e["can_cache"] is False and e["can_fast_zero"] is False
    clean(s)


def test_qemu_5_2_lists_qemu_contexts(serve):
    info, s = _info(serve, "qemu-5.2")
    (e,) = info["exports"]
    assert set(e["contexts"]) == {"base:allocation", "qemu:dirty-bitmap:b0", "qemu:allocation-depth"}
    assert e["can_multi_conn"] is False and e["can_fast_zero"] is True  # writable: multi-conn from 7.1
    clean(s)


def test_nbd_server_3_24_info_reports_size_zero(serve):
    info, s = _info(serve, "nbd-server-3.24")
    (e,) = info["exports"]
    # Debian's nbd-server (3.21 to 3.27, probed) answers NBD_OPT_INFO with export size 0; NBD_OPT_GO is right.
    assert info["structured"] is False and e["export-size"] == 0
    assert run([*NBDSH, "-u", s.uri, "-c", "print(h.get_size()); h.shutdown()"]).stdout.strip() == str(4 * MiB)
    assert s.wait_closed(10)


def test_nbdkit_persona_sends_no_holes(serve):
    s = serve([Export.memory("exp", 4 * MiB)], persona="nbdkit-1.32")
    script = """
import nbd
kinds = []
h.pread_structured(1 << 20, 0, lambda sub, off, status, err: kinds.append(status))
print(kinds == [nbd.READ_DATA])
h.shutdown()
"""
    assert run([*NBDSH, "-u", s.uri, "-c", script]).stdout.strip() == "True"
    clean(s)
    s2 = serve([Export.memory("exp", 4 * MiB)])  # nbdref: a sparse read is one hole chunk
    assert run([*NBDSH, "-u", s2.uri, "-c", script]).stdout.strip() == "False"
    clean(s2)


@pytest.mark.skipif(not shutil.which("qemu-io"), reason="qemu-utils not installed")
@pytest.mark.parametrize("persona", ["qemu-2.6", "qemu-2.10", "qemu-2.12", "nbd-server-3.24", "nbdkit-1.24"])
def test_qemu_io_works_against_older_personas(serve, persona):
    """qemu 7.2's client falls back (EXPORT_NAME, no SR, no block status) and still reads and writes."""
    s = serve([Export.memory("exp", 4 * MiB)], persona=persona)
    r = run(["qemu-io", "-f", "raw", "-c", "write -P 0x3c 0 64k", "-c", "read -P 0x3c 0 64k", s.uri])
    assert "Pattern verification failed" not in r.stdout
    clean(s)
    wire = str(s.records[0].transcript)
    if persona == "qemu-2.6":
        assert "NBD_OPT_EXPORT_NAME" in wire and "NBD_REPLY_TYPE" not in wire
    if persona in ("qemu-2.10", "nbd-server-3.24"):
        assert "NBD_REP_ERR_UNSUP (to NBD_OPT_STRUCTURED_REPLY)" in wire and "NBD_REPLY_TYPE" not in wire
