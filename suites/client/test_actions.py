"""Every client peer performs the basic actions against the reference server, which checks the wire.

Through the client drivers (fixtures/drivers.py): report the size, read, write, list the exports and
map the extents.  What the client reports must equal what the reference server serves; the reference
server's core judges every client-bound rule on each connection (`reference_session`).  A custom client
row runs its command template for each action; a template that does nothing, or fails, fails here.
"""

from __future__ import annotations

import pytest

from fixtures.drivers import driver_for
from fixtures.exports import expected_bytes

SECTION = "Baseline"
READ_LENGTH = 4096


@pytest.fixture
def driver(request, client_peer, peer_workdir, verdict):
    runner = None if client_peer.launcher == "in-process" else request.getfixturevalue("client_runner")
    return driver_for(client_peer, runner, peer_workdir)


def _do(driver, verdict, action, server, *args, ids=()):
    why = driver.can(action, server)
    if why:
        verdict.not_applicable(why)
    out = driver.do(action, server, *args)
    verdict.expect(out.ok, *ids, expected=f"the client's {action} succeeds", observed=out.why())
    assert out.ok, f"{action} failed: {out.why()}"
    return out.value


# proto.md, "Baseline": "Every implementation MUST support NOTLS mode" (INTEROP-002); a client reads the
# size from NBD_INFO_EXPORT (GO-012) or the NBD_OPT_EXPORT_NAME reply.
@pytest.mark.req("INTEROP-002")
@pytest.mark.feature("newstyle")
def test_size(client_peer, reference_server, reference_export, reference_session, driver, verdict):
    """The client reports the export's size."""
    size = _do(driver, verdict, "size", reference_server, ids=("INTEROP-002",))
    verdict.expect(size == reference_export.size, "INTEROP-002", expected=f"size {reference_export.size}",
                   observed=f"size {size}")


@pytest.mark.req("INTEROP-002", "RD-008")
@pytest.mark.feature("newstyle")
def test_read(client_peer, reference_server, reference_export, reference_session, driver, verdict):
    """The client reads the export's bytes at an unaligned offset."""
    offset = 8192 + 512
    got = _do(driver, verdict, "read", reference_server, offset, READ_LENGTH, ids=("INTEROP-002",))
    verdict.expect(got == expected_bytes(reference_export, offset, READ_LENGTH), "INTEROP-002",
                   expected=f"the export's {READ_LENGTH} bytes at {offset}", observed="other bytes")


# "The client MUST NOT send a request with a length ... beyond the end of the export" and the framing
# of NBD_CMD_WRITE (WR-002: exactly length bytes of data follow) are checked by the server's core.
@pytest.mark.req("WR-002")
@pytest.mark.feature("newstyle")
def test_write(client_peer, reference_server, reference_session, reference_region, driver, verdict):
    """What the client writes is what the reference server then holds."""
    from suites.client._common import server_bytes
    offset = reference_region(64 * 1024)
    data = bytes([0x5A]) * 4096
    _do(driver, verdict, "write", reference_server, offset, data, ids=("WR-002",))
    held = server_bytes(reference_server, offset, len(data), reference_session)
    # the WRITE and the requests after it parsed, and the disk holds exactly the data: the framing held
    verdict.expect(held == data, "WR-002", expected="the server holds what the client wrote",
                   observed=f"{held[:8].hex()}... instead of {data[:8].hex()}...")


# NBD_OPT_LIST: the client sends it without data (OPT-017 binds the server's framing; the server's core
# checks the client's option framing on the wire).
@pytest.mark.req("INTEROP-008")
@pytest.mark.feature("NBD_OPT_LIST")
def test_list(client_peer, reference_server, reference_export, reference_session, driver, verdict):
    """The client lists the exports and finds the reference server's."""
    names = _do(driver, verdict, "list", reference_server, ids=("INTEROP-008",))
    verdict.expect(reference_export.name in names, "INTEROP-008", expected=f"the list names {reference_export.name!r}",
                   observed=f"listed {names}")


# "A client MUST NOT send NBD_CMD_BLOCK_STATUS unless it selected a context" (BS-003): the server
# checks; the extents must cover the export.
@pytest.mark.req("BS-003")
@pytest.mark.feature("NBD_CMD_BLOCK_STATUS")
def test_map(client_peer, reference_server, reference_export, reference_session, driver, verdict):
    """The client maps the export's extents: they start at 0 and cover it."""
    rows = _do(driver, verdict, "map", reference_server)
    assert rows and rows[0][0] == 0, f"map starts at {rows[:1]}"
    assert sum(length for _, length in rows) == reference_export.size, f"map covers {sum(r[1] for r in rows)}"
