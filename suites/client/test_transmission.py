"""Transmission as clients do it: request sizes and alignment, the export's end, flags only when
advertised, no metadata without a context.

Each test starts reference servers of its own (suites/client/_own.py): block size constraints, no
NBD_INFO_BLOCK_SIZE, an export whose size is not a multiple of 512, nothing optional advertised, no
structured replies.  The client does what a user would (qemu-io commands, an nbdsh script, nbdcopy,
the reference client's API); a command the client refuses itself is an acceptable answer, what it
sends is checked by the server's core and judged here from the transcript.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from nbdref._constants import Cmd, CmdFlag
from nbdref.personas import get as persona
from nbdref.personas import with_changes

from fixtures.peers.qemu_clients import parse_read_dump
from suites.client._own import (
    MiB,
    Step,
    describe,
    overlapping_connections,
    own_server,
    pattern,
    requests_sent,
    run_steps,
    runner_for,
    watch_all,
)

SECTION = "Size constraints"
DATA_COMMANDS = {Cmd.READ, Cmd.WRITE, Cmd.DISC}


# ---- what each kind of client is asked to do (ops: (name, offset, length, byte or None for a read))

OPS = [("read-unaligned", 1000, 100, None), ("write-unaligned", 5000, 3000, 0x11),
       ("read-2M", 0, 2 * MiB, None), ("write-2M", MiB, 2 * MiB, 0x22)]

NBDSH_OPS = """
import json
out = {{}}
for name, off, n, byte in {ops!r}:
    try:
        if byte is None:
            out[name] = h.pread(n, off).hex() if n <= 4096 else "ok"
        else:
            h.pwrite(bytes([byte]) * n, off)
            out[name] = "ok"
    except nbd.Error as e:
        out[name] = "refused: " + str(e)
print("JSON", json.dumps(out))
"""


def ops_step(kind: str, name: str, uri: str, ops: list[tuple[str, int, int, int | None]]) -> Step:
    """Every op in one connection; the output says per op 'ok' / the bytes read / 'refused: ...'."""
    if kind == "qemu":
        cmds = [f"read -v {o} {n}" if b is None else f"write -P {b:#x} {o} {n}" for _, o, n, b in ops]
        ro = ["-r"] if all(b is None for *_, b in ops) else []
        return Step(name, ["qemu-io", "-f", "raw", *ro, *(a for c in cmds for a in ("-c", c)), uri])
    if kind == "libnbd":
        return Step(name, ["nbdsh", "-u", uri, "-c", NBDSH_OPS.format(ops=ops), "-c", "h.shutdown()"])

    def call() -> str:
        from nbdref._errors import LocalProtocolError
        from nbdref.client import Client, ClientError
        out: dict[str, str] = {}
        with Client(timeout=15) as c:
            c.connect_uri(uri)
            for op, off, n, byte in ops:
                try:
                    if byte is None:
                        data = bytes(c.pread(n, off))
                        out[op] = data.hex() if n <= 4096 else "ok"
                    else:
                        c.pwrite(bytes([byte]) * n, off)
                        out[op] = "ok"
                except (ClientError, LocalProtocolError) as e:
                    out[op] = f"refused: {e}"
            c.shutdown()
        return "JSON " + json.dumps(out)
    return Step(name, call=call)


def first_read(kind: str, out: str) -> bytes | None:
    """The bytes of the first read op (qemu-io's first dump, or the JSON's read-unaligned)."""
    if kind == "qemu":
        dump = out.split("read ")[0] if "read " in out else out
        return parse_read_dump(dump) or None
    for line in out.splitlines():
        if line.startswith("JSON "):
            v = json.loads(line[5:]).get("read-unaligned", "")
            return bytes.fromhex(v) if v and not v.startswith("refused") else None
    return None


def misaligned(records: list[Any], unit: int, size: int | None = None) -> list[str]:
    """Requests whose offset or length is not a multiple of ``unit`` (the export's tail excepted when
    ``size`` is given: a range that ends at the export's end may end unaligned)."""
    bad = []
    for r in records:
        for q in requests_sent(r):
            if q.command == Cmd.DISC:
                continue
            tail = size is not None and q.offset + q.length == size
            if q.offset % unit or (q.length % unit and not tail):
                bad.append(f"{Cmd(q.command).name} {q.offset}+{q.length}")
    return bad


# "A client that requested NBD_INFO_BLOCK_SIZE in NBD_OPT_GO MUST obey the constraints" (BSZ-005):
# "multiples of any advertised minimum block size" (BSZ-031) and no WRITE "longer than the maximum payload
# size" (BSZ-025).  The server advertises 4096 / 64 KiB / 1 MiB (the maximum "SHOULD be at least 2^20")
# and refuses anything else with EINVAL; the client is asked for an unaligned read and write and 2 MiB
# transfers.
@pytest.mark.req("BSZ-001", "BSZ-005", "BSZ-031", "BSZ-025", "BSZ-032", "INTEROP-011")
@pytest.mark.feature("NBD_INFO_BLOCK_SIZE")
def test_block_size_constraints_read_write(request: Any, client_peer: Any, kind: str, peer_workdir: Any,
                                       verdict: Any, evidence: Any) -> None:
    """Unaligned and oversize I/O through a client: aligned, split requests on the wire, right data."""
    runner = runner_for(request, kind)
    mn, pref, mx = 4096, 64 * 1024, MiB
    with own_server(peer_workdir, "bsize", block_size=(mn, pref, mx)) as own:
        watch_all(verdict, evidence, [own])
        steps = [ops_step(kind, "ops", own.uri(), OPS)]
        if kind == "libnbd":
            steps.append(Step("nbdcopy", ["nbdcopy", own.uri(), "null:"]))
        results = run_steps(runner, steps)
        records = own.records()
        held = bytes(own.server.exports[0].backend.pread(4096, 8192))
    res = results["ops"]
    bad = misaligned(records, mn)
    verdict.expect(not bad, "BSZ-005", "BSZ-031", expected=f"every request a multiple of the minimum block size {mn}",
                   observed=", ".join(bad[:8]) or "all aligned")
    big = [f"{Cmd(q.command).name} {q.offset}+{q.length}" for r in records for q in requests_sent(r)
           if q.command == Cmd.WRITE and q.length > mx]
    verdict.expect(not big, "BSZ-005", "BSZ-025", expected=f"no WRITE longer than the maximum payload {mx}",
                   observed=", ".join(big[:8]) or "none")
    # "The client SHOULD use multiples of the advertised preferred block size where possible" (BSZ-032):
    # judged on the requests at least that long (a short read-modify-write cannot be, the export's tail
    # need not be).
    coarse = [f"{Cmd(q.command).name} {q.offset}+{q.length}" for r in records for q in requests_sent(r)
              if q.command in (Cmd.READ, Cmd.WRITE) and q.length >= pref and q.offset + q.length != own.size
              and (q.offset % pref or q.length % pref)]
    verdict.expect(not coarse, "BSZ-032", expected=f"requests of {pref} bytes or more in multiples of the preferred "
                   f"block size {pref}", observed=", ".join(coarse[:8]) or "all multiples")
    from nbdref import events as ev
    from nbdref._constants import Info
    asked = [Info.BLOCK_SIZE in e.info for r in records for e in _client_go(r, ev)]
    verdict.expect(bool(asked) and all(asked), "BSZ-001", expected="NBD_INFO_BLOCK_SIZE requested in NBD_OPT_GO",
                   observed=f"requested on {sum(asked)} of {len(asked)} NBD_OPT_GO")
    got = first_read(kind, res.out)
    if got is not None:
        verdict.expect(got == pattern(1000, 100), "BSZ-005", expected="the unaligned read returns the export's bytes",
                       observed=f"{got[:16].hex()}... vs {pattern(1000, 16).hex()}...")
    written = pattern(4096, 4096) + pattern(8192, 4096)
    good = written[:5000 - 4096] + b"\x11" * 3000 + written[5000 - 4096 + 3000:]
    # Either the write was done (read-modify-write) or refused by the client: never other bytes.
    verdict.expect(held[:4096] in (good[:4096], written[:4096]) and held == (good if held != written else written),
                   "INTEROP-011", expected="the unaligned write lands exactly (or is refused by the client)",
                   observed="as written" if held == good else ("unchanged" if held == written else "other bytes"))
    verdict.info(f"{kind}: {res.out[-300:]!r}; {describe(records)}")


def _client_go(record: Any, ev: Any) -> list[Any]:
    from suites.client._own import client_events
    return [e for e in client_events(record) if isinstance(e, ev.OptGo)]


# Without NBD_INFO_BLOCK_SIZE: "an interoperable client SHOULD use 512-byte granularity and READ/WRITE
# payloads of at most 2^25 bytes" (BSZ-008, INTEROP-018).  The server (persona nbdkit-1.32: no block size
# information) serves 4 MiB; the client's own choices are judged: qemu-io's block layer, nbdcopy's requests,
# the reference client's aligned calls (an application's unaligned call through a library is the
# application's choice, so libnbd is judged through nbdcopy only).
@pytest.mark.req("BSZ-008", "INTEROP-018")
@pytest.mark.feature("NBD_INFO_BLOCK_SIZE")
def test_default_granularity_read_write(request: Any, client_peer: Any, kind: str, peer_workdir: Any, verdict: Any,
                             evidence: Any) -> None:
    """No advertised constraints: the client's requests are 512-aligned and at most 32 MiB."""
    runner = runner_for(request, kind)
    size = 4 * MiB
    with own_server(peer_workdir, "nobsize", persona="nbdkit-1.32", size=size) as own:
        watch_all(verdict, evidence, [own])
        if kind == "qemu":
            steps = [Step("ops", ["qemu-io", "-f", "raw", "-c", "read -v 1000 100", "-c", "write -P 0x33 5000 3000",
                                  "-c", f"read 0 {size}", own.uri()])]
        elif kind == "libnbd":
            src = peer_workdir / "src.raw"
            src.write_bytes(pattern(0, size))
            steps = [Step("ops", ["nbdcopy", own.uri(), "null:"]), Step("copy-in", ["nbdcopy", str(src), own.uri()])]
        else:
            steps = [ops_step(kind, "ops", own.uri(), [("read-4k", 4096, 4096, None), ("write-4k", 8192, 4096, 0x44)])]
        results = run_steps(runner, steps)
        records = own.records()
    failed = {n: r.out[-200:] for n, r in results.items() if not r.ok}
    assert not failed, f"the client failed: {failed}"
    bad = misaligned(records, 512, size)
    verdict.expect(not bad, "BSZ-008", "INTEROP-018", expected="requests in multiples of 512 bytes",
                   observed=", ".join(bad[:8]) or "all aligned")
    big = [f"{Cmd(q.command).name} {q.length}" for r in records for q in requests_sent(r)
           if q.command in (Cmd.READ, Cmd.WRITE) and q.length > 1 << 25]
    verdict.expect(not big, "BSZ-008", "INTEROP-018", expected="READ/WRITE of at most 2^25 bytes",
                   observed=", ".join(big) or "none")


# "The client MUST NOT send a request whose offset plus length exceeds the export size" (BSZ-033): the
# export is 4 MiB + 100 bytes (the server advertises minimum block 1); the client reads its tail.
@pytest.mark.req("BSZ-033", "INTEROP-010")
@pytest.mark.feature("newstyle")
def test_unaligned_export_tail(request: Any, client_peer: Any, kind: str, peer_workdir: Any, verdict: Any,
                               evidence: Any) -> None:
    """The last 100 bytes of an export whose size is not a multiple of 512: read, never past the end."""
    runner = runner_for(request, kind)
    size = 4 * MiB + 100
    with own_server(peer_workdir, "tail", size=size) as own:
        watch_all(verdict, evidence, [own])
        steps = [ops_step(kind, "ops", own.uri(), [("read-unaligned", 4 * MiB, 100, None)])]
        if kind == "libnbd":
            steps.append(Step("nbdcopy", ["nbdcopy", own.uri(), "null:"]))
        results = run_steps(runner, steps)
        records = own.records()
    past = [f"{Cmd(q.command).name} {q.offset}+{q.length}" for r in records for q in requests_sent(r)
            if q.command != Cmd.DISC and q.offset + q.length > size]
    verdict.expect(not past, "BSZ-033", expected=f"no request beyond the export's {size} bytes",
                   observed=", ".join(past[:8]) or "none")
    got = first_read(kind, results["ops"].out)
    verdict.expect(got == pattern(4 * MiB, 100), "INTEROP-010", expected="the tail reads as the export's bytes",
                   observed=f"exit {results['ops'].rc}: {results['ops'].out[-200:]!r}")
    if "nbdcopy" in results:
        verdict.expect(results["nbdcopy"].ok, "BSZ-033", expected="nbdcopy copies the whole export",
                       observed=f"exit {results['nbdcopy'].rc}: {results['nbdcopy'].out[-200:]!r}")


NOTHING = with_changes(persona("nbdref"), name="nothing-optional", flush=False, fua=False, trim=False,
                       write_zeroes=False, fast_zero=False, df=False, cache=False, multi_conn_ro=False,
                       multi_conn_rw=False)

NBDSH_TRY_ALL = """
import json
out = {}
def attempt(name, f):
    try:
        f(); out[name] = "ok"
    except nbd.Error as e:
        out[name] = "refused: " + str(e)
attempt("zero", lambda: h.zero(4096, 0))
attempt("trim", lambda: h.trim(4096, 0))
attempt("flush", lambda: h.flush())
attempt("cache", lambda: h.cache(4096, 0))
attempt("fua", lambda: h.pwrite(b"\\x55" * 4096, 8192, nbd.CMD_FLAG_FUA))
attempt("df", lambda: h.pread(4096, 0, nbd.CMD_FLAG_DF))
attempt("fast-zero", lambda: h.zero(4096, 0, nbd.CMD_FLAG_FAST_ZERO))
attempt("write", lambda: h.pwrite(b"\\x66" * 4096, 12288))
print("JSON", json.dumps(out))
"""


# "The client MUST NOT use a flag-exposed feature ... unless its flag was set" (CMD-008), with the
# per-command rules FLUSH-003, WZ-014, TRIM-006, RD-003/RD-005 (DF), WZ-004/WZ-009/WZ-015 (FAST_ZERO),
# CMD-014 (flags valid per command); "Clients wanting further messages must negotiate them first"
# (INTEROP-013).  The server advertises no optional transmission flag; the client is asked for each.
@pytest.mark.req("CMD-008", "FLUSH-003", "WZ-014", "TRIM-006", "RD-003", "RD-005", "WZ-004", "WZ-009", "WZ-015",
                 "CMD-014", "INTEROP-013", "INTEROP-011")
@pytest.mark.feature("NBD_CMD_FLUSH")
def test_no_optional_flags_write(request: Any, client_peer: Any, kind: str, peer_workdir: Any, verdict: Any,
                           evidence: Any) -> None:
    """Nothing optional advertised: zero, trim, flush, cache, FUA, DF never reach the wire; data ok."""
    runner = runner_for(request, kind)
    with own_server(peer_workdir, "noflags", persona=NOTHING) as own:
        watch_all(verdict, evidence, [own])
        uri = own.uri()
        if kind == "qemu":
            cmds = ["write -z 0 4k", "discard 0 4k", "flush", "write -f -P 0x55 8k 4k", "write -P 0x66 12k 4k",
                    "read -v 0 16"]
            step = Step("ops", ["qemu-io", "-f", "raw", *(a for c in cmds for a in ("-c", c)), uri])
        elif kind == "libnbd":
            step = Step("ops", ["nbdsh", "-u", uri, "-c", NBDSH_TRY_ALL, "-c", "h.shutdown()"])
        else:
            step = Step("ops", call=lambda: _nbdref_try_all(uri))
        res = run_steps(runner, [step])["ops"]
        records = own.records()
        held = bytes(own.server.exports[0].backend.pread(12288, 4096))
    reqs = [q for r in records for q in requests_sent(r)]
    for what, ids, hit in (
            ("NBD_CMD_FLUSH", ("FLUSH-003", "CMD-008"), lambda q: q.command == Cmd.FLUSH),
            ("NBD_CMD_WRITE_ZEROES", ("WZ-014", "CMD-008"), lambda q: q.command == Cmd.WRITE_ZEROES),
            ("NBD_CMD_TRIM", ("TRIM-006", "CMD-008"), lambda q: q.command == Cmd.TRIM),
            ("NBD_CMD_CACHE", ("CMD-008",), lambda q: q.command == Cmd.CACHE),
            ("NBD_CMD_FLAG_FUA", ("CMD-008", "CMD-014"), lambda q: bool(q.flags & CmdFlag.FUA)),
            ("NBD_CMD_FLAG_DF", ("RD-003", "RD-005", "CMD-014"), lambda q: bool(q.flags & CmdFlag.DF)),
            ("NBD_CMD_FLAG_FAST_ZERO", ("WZ-004", "WZ-009", "WZ-015"), lambda q: bool(q.flags & CmdFlag.FAST_ZERO))):
        sent = [f"{Cmd(q.command).name}@{q.offset} flags {q.flags:#x}" for q in reqs if hit(q)]
        verdict.expect(not sent, *ids, expected=f"no {what}: its transmission flag was not advertised",
                       observed=", ".join(sent[:4]) or "none sent")
    other = [f"{Cmd(q.command).name} flags {q.flags:#x}" for q in reqs
             if q.command not in DATA_COMMANDS or q.flags & ~CmdFlag.PAYLOAD_LEN]
    verdict.expect(not other, "INTEROP-013", expected="only READ/WRITE/DISC without flags (nothing optional was "
                   "advertised)", observed=", ".join(other[:8]) or "none")
    verdict.expect(held == b"\x66" * 4096, "INTEROP-011", expected="the plain write lands",
                   observed=f"exit {res.rc}: {res.out[-300:]!r}")
    verdict.info(f"{kind}: {res.out[-400:]!r}")


def _nbdref_try_all(uri: str) -> str:
    from nbdref._errors import LocalProtocolError
    from nbdref.client import Client, ClientError
    out: dict[str, str] = {}
    with Client(timeout=15) as c:
        c.connect_uri(uri)
        for name, f in [("zero", lambda: c.zero(4096, 0)), ("trim", lambda: c.trim(4096, 0)),
                        ("flush", c.flush), ("cache", lambda: c.cache(4096, 0)),
                        ("fua", lambda: c.pwrite(b"\x55" * 4096, 8192, CmdFlag.FUA)),
                        ("df", lambda: c.pread(4096, 0, CmdFlag.DF)),
                        ("write", lambda: c.pwrite(b"\x66" * 4096, 12288))]:
            try:
                f()
                out[name] = "ok"
            except (ClientError, LocalProtocolError) as e:     # the strict client refuses before sending
                out[name] = f"refused: {e}"
        c.shutdown()
    return "JSON " + json.dumps(out)


SINGLE_CONN = with_changes(persona("nbdref"), name="no-multi-conn", multi_conn_ro=False, multi_conn_rw=False)


# "Without NBD_FLAG_CAN_MULTI_CONN, clients SHOULD NOT spread commands for one export over several
# connections" (MC-003): nbdcopy is asked for four connections; qemu and the reference client use one.
@pytest.mark.req("MC-003")
@pytest.mark.feature("NBD_FLAG_CAN_MULTI_CONN-readonly")
def test_one_connection_without_multi_conn(request: Any, client_peer: Any, kind: str, peer_workdir: Any,
                                           verdict: Any, evidence: Any) -> None:
    """No CAN_MULTI_CONN: the client's requests stay on one connection at a time."""
    runner = runner_for(request, kind)
    with own_server(peer_workdir, "single", persona=SINGLE_CONN, read_only=True) as own:
        watch_all(verdict, evidence, [own])
        if kind == "libnbd":
            step = Step("copy", ["nbdcopy", "--connections=4", own.uri(), "null:"])
        else:
            step = ops_step(kind, "copy", own.uri(), [("read-unaligned", 0, 4096, None), ("read-2M", 0, 2 * MiB, None)])
        res = run_steps(runner, [step])["copy"]
        records = own.records()
    assert res.ok, f"the client failed: {res.out[-300:]}"
    spread = overlapping_connections(records)
    verdict.expect(not spread, "MC-003", expected="requests on one connection at a time",
                   observed=f"overlapping connections {spread}" if spread else describe(records))
