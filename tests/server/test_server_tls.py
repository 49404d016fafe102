"""TLS modes of the reference server with real clients: X.509 (optionally verifying the client) and PSK."""

from __future__ import annotations

import json
import shutil

import pytest
from nbdref.server import Export, TLSConfig

from .conftest import clean, run

pytestmark = pytest.mark.skipif(not shutil.which("nbdinfo"), reason="libnbd-bin not installed")
MiB = 1 << 20


def _x509(tls_dir, **kw) -> TLSConfig:
    return TLSConfig(mode=kw.pop("mode", "require"), certificates=tls_dir.x509_dir, **kw)


def _psk(tls_dir, **kw) -> TLSConfig:
    return TLSConfig(mode=kw.pop("mode", "require"), psk_file=tls_dir.psk_file, **kw)


@pytest.mark.parametrize("verify_peer", [False, True])
def test_nbdinfo_x509(serve, tls_dir, verify_peer):
    s = serve(tls=_x509(tls_dir, verify_peer=verify_peer))
    uri = f"{s.uri}&tls-certificates={tls_dir.x509_dir}"
    info = json.loads(run(["nbdinfo", "--json", uri]).stdout)
    assert info["TLS"] is True and info["exports"][0]["export-size"] == 16 * MiB
    clean(s)
    assert all(r.tls for r in s.records)


def test_verify_peer_refuses_client_without_certificate(serve, tls_dir, tmp_path):
    ca_only = tmp_path / "ca-only"
    ca_only.mkdir()
    shutil.copy(tls_dir.x509_dir / "ca-cert.pem", ca_only / "ca-cert.pem")
    s = serve(tls=_x509(tls_dir, verify_peer=True))
    r = run(["nbdinfo", "--size", f"{s.uri}&tls-certificates={ca_only}"], check=False)
    assert r.returncode != 0
    assert s.wait_closed(10)
    assert any("TLS" in r.reason for r in s.records), [r.reason for r in s.records]


def test_nbdinfo_psk(serve, tls_dir):
    s = serve(tls=_psk(tls_dir))
    uri = s.uri.replace("nbds+unix://", f"nbds+unix://{tls_dir.psk_identity}@") + f"&tls-psk-file={tls_dir.psk_file}"
    info = json.loads(run(["nbdinfo", "--json", uri]).stdout)
    assert info["TLS"] is True
    clean(s)


def test_plaintext_client_refused_by_forced_tls(serve, tls_dir):
    s = serve(tls=_x509(tls_dir))
    plain = s.uri.replace("nbds+unix", "nbd+unix")
    r = run(["nbdinfo", "--size", plain], check=False)
    assert r.returncode != 0
    assert s.wait_closed(10)
    assert "NBD_REP_ERR_TLS_REQD" in str(s.records[0].transcript)


def test_selective_tls_only_guards_tls_only_exports(serve, tls_dir):
    s = serve([Export.memory("open", MiB), Export.memory("secret", 2 * MiB, tls_only=True)],
              tls=_x509(tls_dir, mode="on"))
    base = s.uri_for("open").replace("nbds+unix", "nbd+unix")
    assert run(["nbdinfo", "--size", base]).stdout.strip() == str(MiB)
    secret = s.uri_for("secret").replace("nbds+unix", "nbd+unix")
    assert run(["nbdinfo", "--size", secret], check=False).returncode != 0
    with_tls = f"{s.uri_for('secret')}&tls-certificates={tls_dir.x509_dir}"
    assert run(["nbdinfo", "--size", with_tls]).stdout.strip() == str(2 * MiB)
    assert s.wait_closed(10)
    assert "NBD_REP_ERR_TLS_REQD" in str(s.records[1].transcript)
    assert not s.violations


@pytest.mark.skipif(not shutil.which("qemu-io"), reason="qemu-utils not installed")
@pytest.mark.parametrize("kind", ["x509", "psk"])
def test_qemu_io_tls(serve, tls_dir, kind):
    if kind == "x509":
        s = serve(tls=_x509(tls_dir))
        obj = f"tls-creds-x509,id=tls0,endpoint=client,dir={tls_dir.x509_dir}"
        extra = ",tls-hostname=localhost"
    else:
        s = serve(tls=_psk(tls_dir))
        obj = f"tls-creds-psk,id=tls0,endpoint=client,dir={tls_dir.psk_dir},username={tls_dir.psk_identity}"
        extra = ""
    path = s.address
    r = run(["qemu-io", "--object", obj, "--image-opts",
             f"driver=nbd,path={path},export=exp,tls-creds=tls0{extra}",
             "-c", "write -P 0x5a 0 64k", "-c", "read -P 0x5a 0 64k"])
    assert "Pattern verification failed" not in r.stdout
    clean(s)
