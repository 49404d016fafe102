"""``python -m nbdref serve``: listing, URI printing, Unix/TCP, --stdin, socket activation, pid file."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys

import pytest
from nbdref.cli import serve as cli

from .conftest import NBDSH, run

SERVE = [sys.executable, "-m", "nbdref", "serve"]
needs_nbdinfo = pytest.mark.skipif(not shutil.which("nbdinfo"), reason="libnbd-bin not installed")


def test_parse_size():
    assert cli.parse_size("1G") == 1 << 30 and cli.parse_size("64M") == 64 << 20
    assert cli.parse_size("4096") == 4096 and cli.parse_size("512k") == 512 << 10
    assert cli.parse_block_size("512,4k,32M") == (512, 4096, 32 << 20)


def test_list_personas_and_faults(capsys):
    assert cli.main(["--list-personas"]) == 0
    out = capsys.readouterr().out
    assert "qemu-2.6" in out and "nbd-server-3.24" in out and "undocumented" in out
    assert cli.main(["--list-faults"]) == 0
    assert "disconnect-handshake" in capsys.readouterr().out


def test_bad_persona_is_an_error(capsys):
    assert cli.main(["--persona", "qemu-0.0"]) == 2
    assert "unknown persona" in capsys.readouterr().err


def test_inconsistent_options_are_errors(capsys):
    # NBD_REP_ERR_BLOCK_SIZE_REQD: "SHOULD NOT send this error if it is using default size constraints".
    assert cli.main(["--block-size-required", "--size", "1M"]) == 2
    assert "block_size_required needs block_size" in capsys.readouterr().err
    # Oldstyle has no STARTTLS.
    assert cli.main(["--stdin", "--oldstyle", "--tls", "require", "--tls-psk", "/nonexistent"]) != 0
    assert "cannot do TLS" in capsys.readouterr().err


class _Served:
    """A `serve` subprocess; stopped with SIGTERM (then SIGKILL) whatever happens."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen([*SERVE, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def __enter__(self) -> _Served:
        line = self.proc.stdout.readline().strip()  # type: ignore[union-attr]
        assert line.startswith("nbd"), (line, self.proc.stderr.read() if self.proc.poll() is not None else "")  # type: ignore[union-attr]
        self.uri = line
        return self

    def __exit__(self, *exc: object) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.rc = self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
            raise
        finally:
            self.stderr = self.proc.stderr.read()  # type: ignore[union-attr]
            self.proc.stdout.close()  # type: ignore[union-attr]
            self.proc.stderr.close()  # type: ignore[union-attr]


@needs_nbdinfo
def test_unix_socket_with_name_description_and_pid_file(sockdir):
    sock, pid = sockdir / "s.sock", sockdir / "s.pid"
    with _Served("--unix", str(sock), "--size", "2M", "--name", "disk", "--description", "hi",
                 "--pid-file", str(pid)) as s:
        assert s.uri == f"nbd+unix:///disk?socket={sock}"
        assert pid.read_text().strip() == str(s.proc.pid)
        out = run(["nbdinfo", s.uri]).stdout
        assert "export-size: 2097152" in out and "description: hi" in out
    assert s.rc == 0 and not pid.exists() and not sock.exists()
    assert "closed" in s.stderr  # one log line per disconnect


@needs_nbdinfo
def test_tcp_port_binds_loopback(sockdir):
    with _Served("--port", "0", "--size", "1M", "--read-only") as s:
        assert s.uri.startswith("nbd://127.0.0.1:")
        assert run(["nbdinfo", "--is", "read-only", s.uri], check=False).returncode == 0


@needs_nbdinfo
def test_file_export_and_block_size(sockdir, tmp_path):
    img = tmp_path / "d.img"
    with _Served("--unix", str(sockdir / "f.sock"), "--file", str(img), "--size", "4M",
                 "--block-size", "512,4096,1M") as s:
        out = run(["nbdinfo", s.uri]).stdout
        assert "block_size_minimum: 512" in out and "block_size_maximum: 1048576" in out
    assert img.stat().st_size == 4 << 20


def test_stdin_mode_with_connect_command():
    """libnbd's connect_command runs the server with a socketpair on stdin/stdout (like nbdkit -s)."""
    script = f"h.connect_command({[*SERVE, '--stdin', '--size', '3M']!r}); print(h.get_size()); h.shutdown()"
    assert run([*NBDSH, "-c", script]).stdout.strip() == str(3 << 20)


@needs_nbdinfo
def test_nbdinfo_starts_server_by_socket_activation():
    """``nbdinfo -- [ CMD ]`` passes LISTEN_FDS: detected without --socket-activation."""
    assert run(["nbdinfo", "--size", "--", "[", *SERVE, "--size", "3M", "]"]).stdout.strip() == str(3 << 20)


@needs_nbdinfo
def test_socket_activation():
    script = f"h.connect_systemd_socket_activation({[*SERVE, '--socket-activation', '--size', '5M']!r}); " \
             "print(h.get_size()); h.shutdown()"
    assert run([*NBDSH, "-c", script]).stdout.strip() == str(5 << 20)


def test_socket_activation_refuses_foreign_pid():
    env = dict(os.environ, LISTEN_FDS="1", LISTEN_PID="1")
    r = subprocess.run([*SERVE, "--socket-activation"], capture_output=True, text=True, env=env, timeout=30)
    assert r.returncode != 0 and "LISTEN_PID" in r.stderr


@pytest.mark.parametrize("stdin", ["pipe", "dgram", "stream"])
def test_stdin_transport_leaks_no_descriptor(monkeypatch, stdin):
    """--stdin probes fd 0 with a dup: whatever fd 0 is, only the transport's own fds stay open."""
    import socket

    from nbdref.server import Export, Server

    if stdin == "pipe":
        r, w = os.pipe()
        ends = [r, w]
    else:
        kind = socket.SOCK_DGRAM if stdin == "dgram" else socket.SOCK_STREAM
        a, b = socket.socketpair(socket.AF_UNIX, kind)
        r = w = a.detach()
        ends = [r, b.detach()]
    real_dup = os.dup
    dups: list[int] = []

    def fake_dup(fd: int) -> int:  # fd 0 / 1 of this test process are pytest's: stand in for them
        new = real_dup({0: r, 1: w}.get(fd, fd))
        dups.append(new)
        return new

    seen: dict[str, object] = {}

    def fake_serve_transport(self, transport, peer, *, wait=False):
        still_open = []
        for fd in dups:
            try:
                os.fstat(fd)
                still_open.append(fd)
            except OSError:
                pass
        seen["open"], seen["kind"] = set(still_open), type(transport).__name__  # a closed fd may be reused
        transport.close()
        from nbdref.server._config import ConnectionRecord

        return ConnectionRecord(id=1, peer=peer)

    monkeypatch.setattr(os, "dup", fake_dup)
    monkeypatch.setattr(Server, "serve_transport", fake_serve_transport)
    try:
        assert cli._serve_stdin(Export.memory("exp", 1 << 20), {}) == 0
    finally:
        monkeypatch.undo()
        for fd in ends:
            os.close(fd)
    expected = 1 if stdin == "stream" else 2
    assert seen["kind"] == ("SocketTransport" if stdin == "stream" else "PipeTransport")
    assert len(seen["open"]) == expected, f"{len(seen['open']) - expected} leaked descriptor(s)"  # type: ignore[arg-type]
