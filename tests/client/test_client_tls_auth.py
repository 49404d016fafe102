"""The reference client authenticates the server: with a PSK only by that PSK (TLS 1.2 and 1.3), with
X.509 by the chain (and the name when one is known) over Unix sockets and TCP alike.

The servers are in-process reference servers (nbdref.server) in FORCEDTLS mode.
"""

from __future__ import annotations

import shutil
import ssl
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from nbdref import client as client_mod
from nbdref.client import Client
from nbdref.server import Export, Server, TLSConfig
from nbdref.tls import PskAuthError, client_context

from fixtures.tls_material import TlsMaterial

MiB = 1 << 20
TIMEOUT = 10.0
StartServer = Callable[..., Server]


@pytest.fixture
def serve(workdir: Path) -> Iterator[StartServer]:
    """``serve(tls, transport="unix"|"tcp")`` -> a started reference server; all stopped at teardown."""
    servers: list[Server] = []

    def start(tls: TLSConfig, transport: str = "unix") -> Server:
        kw: dict[str, Any] = {"unix": str(workdir / f"s{len(servers)}.sock")} if transport == "unix" else {}
        server = Server([Export.memory("exp", MiB)], tls=tls, io_timeout=TIMEOUT, **kw).start()
        servers.append(server)
        return server

    yield start
    for s in servers:
        s.stop()


def other_psk(tmp_path: Path, identity: str = "alice") -> Path:
    """A keys file with a key for `identity` that is not the fixture's."""
    path = tmp_path / f"other-{identity}.psk"
    path.write_text(f"{identity}:" + "5a" * 32 + "\n")
    return path


def connect(server: Server, *, psk_file: Path | None = None, certificates: Path | None = None,
            hostname: str | None = None, identity: str = "alice") -> Client:
    """A TLS-requiring Client connected to `server` (Unix or TCP, from its address); the caller closes."""
    c = Client(timeout=TIMEOUT)
    c.set_tls("require")
    c.set_export_name("exp")
    if psk_file is not None:
        c.set_tls_psk_file(psk_file)
        c.set_tls_username(identity)
    if certificates is not None:
        c.set_tls_certificates(certificates)
    if hostname is not None:
        c.set_tls_hostname(hostname)
    try:
        address = server.address
        if isinstance(address, str):
            c.connect_unix(address)
        else:
            c.connect_tcp(*address[:2])
    except BaseException:
        c.close()
        raise
    return c


def tls_version(c: Client) -> str:
    sock = c._sock  # the SSLSocket after STARTTLS
    assert isinstance(sock, ssl.SSLSocket)
    return str(sock.version())


def refused(server: Server) -> None:
    """The server ended every connection without serving a request."""
    assert server.wait_closed(TIMEOUT)
    assert server.records and all(r.requests == 0 for r in server.records), [r.reason for r in server.records]


# ------------------------------------------------------------------------------------------------ PSK


def test_psk_client_refuses_certificate_only_server(serve: StartServer, tls_material: TlsMaterial) -> None:
    # The server has no PSK at all: TLS 1.3 would fall back to its certificate, which proves nothing
    # about the PSK (this connected and read data before the fix).
    s = serve(TLSConfig(mode="require", certificates=tls_material.x509_dir))
    with pytest.raises(PskAuthError, match="certificate"):
        connect(s, psk_file=tls_material.psk_file)
    refused(s)


@pytest.mark.parametrize("with_certificates", [True, False], ids=["psk+x509-server", "psk-server"])
def test_psk_client_refuses_server_with_other_key(serve: StartServer, tls_material: TlsMaterial, tmp_path: Path,
                                                  with_certificates: bool) -> None:
    # The server's key for "alice" is another one.  With a certificate too the old client connected.
    certificates = tls_material.x509_dir if with_certificates else None
    s = serve(TLSConfig(mode="require", certificates=certificates, psk_file=other_psk(tmp_path)))
    with pytest.raises(PskAuthError, match="alice"):
        connect(s, psk_file=tls_material.psk_file)
    refused(s)


@pytest.mark.parametrize("with_certificates", [False, True], ids=["psk-server", "psk+x509-server"])
@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3], ids=["1.2", "1.3"])
@pytest.mark.parametrize("transport", ["unix", "tcp"])
def test_psk_right_key_works(serve: StartServer, tls_material: TlsMaterial, monkeypatch: pytest.MonkeyPatch,
                             with_certificates: bool, version: ssl.TLSVersion, transport: str) -> None:
    # The Client has no TLS version setting: cap the context it builds (TLS 1.2 must still offer PSK suites).
    def capped(*args: Any, **kw: Any) -> ssl.SSLContext:
        ctx = client_context(*args, **kw)
        ctx.maximum_version = version
        return ctx

    monkeypatch.setattr(client_mod, "client_context", capped)
    certificates = tls_material.x509_dir if with_certificates else None
    s = serve(TLSConfig(mode="require", certificates=certificates, psk_file=tls_material.psk_file), transport)
    c = connect(s, psk_file=tls_material.psk_file)
    try:
        assert c.get_tls_negotiated()
        assert tls_version(c) == ("TLSv1.2" if version == ssl.TLSVersion.TLSv1_2 else "TLSv1.3")
        c.pwrite(b"\xa5" * 4096, 0)
        assert c.pread(4096, 0) == b"\xa5" * 4096
    finally:
        c.close()
    assert s.wait_closed(TIMEOUT)
    assert all(r.tls for r in s.records)


# ---------------------------------------------------------------------------------------------- X.509


@pytest.fixture
def untrusted_dir(tls_material: TlsMaterial, tmp_path: Path) -> Path:
    """A certificates directory whose ca-cert.pem is another CA (the server's chain does not lead there)."""
    d = tmp_path / "untrusted"
    d.mkdir()
    shutil.copy(tls_material.other_ca_cert, d / "ca-cert.pem")
    return d


@pytest.mark.parametrize("transport", ["unix", "tcp"])
def test_x509_other_ca_refused(serve: StartServer, tls_material: TlsMaterial, untrusted_dir: Path,
                               transport: str) -> None:
    # uri.md: "By default clients SHOULD verify the server's identity if TLS is negotiated" (URI-019),
    # over a Unix socket (no hostname: the chain is still verified) as over TCP.
    s = serve(TLSConfig(mode="require", certificates=tls_material.x509_dir), transport)
    with pytest.raises(ssl.SSLCertVerificationError, match="certificate verify failed"):
        connect(s, certificates=untrusted_dir)
    refused(s)
    c = connect(s, certificates=tls_material.x509_dir)  # the right CA: same server, same transport
    try:
        assert c.pread(512, 0) == bytes(512)
    finally:
        c.close()


@pytest.mark.parametrize("transport", ["unix", "tcp"])
def test_x509_hostname_checked_when_given(serve: StartServer, tls_material: TlsMaterial, transport: str) -> None:
    # The server certificate names localhost and 127.0.0.1; over TCP the host connected to is the name.
    s = serve(TLSConfig(mode="require", certificates=tls_material.x509_dir), transport)
    with pytest.raises(ssl.SSLCertVerificationError, match="not-localhost"):
        connect(s, certificates=tls_material.x509_dir, hostname="not-localhost")
    c = connect(s, certificates=tls_material.x509_dir, hostname="localhost")
    c.close()

