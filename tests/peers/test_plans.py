"""Command lines and configs the adapters build (no process started): the quirks of each peer."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from fixtures.exports import ExportRequest, expected_bytes, materialize, pattern_bytes
from fixtures.launch import ClientRunner, LocalCommandRunner, make_uri
from fixtures.launchers.base import PeerUnsupported, RunningServer
from fixtures.peers import server_adapter
from fixtures.peers.base import ServerContext, version_of_banner
from fixtures.peers.nbd_server import NbdServer
from fixtures.tls_material import TlsMaterial

from .helpers import custom_spec, server_spec

X = Path("/t/x509")
TLS = TlsMaterial(directory=Path("/t"), x509_dir=X, ca_cert=X / "ca-cert.pem", ca_key=X / "ca-key.pem",
                  server_cert=X / "server-cert.pem", server_key=X / "server-key.pem", client_cert=X / "client-cert.pem",
                  client_key=X / "client-key.pem", psk_dir=Path("/t/psk"), psk_file=Path("/t/psk/keys.psk"),
                  psk_identity="alice", psk_key=b"k", other_ca_cert=Path("/t/other-ca.pem"))


def ctx(impl: str, export: ExportRequest, *, transport: str = "unix", version=(7, 2), spec=None) -> ServerContext:
    return ServerContext(spec=spec or server_spec(impl), export=export, disk=Path("/w/disk.raw"), workdir=Path("/w"),
                         transport=transport, socket=Path("/w/nbd.sock") if transport == "unix" else None,  # type: ignore[arg-type]
                         port=10809 if transport == "tcp" else None, tls=TLS, version=version)


@pytest.mark.parametrize(("impl", "version", "want"), [("qemu-nbd", (5, 2), "tcp"), ("qemu-nbd", (7, 2), "unix"),
                                                       ("qemu-storage-daemon", (5, 2), "tcp"),
                                                       ("nbdkit", (1, 24), "unix")])
def test_qemu_52_tls_needs_tcp(impl: str, version: tuple[int, ...], want: str) -> None:
    a = server_adapter(server_spec(impl))
    assert a.transport(ExportRequest(tls="x509"), version, None) == want
    assert a.transport(ExportRequest(), version, None) == "unix", "plaintext stays on unix sockets"


def test_qemu_nbd_flags() -> None:
    e = ExportRequest(read_only=True, image_format="qcow2", dirty_bitmaps=("b0", "b1"), allocation_depth=True,
                      tls="x509", tls_verify_peer=True, description="d")
    argv = server_adapter(server_spec("qemu-nbd")).plan(ctx("qemu-nbd", e)).argv
    joined = " ".join(argv)
    assert "--persistent" in argv and "-k /w/nbd.sock" in joined and "-f qcow2" in joined
    assert "-B b0 -B b1" in joined and "-A" in argv and "--read-only" in argv and "-D d" in joined
    assert "tls-creds-x509,id=tls0,endpoint=server,dir=/t/x509,verify-peer=on" in joined
    assert argv[-1] == "/w/disk.raw"


def test_qemu_nbd_tcp_and_psk() -> None:
    argv = server_adapter(server_spec("qemu-nbd")).plan(ctx("qemu-nbd", ExportRequest(tls="psk"), transport="tcp")).argv
    joined = " ".join(argv)
    assert "-b 127.0.0.1 -p 10809" in joined and "-k" not in argv
    assert "tls-creds-psk,id=tls0,endpoint=server,dir=/t/psk" in joined


def test_storage_daemon_export() -> None:
    e = ExportRequest(image_format="qcow2", dirty_bitmaps=("b0",), allocation_depth=True, read_only=True)
    argv = server_adapter(server_spec("qemu-storage-daemon")).plan(ctx("qemu-storage-daemon", e)).argv
    export = argv[argv.index("--export") + 1]
    assert "name=exp" in export and "writable=off" in export and "bitmaps.0=b0" in export
    assert "allocation-depth=on" in export
    assert "driver=qcow2,node-name=disk0,file=file0" in argv
    assert argv[argv.index("--nbd-server") + 1] == "addr.type=unix,addr.path=/w/nbd.sock"


def test_nbdkit_tls_forms() -> None:
    a = server_adapter(server_spec("nbdkit"))
    x = a.plan(ctx("nbdkit", ExportRequest(tls="x509", tls_verify_peer=True))).argv
    assert x[:2] == ["nbdkit", "-f"] and "--tls-certificates=/t/x509" in x and "--tls-verify-peer" in x
    p = a.plan(ctx("nbdkit", ExportRequest(tls="psk"))).argv
    assert "--tls-psk=/t/psk/keys.psk" in p and x[-2:] == ["file", "/w/disk.raw"]
    with pytest.raises(PeerUnsupported):
        a.plan(ctx("nbdkit", ExportRequest(image_format="qcow2")))


def test_nbd_server_config() -> None:
    a = NbdServer()
    unix = a.plan(ctx("nbd-server", ExportRequest(read_only=True, tls="x509")))
    conf = next(iter(unix.files.values()))
    assert unix.daemonizes and "-d" not in unix.argv
    assert "unixsock = /w/nbd.sock" in conf and "port =" not in conf and "allowlist = true" in conf
    assert "force_tls = true" in conf and "certfile = /t/x509/server-cert.pem" in conf
    assert "[exp]\nexportname = /w/disk.raw\nreadonly = true" in conf
    tcp = next(iter(a.plan(ctx("nbd-server", ExportRequest(), transport="tcp")).files.values()))
    assert "port = 10809" in tcp and "listenaddr = 127.0.0.1" in tcp and "unixsock" not in tcp


def test_nbd_server_psk_refusal_follows_the_timeline(monkeypatch: pytest.MonkeyPatch) -> None:
    """The timeline's TLS-PSK entry says nbd-server has no PSK: not-applicable, with the entry as the
    reason.  Should the timeline say yes one day, this adapter (which writes no PSK configuration)
    fails as a harness error instead of skipping."""
    from fixtures import timeline
    from fixtures.launchers.base import PeerStartError

    psk = ExportRequest(tls="psk")
    with pytest.raises(PeerUnsupported, match=r"nbd-server has no TLS-PSK \(TLS-PSK: nbd server 3\.24: unsupported"):
        NbdServer().plan(ctx("nbd-server", psk, version=(3, 24)))
    with pytest.raises(PeerUnsupported, match="timeline TLS-PSK"):        # no version known at all
        NbdServer().plan(ctx("nbd-server", psk, version=()))
    real = timeline.load()
    features = {**real.features, "TLS-PSK": {**real.features["TLS-PSK"],
                                             "nbd": {"server": {"since": "3.30", "status": "supported"}}}}
    monkeypatch.setattr(timeline, "load", lambda: replace(real, features=features))
    with pytest.raises(PeerStartError, match="no TLS-PSK configuration") as raised:
        NbdServer().plan(ctx("nbd-server", psk, version=(3, 30)))
    assert not isinstance(raised.value, PeerUnsupported)


def test_nbd_server_export_config_option() -> None:
    spec = server_spec("nbd-server", options=(("export_config", "flush = true; fua = true\ntrim = true"),))
    conf = next(iter(NbdServer().plan(ctx("nbd-server", ExportRequest(), spec=spec)).files.values()))
    assert "[exp]\nexportname = /w/disk.raw\nflush = true\nfua = true\ntrim = true\n" in conf


def test_nbdkit_plugin_filters_and_args() -> None:
    spec = server_spec("nbdkit", options=(("args", "--oldstyle -t 2"), ("filters", "exportname, cow"),
                                          ("plugin_args", "exportname=exp 'exportname-list=explicit'")))
    argv = server_adapter(spec).plan(ctx("nbdkit", ExportRequest(), spec=spec)).argv
    tail = argv[argv.index("--oldstyle"):]
    assert tail == ["--oldstyle", "-t", "2", "--filter=exportname", "--filter=cow", "file", "/w/disk.raw",
                    "exportname=exp", "exportname-list=explicit"]
    mem = server_spec("nbdkit", options=(("plugin", "memory"),))
    assert server_adapter(mem).plan(ctx("nbdkit", ExportRequest(size=8192), spec=mem)).argv[-2:] == [
        "memory", "size=8192"]
    with pytest.raises(PeerUnsupported, match="memory"):
        server_adapter(mem).plan(ctx("nbdkit", ExportRequest(content="pattern"), spec=mem))
    with pytest.raises(PeerUnsupported, match="custom command"):
        other = server_spec("nbdkit", options=(("plugin", "curl"),))
        server_adapter(other).plan(ctx("nbdkit", ExportRequest(), spec=other))


@pytest.mark.parametrize("impl", ["qemu-nbd", "qemu-storage-daemon", "nbdref"])
def test_args_option_reaches_the_command(impl: str) -> None:
    spec = server_spec(impl, options=(("args", "--x 'a b'"),))
    argv = server_adapter(spec).plan(ctx(impl, ExportRequest(), spec=spec)).argv
    i = argv.index("--x")
    assert argv[i + 1] == "a b"
    if impl == "qemu-nbd":
        assert argv[-1] == "/w/disk.raw", "the image stays last"


def test_custom_template() -> None:
    spec = custom_spec("srv", "--sock={socket}", "{disk}", "{size}", "{export}", "{psk_identity}")
    argv = server_adapter(spec).plan(ctx("custom", ExportRequest(size=4096), spec=spec)).argv
    assert argv == ["srv", "--sock=/w/nbd.sock", "/w/disk.raw", "4096", "exp", "alice"]
    assert server_adapter(custom_spec("s", "-p", "{port}")).transport(ExportRequest(), (), None) == "tcp"


def test_uris() -> None:
    assert make_uri(export="exp", transport="unix", socket_path=Path("/w/s")) == "nbd+unix:///exp?socket=/w/s"
    assert make_uri(export="a b", transport="tcp", port=5, tls="x509", material=TLS) == \
        "nbds://127.0.0.1:5/a%20b?tls-certificates=/t/x509"
    assert make_uri(export="", transport="tcp", port=5, tls="psk", material=TLS) == \
        "nbds://alice@127.0.0.1:5/?tls-psk-file=/t/psk/keys.psk"


def test_qemu_client_tls_over_unix_sets_hostname() -> None:
    srv = RunningServer(spec=None, export=ExportRequest(tls="x509"), uri="u", export_name="exp", transport="unix",
                        socket=Path("/w/nbd.sock"), host=None, port=None, log_path=Path("/w/log"), workdir=Path("/w"),
                        disk=None, tls=TLS)
    argv = ClientRunner(None, LocalCommandRunner()).tool_argv("qemu-io", srv, "-c", "read 0 512")
    assert argv[:3] == ["qemu-io", "-r", "--object"]
    assert argv[-1] == ("driver=nbd,server.type=unix,server.path=/w/nbd.sock,export=exp,tls-creds=tls0,"
                        "tls-hostname=localhost")
    img = ClientRunner(None, LocalCommandRunner()).tool_argv("qemu-img", srv, "info", "--output=json")
    assert img[:2] == ["qemu-img", "info"] and img[-2] == "--output=json"


@pytest.mark.parametrize(("text", "want"), [("1:7.2+dfsg-7", (7, 2)), ("qemu-nbd 7.2.22 (Debian 1:7.2)", (7, 2, 22)),
                                            ("This is nbd-server version 3.24", (3, 24)), ("1.32.5-1", (1, 32, 5)),
                                            ("none", ())])
def test_version_of_banner(text: str, want: tuple[int, ...]) -> None:
    assert version_of_banner(text) == want


def test_export_content(tmp_path: Path) -> None:
    assert pattern_bytes(1016, 16) == (1).to_bytes(8, "big") + (2).to_bytes(8, "big"), "crosses a sector"
    assert pattern_bytes(512, 8) == (1).to_bytes(8, "big")
    seeded = ExportRequest(size=8192, content=b"s")
    disk = materialize(seeded, tmp_path)
    assert disk.read_bytes() == expected_bytes(seeded) and expected_bytes(seeded) != bytes(8192)
    zero = materialize(ExportRequest(size=1 << 20), tmp_path / "z")
    assert zero.stat().st_blocks == 0, "a zero export is a sparse file"
    with pytest.raises(ValueError):
        ExportRequest(dirty_bitmaps=("b",))
    with pytest.raises(ValueError):
        ExportRequest(size=1000)


def test_writes_over_content(tmp_path: Path) -> None:
    req = ExportRequest(size=1 << 20, writes=((0, b"\x01" * 512), (4096, b"ab"), (4097, b"c")))
    disk = materialize(req, tmp_path)
    data = disk.read_bytes()
    assert data == expected_bytes(req) and data[:512] == b"\x01" * 512 and data[4096:4098] == b"ac"
    assert expected_bytes(req, 4097, 2) == b"c\0", "a window of the expected bytes sees the writes too"
    assert disk.stat().st_blocks * 512 < 1 << 20, "the rest of a zero disk stays a hole"
    patterned = ExportRequest(size=8192, content="pattern", writes=((1000, b"xy"),))
    assert materialize(patterned, tmp_path / "p").read_bytes() == expected_bytes(patterned)
    with pytest.raises(ValueError, match="outside"):
        ExportRequest(size=4096, writes=((4095, b"ab"),))


def test_qcow2_writes_go_through_qemu(tmp_path: Path) -> None:
    import shutil
    import subprocess

    if not (shutil.which("qemu-img") and shutil.which("qemu-io")):
        pytest.skip("qemu-utils is not installed")
    req = ExportRequest(size=1 << 20, image_format="qcow2", dirty_bitmaps=("b0",), writes=((65536, b"\x07" * 4096),))
    qcow = materialize(req, tmp_path)
    raw = tmp_path / "back.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(qcow), str(raw)], check=True, timeout=30)
    assert raw.read_bytes() == expected_bytes(req)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["back.raw", "disk.qcow2"], "no scratch files left"


def test_big_content_comes_from_a_cached_master(tmp_path: Path) -> None:
    req = ExportRequest(size=4 << 20, content=b"cache-test")
    a = materialize(req, tmp_path / "a")
    b = materialize(req, tmp_path / "b")
    assert a.read_bytes() == b.read_bytes() == expected_bytes(req)
    a.write_bytes(b"x")                            # a test writing its disk must not touch the master
    assert materialize(req, tmp_path / "c").read_bytes() == expected_bytes(req)


def test_local_runner_gives_up_when_a_killed_commands_pipes_stay_open(tmp_path, monkeypatch) -> None:
    """After killpg a child that left the group (setsid) still holds stdout: the runner must not
    wait for it forever but close the pipes and say so."""
    import contextlib
    import os
    import signal
    import time

    import fixtures.launch as launch

    monkeypatch.setattr(launch, "KILL_GRACE", 0.5)
    pidfile = tmp_path / "escapee.pid"
    script = f"setsid sh -c 'echo $$ > {pidfile}; exec sleep 30' & sleep 30"
    t0 = time.monotonic()
    try:
        res = LocalCommandRunner().run(["sh", "-c", script], timeout=0.5)
    finally:
        deadline = time.monotonic() + 5
        while not pidfile.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        if pidfile.exists():
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pidfile.read_text()), signal.SIGKILL)
    assert res.timed_out and res.rc is None and not res.ok
    assert "output abandoned" in res.stderr
    assert time.monotonic() - t0 < 5
