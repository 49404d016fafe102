"""TLS settings and the per-connection record the server keeps for tests and logs."""

from __future__ import annotations

import os
import ssl
import threading
import time
from dataclasses import dataclass, field
from typing import Literal

TLSMode = Literal["off", "on", "require"]


@dataclass(frozen=True, slots=True, kw_only=True)
class TLSConfig:
    """proto.md's three server modes: off = NOTLS, on = SELECTIVETLS, require = FORCEDTLS.

    X.509 material is a directory in qemu/nbdkit/libnbd layout (server-cert.pem, server-key.pem, and
    ca-cert.pem for ``verify_peer``); PSK is a psktool keys file.  Both may be given.
    """

    mode: TLSMode = "off"
    certificates: str | os.PathLike[str] | None = None
    psk_file: str | os.PathLike[str] | None = None
    verify_peer: bool = False
    handshake_timeout: float = 10.0

    def __post_init__(self) -> None:
        if self.mode not in ("off", "on", "require"):
            raise ValueError(f"TLS mode must be off, on or require, not {self.mode!r}")
        if self.mode != "off" and self.certificates is None and self.psk_file is None:
            raise ValueError("TLS needs certificates or a PSK file")

    def context(self) -> ssl.SSLContext | None:
        if self.mode == "off":
            return None
        from .. import tls

        return tls.server_context(self.certificates, psk_file=self.psk_file, verify_peer=self.verify_peer)


@dataclass(eq=False)
class ConnectionRecord:
    """Everything the server learned about one connection; complete once ``ended`` is set.

    ``violations`` and ``transcript`` are those of the core's ServerConnection (client breaches with
    requirement ids, and the C:/S: wire log).  ``reason`` says why the connection ended, in one line.
    """

    id: int
    peer: str
    started: float = field(default_factory=time.time)
    export: str | None = None
    tls: bool = False
    violations: list = field(default_factory=list)
    transcript: object = None
    reason: str = ""
    error: BaseException | None = None
    requests: int = 0
    ended: threading.Event = field(default_factory=threading.Event)

    def wait(self, timeout: float = 10.0) -> bool:
        return self.ended.wait(timeout)

    @property
    def violation_ids(self) -> list[str]:
        return [v.req_id for v in self.violations]
