"""The proxy terminates TLS on both sides with the run's material and checks the decrypted streams."""

from __future__ import annotations

import os

import pytest
from nbdref.client import Client
from nbdref.proxy import ProxyTLS
from nbdref.server import Export, TLSConfig

from .test_proxy import _ended

MiB = 1 << 20


@pytest.mark.parametrize("kind", ["x509", "psk"])
def test_tls_pair_is_checked(serve, proxy, tls_material, kind):
    m = tls_material
    if kind == "x509":
        server_tls = TLSConfig(mode="require", certificates=m.x509_dir)
        proxy_tls = ProxyTLS(certificates_dir=str(m.x509_dir))
    else:
        server_tls = TLSConfig(mode="require", psk_file=m.psk_file)
        proxy_tls = ProxyTLS(psk_file=str(m.psk_file), psk_identity=m.psk_identity)
    s = serve([Export.memory("exp", 4 * MiB)], tls=server_tls)
    p = proxy(s.uri, tls=proxy_tls)
    c = Client(timeout=10)
    c.set_tls("require")
    if kind == "x509":
        c.set_tls_certificates(m.x509_dir)
    else:
        c.set_tls_psk_file(m.psk_file)
        c.set_tls_username(m.psk_identity)
    c.set_export_name("exp")
    c.connect_unix(p.uri_for("exp").split("socket=")[1])
    data = os.urandom(MiB)
    c.pwrite(data, 0)
    assert c.pread(MiB, 0) == data and c.get_tls_negotiated()
    c.shutdown()
    (r,) = _ended(p)
    assert r.tls and r.checking, (r.unchecked, str(r.transcript))
    assert r.violations == [] and r.errors == []
    lines = r.transcript.lines()
    # Negotiation went on, checked, after the handshake: the GO and the requests are in the transcript.
    tls_at = next(i for i, x in enumerate(lines) if "TLS with both sides" in x)
    assert any(x.startswith("C: NBD_OPT_GO") for x in lines[tls_at:])
    assert any(x.startswith("C: NBD_CMD_WRITE") for x in lines[tls_at:])
    assert r.negotiated["tls"] is True
    assert s.wait_closed(5) and all(rec.tls for rec in s.records)


def test_tls_without_material_is_forwarded_unchecked(serve, proxy, tls_material):
    s = serve([Export.memory("exp", MiB)], tls=TLSConfig(mode="require", certificates=tls_material.x509_dir))
    p = proxy(s.uri)  # no ProxyTLS: the proxy cannot read the TLS stream
    c = Client(timeout=10)
    c.set_tls("require")
    c.set_tls_certificates(tls_material.x509_dir)
    c.set_export_name("exp")
    c.connect_unix(p.uri_for("exp").split("socket=")[1])
    assert c.pread(4096, 0) == bytes(4096)
    c.shutdown()
    (r,) = _ended(p)
    assert not r.checking and "no TLS material" in r.unchecked
    assert r.violations == []
