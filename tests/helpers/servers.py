"""Host peers for the harness's own tests: a thin layer over fixtures.launch, which does the work.

    with start_host("qemu-nbd", ExportRequest(size=4 << 20), workdir=tmp_path, transport="tcp") as server:
        client.connect_uri(server.uri)

Keyword options are the spec options of matrix.yaml (``transport``, nbdkit ``plugin`` / ``filters`` /
``plugin_args``, nbd-server ``export_config``, every adapter's ``args``; see fixtures/peers/).  The
result is a fixtures.launchers.base.RunningServer: stopped on exit, recorded in the run dir so a sweep
finds it after a crash, readiness is the NBDMAGIC greeting.
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path
from typing import Any

from fixtures.exports import ExportRequest
from fixtures.launch import start_server
from fixtures.launchers.base import RunningServer
from fixtures.peerspec import PeerSpec

__all__ = ["custom_spec", "host_spec", "server_spec", "start_host", "start_nbdkit"]

UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def server_spec(impl: str, launcher: str = "local", suite: str | None = None, **kw: Any) -> PeerSpec:
    """A server PeerSpec outside any matrix (no expected version: whatever runs)."""
    return PeerSpec(id=f"{impl}@{suite or launcher}", implementation=impl, role="server", version="",
                    launcher=launcher, suite=suite, **kw)  # type: ignore[arg-type]


def custom_spec(*command: str, launcher: str = "local", suite: str | None = None) -> PeerSpec:
    """A command-template server (placeholders as in matrix.yaml ``command``)."""
    return PeerSpec(id="custom-test", implementation="custom", role="server", version="", launcher=launcher,  # type: ignore[arg-type]
                    suite=suite, command=tuple(command))


def host_spec(impl: str, **options: object) -> PeerSpec:
    """A host binary with spec options, kept as sorted string pairs like the matrix loader does."""
    pairs = tuple(sorted((k, str(v)) for k, v in options.items() if v is not None))
    return server_spec(impl, "local", options=pairs)


def start_host(impl: str, export: ExportRequest | None = None, *, workdir: str | os.PathLike[str],
               tls: Any = None, timeout: float | None = None, **options: object) -> RunningServer:
    """Start the host's ``impl`` serving ``export`` (default: 64 MiB of zeroes named "exp").

    ``tls`` is the TlsMaterial an export with ``tls=`` needs.  Raises PeerUnsupported / PeerStartError
    like start_server."""
    return start_server(host_spec(impl, **options), export or ExportRequest(), workdir=Path(workdir), tls=tls,
                        timeout=timeout)


def parse_size(text: str) -> int:
    """nbdkit's size words: "1M", "64K", "1073741824"."""
    unit = UNITS.get(text[-1:].upper())
    return int(text[:-1]) * unit if unit else int(text)


def start_nbdkit(plugin: str, *plugin_args: str, workdir: str | os.PathLike[str], export: str = "",
                 extra_args: tuple[str, ...] = (), timeout: float | None = None) -> RunningServer:
    """``nbdkit memory SIZE`` for scripts and benchmarks (any export name works; ``export`` only goes
    into the URI).  Other plugins: use start_host with ``plugin=`` or a custom_spec."""
    if plugin != "memory" or len(plugin_args) != 1:
        raise ValueError("start_nbdkit starts `memory SIZE` only; use start_host or custom_spec")
    request = ExportRequest(name=export, size=parse_size(plugin_args[0]))
    return start_host("nbdkit", request, workdir=workdir, timeout=timeout, plugin="memory",
                      args=shlex.join(extra_args) or None)
