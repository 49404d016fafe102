"""Ending transmission as clients do it: NBD_CMD_DISC then close, nothing after it, no requests in
flight; NBD_ESHUTDOWN means a soft disconnect.

Reference servers of the test's own (suites/client/_own.py); one client run per test.  The server's
core checks DISC-023/024/026/027 on every connection; the test judges how each connection ended.
"""

from __future__ import annotations

from typing import Any

import pytest
from nbdref._constants import Cmd

from suites.client._own import (
    MiB,
    Step,
    describe,
    own_server,
    requests_sent,
    run_steps,
    runner_for,
    watch_all,
)

SECTION = "Terminating the transmission phase"

NBDSH_IN_FLIGHT = """
bufs = [nbd.Buffer(65536) for _ in range(8)]
for i, b in enumerate(bufs):
    h.aio_pread(b, i * 65536)
print("in flight", h.aio_in_flight())
"""


def _many_in_flight(kind: str, uri: str) -> Step:
    """Several reads issued at once, then the client's normal exit (which ends with its disconnect)."""
    if kind == "qemu":
        cmds = [f"aio_read {i * 64}k 64k" for i in range(8)]
        return Step("inflight", ["qemu-io", "-f", "raw", "-r", *(a for c in cmds for a in ("-c", c)), uri])
    if kind == "libnbd":
        return Step("inflight", ["nbdsh", "-u", uri, "-c", NBDSH_IN_FLIGHT, "-c", "h.shutdown()"])

    def call() -> str:
        from nbdref.client import Client
        with Client(timeout=15) as c:
            c.connect_uri(uri)
            bufs = [bytearray(65536) for _ in range(8)]
            for i, b in enumerate(bufs):
                c.aio_pread(b, i * 65536)
            c.wait_all()
            c.shutdown()
        return "ok"
    return Step("inflight", call=call)


# "The client sends NBD_CMD_DISC" to end transmission (INTEROP-012); its offset and length are zero
# (DISC-027), nothing follows it (DISC-026), and it "SHOULD wait until there are no inflight requests"
# (DISC-023); no other disconnect (DISC-024).  The client has eight reads in flight when it is done.
@pytest.mark.req("INTEROP-012", "DISC-023", "DISC-024", "DISC-026", "DISC-027", "CMD-001", "RD-008")
@pytest.mark.feature("newstyle")
def test_disc_after_requests_in_flight(request: Any, client_peer: Any, kind: str, peer_workdir: Any, verdict: Any,
                                       evidence: Any) -> None:
    """Eight reads in flight, then the client ends: NBD_CMD_DISC after their replies, then close."""
    runner = runner_for(request, kind)
    with own_server(peer_workdir, "disc", read_only=True) as own:
        watch_all(verdict, evidence, [own])
        res = run_steps(runner, [_many_in_flight(kind, own.uri())])["inflight"]
        records = own.records()
    assert res.ok, f"the client failed: {res.out[-300:]}"
    data = [r for r in records if r.requests]
    verdict.expect(bool(data), "INTEROP-012", expected="a connection that reached transmission",
                   observed=describe(records))
    for r in data:
        reqs = requests_sent(r)
        last = reqs[-1] if reqs else None
        verdict.expect(last is not None and last.command == Cmd.DISC and "NBD_CMD_DISC" in r.reason,
                       "INTEROP-012", "DISC-024", "DISC-026", expected="the last request is NBD_CMD_DISC, then "
                       "the client closes", observed=describe([r]))
        if last is not None and last.command == Cmd.DISC:
            verdict.expect(last.offset == 0 and last.length == 0, "DISC-027",
                           expected="NBD_CMD_DISC offset and length 0",
                           observed=f"offset {last.offset}, length {last.length}")


def _two_reads(kind: str, uri: str) -> Step:
    """Two reads on one connection (the first will fail): what the client does after the error."""
    if kind == "qemu":
        return Step("reads", ["qemu-io", "-f", "raw", "-r", "-c", "read 0 512", "-c", f"read -v {MiB} 512", uri])
    if kind == "libnbd":
        script = ("try:\n    h.pread(512, 0)\n    print('first ok')\nexcept nbd.Error as e:\n"
                  "    print('first failed', e.errno, e)\n"
                  f"try:\n    print('DATA', h.pread(512, {MiB}).hex())\nexcept nbd.Error as e:\n"
                  "    print('second failed', e)\n")
        return Step("reads", ["nbdsh", "-u", uri, "-c", script, "-c", "h.aio_is_ready() and h.shutdown()"])

    def call() -> str:
        from nbdref.client import Client, ClientError
        out = []
        with Client(timeout=15) as c:
            c.connect_uri(uri)
            try:
                c.pread(512, 0)
                out.append("first ok")
            except ClientError as e:
                out.append(f"first failed {e}")
            try:
                out.append("DATA " + bytes(c.pread(512, MiB)).hex())
            except ClientError as e:
                out.append(f"second failed {e}")
            if c.aio_is_ready():
                c.shutdown()
        return "\n".join(out)
    return Step("reads", call=call)


# "If the client receives an NBD_ESHUTDOWN error it MUST initiate a soft disconnect" (DISC-021, checked
# by the core: after the error only NBD_CMD_DISC may follow): fault eshutdown fails the first READ so.
@pytest.mark.req("DISC-021")
@pytest.mark.feature("newstyle")
def test_eshutdown_means_disc(request: Any, client_peer: Any, kind: str, peer_workdir: Any, verdict: Any,
                              evidence: Any) -> None:
    """NBD_ESHUTDOWN to a READ: the client's next request is NBD_CMD_DISC."""
    runner = runner_for(request, kind)
    with own_server(peer_workdir, "eshut", read_only=True, fault="eshutdown") as own:
        watch_all(verdict, evidence, [own])
        res = run_steps(runner, [_two_reads(kind, own.uri())])["reads"]
        records = own.records()
    for r in records:
        reqs = requests_sent(r)
        if not reqs:
            continue
        after = [Cmd(q.command).name for q in reqs[1:]]
        if kind == "libnbd":
            # libnbd is a library: the second pread is our nbdsh script's, and libnbd leaves what to do
            # after an error to the application, so what it sent shows the script, not a libnbd breach.
            verdict.info(f"after NBD_ESHUTDOWN the script's next pread went out: then {after}", only=True)
            continue
        verdict.expect(after == ["DISC"], "DISC-021", expected="after NBD_ESHUTDOWN only NBD_CMD_DISC",
                       observed=f"then {after}; {describe([r])}")
    verdict.info(f"exit {res.rc}: {res.out[-200:]!r}")
