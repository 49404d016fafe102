"""The validating proxy between the reference client and the reference server (both in-process).

Bytes pass unchanged; a breach is attributed to the side that committed it, with the id the real
receiver records too; the proxy never hangs when one side dies; the pcapng opens in tshark.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from nbdref import RemoteProtocolError
from nbdref import _wire as w
from nbdref import events as ev
from nbdref._constants import Cmd, CmdFlag
from nbdref.client import Client
from nbdref.server import Export

MiB = 1 << 20
ROOT = Path(__file__).resolve().parents[2]


def _client(uri: str, *, structured: bool = True, extended: bool = True, timeout: float = 10) -> Client:
    c = Client()
    c.set_timeout(timeout)
    c.set_request_structured_replies(structured)
    c.set_request_extended_headers(extended)
    c.connect_uri(uri)
    return c


def _ended(p, n: int = 1, timeout: float = 10.0) -> list:
    deadline = time.monotonic() + timeout
    while len(p.records) < n and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(p.records) >= n, f"{len(p.records)} connections reached the proxy"
    assert p.wait_closed(timeout), [r.reason for r in p.records]
    return p.records


@pytest.mark.parametrize(("structured", "extended"), [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize("listen", ["unix", "tcp"])
def test_data_passes_unchanged(serve, proxy, structured, extended, listen):
    s = serve([Export.memory("exp", 16 * MiB)])
    p = proxy(s.uri, **({"listen": "nbd://127.0.0.1:0"} if listen == "tcp" else {}))
    data = os.urandom(5 * MiB + 123)
    c = _client(p.uri_for("exp"), structured=structured, extended=extended)
    c.pwrite(data, 4096)
    c.pwrite(b"x" * 100, 0)
    c.zero(MiB, 12 * MiB)
    c.trim(4096, 15 * MiB)
    c.flush()
    back = c.pread(len(data), 4096)
    neg = (c.get_structured_replies_negotiated(), c.get_extended_headers_negotiated())
    c.shutdown()
    assert hashlib.sha256(back).digest() == hashlib.sha256(data).digest()
    # The server holds what a direct client reads: nothing was changed on the way in either.
    d = _client(s.uri_for("exp"))
    assert d.pread(len(data), 4096) == data and d.pread(100, 0) == b"x" * 100
    assert d.pread(MiB, 12 * MiB) == bytes(MiB)
    d.shutdown()
    (r,) = _ended(p)
    assert r.violations == [] and r.errors == [] and r.checking, (r.unchecked, str(r.transcript))
    assert r.bytes_from_client > len(data) and r.bytes_from_server > len(data)
    assert (r.negotiated["structured_replies"] or r.negotiated["extended_headers"], r.negotiated["extended_headers"]) \
        == (neg[0] or neg[1], neg[1])
    assert r.negotiated["handshake"] == "GO" and r.negotiated["commands"]["WRITE"] == 2
    lines = r.transcript.lines()
    assert any(x.startswith("C: NBD_CMD_READ") for x in lines) and any(x.startswith("S: ") for x in lines)
    assert r.reason == "both sides closed"


@pytest.mark.parametrize(
    ("fault", "rule"),
    [("chunk-outside-range", "SR-032"), ("overlapping-chunks", "SR-033"), ("error-chunk-zero-error", None)],
)
def test_server_breach_is_the_servers(serve, proxy, fault, rule):
    s = serve([Export.memory("exp", MiB)], fault=fault, io_timeout=5)
    p = proxy(s.uri)
    c = _client(p.uri_for("exp"), extended=False)
    with pytest.raises(RemoteProtocolError):
        c.pread(8192, 0)
    client_saw = [v.req_id for v in c.connection.violations]
    c.close()
    (r,) = _ended(p)
    ids = [v.req_id for v in r.by("S")]
    assert ids, str(r.transcript)
    assert ids[: len(client_saw)] == client_saw  # what the reference client itself found, same order
    assert rule is None or rule in ids
    assert all(v.binds in ("server", "both") for v in r.by("S"))
    assert not [v for v in r.by("C") if v.req_id != "DISC-024"]  # the client's hang-up, at most


def test_client_breach_is_the_clients(serve, proxy):
    s = serve([Export.memory("exp", MiB)])
    p = proxy(s.uri)
    c = _client(p.uri_for("exp"), structured=False, extended=False)
    # FUA on a READ: "The client MUST NOT set NBD_CMD_FLAG_FUA" on commands other than writes (FUA-003)
    bad = w.encode_request(ev.Request(cookie=77, command=Cmd.READ, flags=CmdFlag.FUA, offset=0, length=512))
    c._sendall(c.connection.send_raw(bad))
    time.sleep(0.3)  # the server answers; the client never reads that answer
    c.close()
    (r,) = _ended(p)
    assert "FUA-003" in [v.req_id for v in r.by("C")], str(r.transcript)
    assert r.by("S") == [], str(r.transcript)
    assert s.wait_closed(5)
    assert "FUA-003" in [v.req_id for rec in s.records for v in rec.violations]  # the server agrees


def test_hard_disconnect_closes_both_sides(serve, proxy):
    s = serve([Export.memory("exp", MiB)], fault="chunk-outside-range", io_timeout=5)
    p = proxy(s.uri, hard_disconnect=True)
    c = _client(p.uri_for("exp"), extended=False)
    with pytest.raises(Exception):  # noqa: B017 - the violation or the hang-up, whichever the client sees first
        c.pread(8192, 0)
    c.close()
    (r,) = _ended(p)
    assert r.reason.startswith("hard disconnect after SR-032"), r.reason


def _silent_server(path: str, behaviour: str) -> threading.Thread:
    """A fake upstream: sends half a greeting, then closes (``cut``) or stays silent (``stall``)."""
    lsock = socket.socket(socket.AF_UNIX)
    lsock.bind(path)
    lsock.listen(1)
    lsock.settimeout(10)

    def run() -> None:
        conn, _ = lsock.accept()
        conn.sendall(b"NBDMAGIC")
        if behaviour == "stall":
            conn.settimeout(20)
            try:
                conn.recv(1)
            except OSError:
                pass
        conn.close()
        lsock.close()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_server_dies_client_gets_eof(proxy, sockdir):
    up = str(sockdir / "up.sock")
    t = _silent_server(up, "cut")
    p = proxy(f"nbd+unix:///?socket={up}")
    sock = socket.socket(socket.AF_UNIX)
    sock.settimeout(5)
    sock.connect(p.uri_for("").split("socket=")[1])
    got = b""
    while chunk := sock.recv(100):  # EOF within the timeout, not a hang
        got += chunk
    sock.close()
    assert got == b"NBDMAGIC"
    (r,) = _ended(p)
    t.join(5)
    # The server closed in the middle of its greeting: the proxy says so and closed the client.
    assert "truncated" in str(r.transcript) or "EOF" in str(r.transcript)


def test_client_dies_server_side_closed(serve, proxy):
    s = serve([Export.memory("exp", MiB)])
    p = proxy(s.uri)
    c = _client(p.uri_for("exp"))
    c.pread(4096, 0)
    c._sock.close()  # no NBD_CMD_DISC: the client just vanishes
    (r,) = _ended(p, timeout=8)
    assert s.wait_closed(8), "the proxy left the server side open"
    assert [v.req_id for v in r.by("C")] == ["DISC-024"]  # the client's hard disconnect, attributed to it
    assert r.by("S") == []


def test_stalled_server_does_not_hang_the_proxy(proxy, sockdir):
    up = str(sockdir / "up.sock")
    _silent_server(up, "stall")
    p = proxy(f"nbd+unix:///?socket={up}", idle_timeout=1.0)
    sock = socket.socket(socket.AF_UNIX)
    sock.settimeout(10)
    sock.connect(p.uri_for("").split("socket=")[1])
    start = time.monotonic()
    got = b""
    while chunk := sock.recv(100):
        got += chunk
    sock.close()
    assert time.monotonic() - start < 5
    (r,) = _ended(p)
    assert "no bytes from either side" in r.reason


def test_unreachable_server_closes_the_client(proxy, sockdir):
    p = proxy(f"nbd+unix:///?socket={sockdir}/nobody.sock", io_timeout=2)
    sock = socket.socket(socket.AF_UNIX)
    sock.settimeout(5)
    sock.connect(p.uri_for("").split("socket=")[1])
    assert sock.recv(100) == b""
    sock.close()
    (r,) = _ended(p)
    assert "cannot connect" in r.reason


def test_pcapng_opens_in_tshark(serve, proxy, sockdir):
    tshark = shutil.which("tshark")
    if tshark is None:
        if os.environ.get("CI") == "true":
            pytest.fail("tshark is not installed (Debian package tshark, in ./run's DEB_PACKAGES)")
        pytest.skip("tshark not installed (Debian package tshark)")
    s = serve([Export.memory("exp", 4 * MiB)])
    pcap = sockdir / "seen.pcapng"
    p = proxy(s.uri, pcap=pcap)
    # Wireshark 4.0's NBD dissector knows compact requests and simple replies only.
    c = _client(p.uri_for("exp"), structured=False, extended=False)
    c.pwrite(os.urandom(200_000), 0)  # more than one 65000-byte segment
    c.pread(4096, 8192)
    c.shutdown()
    _ended(p)
    p.stop()
    out = subprocess.run([tshark, "-r", str(pcap), "-Y", "nbd"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert any("Write Request" in x for x in lines) and any("Read Request" in x for x in lines), out.stdout
    assert any("Disconnect Request" in x for x in lines), out.stdout
    assert any("Read Response" in x for x in lines), out.stdout
    # The TCP framing is consistent: no analysis warnings (lost segments, bad checksums ...).
    warn = subprocess.run([tshark, "-r", str(pcap), "-o", "tcp.check_checksum:TRUE", "-Y",
                           "tcp.analysis.flags || tcp.checksum.status == 0 || ip.checksum.status == 0"],
                          capture_output=True, text=True, timeout=60)
    assert warn.returncode == 0 and warn.stdout.strip() == "", warn.stdout


def test_cli_proxies_and_reports(serve, sockdir):
    s = serve([Export.memory("exp", MiB)])
    listen = f"nbd+unix:///?socket={sockdir}/cli.sock"
    env = dict(os.environ, PYTHONPATH=str(ROOT / "impl"))
    proc = subprocess.Popen([sys.executable, "-m", "nbdref", "proxy", "--listen", listen, "--to", s.uri],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        uri = proc.stdout.readline().strip()  # type: ignore[union-attr]
        assert uri.startswith("nbd+unix://"), uri
        c = _client(uri.replace(":///", ":///exp", 1) if ":///?" in uri else uri)
        assert c.pread(512, 0) == bytes(512)
        c.shutdown()
        time.sleep(0.5)
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err
    assert "connection 1: no violations" in err, err


def test_oversize_server_payload_is_reported_not_buffered(serve, proxy):
    """A hostile length does not make the proxy allocate it: the checks stop, bytes still flow."""
    s = serve([Export.memory("exp", MiB)], fault="oversize-length", io_timeout=3)
    p = proxy(s.uri)
    c = _client(p.uri_for("exp"), structured=False, extended=False, timeout=3)
    with pytest.raises(Exception):  # noqa: B017 - the client's own error or its timeout
        c.pread(4096, 0)
    c.close()
    (r,) = _ended(p)
    assert r.by("S") or [side for side, _ in r.errors] == ["S"], str(r.transcript)
    assert {v.req_id for v in r.by("C")} <= {"DISC-024"}


@pytest.mark.parametrize(("server_kw", "export", "handshake"), [
    ({}, "exp", "GO"),
    ({"persona": "qemu-2.6"}, "exp", "EXPORT_NAME"),   # no NBD_OPT_GO: the client falls back
    ({"oldstyle": True}, "", "oldstyle"),
])
def test_negotiated_records_how_the_handshake_ended(serve, proxy, server_kw, export, handshake):
    s = serve([Export.memory(export or "exp", MiB)], **server_kw)
    p = proxy(s.uri)
    c = _client(p.uri_for(export), extended=False)
    assert c.pread(512, 0) == bytes(512)
    c.shutdown()
    (r,) = _ended(p)
    assert r.negotiated["handshake"] == handshake, r.negotiated
    assert r.violations == [], str(r.transcript)
