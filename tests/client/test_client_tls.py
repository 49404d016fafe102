"""nbdref.tls: Python client <-> Python server over a socketpair, X.509 and PSK, TLS 1.2 and 1.3."""

from __future__ import annotations

import getpass
import shutil
import socket
import ssl
import threading
from pathlib import Path

import pytest
from nbdref.tls import client_context, read_psk_file, server_context

from fixtures.tls_material import TlsMaterial

VERSIONS = [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3]


def handshake(client: ssl.SSLContext, server: ssl.SSLContext, version: ssl.TLSVersion) -> tuple[str, str]:
    """Run both ends, exchange a few bytes, return (client version, server version); raise ssl errors."""
    client.maximum_version = version
    server.maximum_version = version
    a, b = socket.socketpair()
    a.settimeout(5)
    b.settimeout(5)
    result: dict[str, object] = {}

    def serve() -> None:
        try:
            with server.wrap_socket(b, server_side=True) as s:
                assert s.recv(4) == b"ping"
                s.sendall(b"pong")
                result["version"] = s.version()
        except Exception as exc:  # reported to the main thread
            result["error"] = exc

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        with client.wrap_socket(a, server_hostname=getattr(client, "server_hostname", None)) as c:
            c.sendall(b"ping")
            assert c.recv(4) == b"pong"
            version = c.version()
    finally:
        a.close()
        thread.join(10)
        b.close()
    if "error" in result:
        raise result["error"]  # type: ignore[misc]
    return str(version), str(result["version"])


@pytest.mark.parametrize("version", VERSIONS, ids=["1.2", "1.3"])
def test_x509_mutual(tls_material: TlsMaterial, version: ssl.TLSVersion) -> None:
    expected = "TLSv1.2" if version == ssl.TLSVersion.TLSv1_2 else "TLSv1.3"
    client = client_context(tls_material.x509_dir, hostname="localhost")
    server = server_context(tls_material.x509_dir, verify_peer=True)
    assert handshake(client, server, version) == (expected, expected)


@pytest.mark.parametrize("version", VERSIONS, ids=["1.2", "1.3"])
def test_psk(tls_material: TlsMaterial, version: ssl.TLSVersion) -> None:
    expected = "TLSv1.2" if version == ssl.TLSVersion.TLSv1_2 else "TLSv1.3"
    client = client_context(psk_file=tls_material.psk_file, psk_identity="alice")
    assert client.psk_identity == "alice"
    assert handshake(client, server_context(psk_file=tls_material.psk_file), version) == (expected, expected)


@pytest.mark.parametrize("version", VERSIONS, ids=["1.2", "1.3"])
def test_psk_wrong_key_fails(tls_material: TlsMaterial, tmp_path: Path, version: ssl.TLSVersion) -> None:
    other = tmp_path / "keys.psk"
    other.write_text("alice:" + "00" * 32 + "\n")
    with pytest.raises((ssl.SSLError, OSError)):
        handshake(client_context(psk_file=other, psk_identity="alice"), server_context(psk_file=tls_material.psk_file), version)


@pytest.mark.parametrize("version", VERSIONS, ids=["1.2", "1.3"])
def test_psk_client_refuses_certificate_only_server(tls_material: TlsMaterial, version: ssl.TLSVersion) -> None:
    # A server without the PSK: TLS 1.2 has no common suite; TLS 1.3 falls back to the certificate,
    # which a PSK client must not accept (it trusts no CA: the PSK is its only credential).
    client = client_context(psk_file=tls_material.psk_file, psk_identity="alice")
    with pytest.raises((ssl.SSLError, OSError)):
        handshake(client, server_context(tls_material.x509_dir), version)


def test_psk_server_ignores_certificates(tls_material: TlsMaterial) -> None:
    # A server configured for PSK authenticates by PSK only, certificates or not.
    server = server_context(tls_material.x509_dir, psk_file=tls_material.psk_file)
    with pytest.raises((ssl.SSLError, OSError)):
        handshake(client_context(tls_material.x509_dir, hostname="localhost"), server, VERSIONS[1])
    client = client_context(psk_file=tls_material.psk_file, psk_identity="alice")
    assert handshake(client, server, VERSIONS[1]) == ("TLSv1.3", "TLSv1.3")


def test_psk_unknown_identity_fails(tls_material: TlsMaterial, tmp_path: Path) -> None:
    other = tmp_path / "keys.psk"
    other.write_text(f"mallory:{tls_material.psk_key.hex()}\n")
    with pytest.raises((ssl.SSLError, OSError)):
        client = client_context(psk_file=other, psk_identity="mallory")
        handshake(client, server_context(psk_file=tls_material.psk_file), VERSIONS[1])


def test_untrusted_ca_fails_unless_verify_off(tls_material: TlsMaterial, tmp_path: Path) -> None:
    # URI-019: "By default clients SHOULD verify the server's identity"
    untrusted = tmp_path / "untrusted"
    untrusted.mkdir()
    shutil.copy(tls_material.other_ca_cert, untrusted / "ca-cert.pem")
    server = server_context(tls_material.x509_dir)
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(client_context(untrusted), server, VERSIONS[1])
    assert handshake(client_context(untrusted, verify_peer=False), server, VERSIONS[1])[0] == "TLSv1.3"


def test_hostname_is_checked(tls_material: TlsMaterial) -> None:
    server = server_context(tls_material.x509_dir)
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(client_context(tls_material.x509_dir, hostname="not-localhost"), server, VERSIONS[1])
    # The server certificate lists ip_address = 127.0.0.1 too.
    assert handshake(client_context(tls_material.x509_dir, hostname="127.0.0.1"), server, VERSIONS[1])


def test_server_verify_peer_needs_client_cert(tls_material: TlsMaterial, tmp_path: Path) -> None:
    ca_only = tmp_path / "ca-only"
    ca_only.mkdir()
    shutil.copy(tls_material.ca_cert, ca_only / "ca-cert.pem")
    with pytest.raises((ssl.SSLError, OSError)):
        handshake(client_context(ca_only), server_context(tls_material.x509_dir, verify_peer=True), VERSIONS[1])


def test_read_psk_file(tmp_path: Path) -> None:
    path = tmp_path / "keys.psk"
    path.write_text("# comment\nalice:00ff\nbob:0102\n")
    assert read_psk_file(path) == {"alice": b"\x00\xff", "bob": b"\x01\x02"}
    path.write_text("alice:xyz\n")
    with pytest.raises(ValueError, match="not hex"):
        read_psk_file(path)
    path.write_text("\n")
    with pytest.raises(ValueError, match="no keys"):
        read_psk_file(path)
    path.write_text("alice:00\n")
    with pytest.raises(ValueError, match="no key for PSK identity 'carol'"):
        client_context(psk_file=path, psk_identity="carol")
    # URI-014: without a user, the identity is the local login name (like libnbd)
    with pytest.raises(ValueError, match=f"no key for PSK identity '{getpass.getuser()}'"):
        client_context(psk_file=path)


def test_server_context_needs_material() -> None:
    with pytest.raises(ValueError):
        server_context()
