"""A reference server configured for TLS-PSK authenticates clients by the PSK only.

The clients here are deliberately lax (they accept any server certificate and never check that the PSK
was used), like the reference client before it was fixed: whatever keeps them out is the server's doing.
"""

from __future__ import annotations

import socket
import ssl
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from nbdref.client import Client
from nbdref.server import Server, TLSConfig
from nbdref.server._transport import SocketTransport, TLSTransport
from nbdref.tls import NbdSSLContext, PskAuthError, client_context, server_context

TIMEOUT = 10.0


def lax(ctx: NbdSSLContext) -> NbdSSLContext:
    """Make a client context accept any certificate and skip the PSK check after the handshake."""
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.psk_required = False
    return ctx


def lax_client(monkeypatch: pytest.MonkeyPatch, ctx: NbdSSLContext) -> Client:
    c = Client(timeout=TIMEOUT)
    c.set_tls("require")
    c.set_export_name("exp")
    monkeypatch.setattr(c, "_tls_context", lambda: ctx)
    return c


def both(tls_dir: Any, psk_file: Path | None = None) -> TLSConfig:
    """FORCEDTLS with certificates *and* a PSK: the PSK is what clients must prove."""
    return TLSConfig(mode="require", certificates=tls_dir.x509_dir, psk_file=psk_file or tls_dir.psk_file)


def assert_refused(server: Server, c: Client) -> None:
    """Connecting fails and the server served nothing and says why (a TLS error)."""
    try:
        with pytest.raises((ssl.SSLError, OSError)):
            c.connect_unix(server.address)  # type: ignore[arg-type]
            c.pread(512, 0)  # must not get here; if the handshake "worked", reading must not
    finally:
        c.close()
    assert server.wait_closed(TIMEOUT)
    assert all(r.requests == 0 and r.export is None for r in server.records), [r.reason for r in server.records]
    assert all("TLS" in r.reason for r in server.records), [r.reason for r in server.records]


def test_certificate_only_client_refused(serve: Callable[..., Server], tls_dir: Any,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    # "If the TLS handshake fails (e.g. client certificate rejected) the server must terminate the
    # session" (TLS-016).  Before the fix this client completed a certificate handshake and read data.
    s = serve(tls=both(tls_dir))
    assert_refused(s, lax_client(monkeypatch, lax(client_context(tls_dir.x509_dir))))


@pytest.mark.parametrize("identity", ["alice", "mallory"], ids=["other-key", "unknown-identity"])
def test_client_with_other_psk_refused(serve: Callable[..., Server], tls_dir: Any, tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch, identity: str) -> None:
    # other-key: the server has another key for the identity (the binder does not verify);
    # unknown-identity: the server ignores the PSK, and used to fall back to its certificate.
    keys = tmp_path / "client.psk"
    keys.write_text(f"{identity}:" + "5a" * 32 + "\n")
    s = serve(tls=both(tls_dir))
    assert_refused(s, lax_client(monkeypatch, lax(client_context(psk_file=keys, psk_identity=identity))))


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3], ids=["1.2", "1.3"])
def test_client_with_the_psk_served(serve: Callable[..., Server], tls_dir: Any,
                                    monkeypatch: pytest.MonkeyPatch, version: ssl.TLSVersion) -> None:
    ctx = lax(client_context(psk_file=tls_dir.psk_file, psk_identity=tls_dir.psk_identity))
    ctx.maximum_version = version
    s = serve(tls=both(tls_dir))
    c = lax_client(monkeypatch, ctx)
    try:
        c.connect_unix(s.address)  # type: ignore[arg-type]
        assert c.pread(512, 0) == bytes(512)
    finally:
        c.close()
    assert s.wait_closed(TIMEOUT)
    assert [r.tls for r in s.records] == [True] and s.records[0].requests >= 1, s.records[0].reason


def _transport_handshake(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext) -> BaseException | None:
    """Run TLSTransport's handshake against `client_ctx` over a socketpair; what the server side raised."""
    a, b = socket.socketpair()
    a.settimeout(TIMEOUT)
    b.settimeout(TIMEOUT)
    result: list[BaseException | None] = []

    def server() -> None:
        try:
            TLSTransport(SocketTransport(b), server_ctx, timeout=TIMEOUT).close()
            result.append(None)
        except BaseException as exc:  # reported to the test
            result.append(exc)
            b.close()

    thread = threading.Thread(target=server)
    thread.start()
    try:
        with client_ctx.wrap_socket(a, server_hostname=None) as tls:
            tls.recv(1)  # the server's close_notify or EOF
    except (ssl.SSLError, OSError):
        pass
    finally:
        a.close()
        thread.join(TIMEOUT)
    assert not thread.is_alive() and len(result) == 1
    return result[0]


def test_transport_requires_the_psk_after_the_handshake(tls_dir: Any) -> None:
    # server_context(psk_file=...) loads no certificate, so OpenSSL cannot complete a certificate
    # handshake at all; give it one anyway to reach the transport's own check behind that.
    server_ctx = server_context(psk_file=tls_dir.psk_file)
    server_ctx.load_cert_chain(tls_dir.server_cert, tls_dir.server_key)
    error = _transport_handshake(server_ctx, lax(client_context(tls_dir.x509_dir)))
    assert isinstance(error, PskAuthError), error
    assert "not authenticated with the PSK" in str(error)
    psk_client = lax(client_context(psk_file=tls_dir.psk_file, psk_identity=tls_dir.psk_identity))
    assert _transport_handshake(server_ctx, psk_client) is None
