"""TLS forms each local peer wants (X.509 and PSK), checked by real clients on the host."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from fixtures.exports import ExportRequest
from fixtures.launch import client_runner, make_uri, start_server
from fixtures.launchers.base import PeerUnsupported
from fixtures.peerspec import PeerSpec

from .helpers import server_spec

HOST = PeerSpec(id="host-tools", implementation="nbdinfo", role="client", version="", launcher="local")


@pytest.fixture(scope="module")
def material(tmp_path_factory: pytest.TempPathFactory):
    from fixtures.tls_material import make_tls_material

    if not shutil.which("certtool"):
        pytest.skip("certtool (gnutls-bin) is not installed")
    return make_tls_material(tmp_path_factory.mktemp("tls"))


CASES = [("qemu-nbd", "x509", True), ("qemu-nbd", "psk", False), ("qemu-storage-daemon", "x509", False),
         ("nbdkit", "x509", True), ("nbdkit", "psk", False), ("nbd-server", "x509", False),
         ("nbd-server", "x509", True)]


@pytest.mark.parametrize(("impl", "kind", "verify"), CASES, ids=[f"{i}-{k}{'-verify' if v else ''}" for i, k, v in CASES])
def test_tls_server_with_host_clients(impl: str, kind: str, verify: bool, material, tmp_path: Path) -> None:
    if not shutil.which(impl):
        pytest.skip(f"{impl} not installed")
    req = ExportRequest(size=1 << 20, tls=kind, tls_verify_peer=verify)  # type: ignore[arg-type]
    with start_server(server_spec(impl), req, workdir=tmp_path, tls=material) as s:
        assert s.uri.startswith("nbds+unix://")
        runner = client_runner(HOST, workdir=tmp_path)
        # --size connects with NBD_OPT_GO; --json would use NBD_OPT_INFO, which nbd-server answers with
        # size 0 (every nbd-server from 3.21 to 3.27; NBD_OPT_GO gives the real size)
        info = runner.run(runner.tool_argv("nbdinfo", s, "--size"), timeout=20)
        assert info.ok, info.stderr
        assert int(info.stdout) == req.size
        qio = runner.run(runner.tool_argv("qemu-io", s, "-c", "read -P 0 0 4096"), timeout=20)
        assert qio.ok and "read 4096/4096" in qio.stdout, qio.stderr
        plain = make_uri(export="exp", transport="unix", socket_path=s.socket)
        refused = runner.run(["nbdinfo", "--size", plain], timeout=20)
        assert refused.rc != 0, "a plaintext client must not get the export of a TLS-only server"


def test_psk_uri_puts_user_in_authority(material) -> None:
    uri = make_uri(export="exp", transport="unix", socket_path=Path("/s/q.sock"), tls="psk", material=material)
    assert uri.startswith(f"nbds+unix://{material.psk_identity}@/exp?socket=/s/q.sock&tls-psk-file=")


def test_nbd_server_psk_is_unsupported(material, tmp_path: Path) -> None:
    with pytest.raises(PeerUnsupported, match="PSK"):
        start_server(server_spec("nbd-server"), ExportRequest(size=4096, tls="psk"), workdir=tmp_path, tls=material)
