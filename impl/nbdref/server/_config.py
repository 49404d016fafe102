"""TLS settings, the per-connection record the server keeps for tests and logs, and the budgets
(connection slots, threads, buffered bytes) its connections share."""

from __future__ import annotations

import os
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

TLSMode = Literal["off", "on", "require"]


@dataclass(frozen=True, slots=True, kw_only=True)
class TLSConfig:
    """proto.md's three server modes: off = NOTLS, on = SELECTIVETLS, require = FORCEDTLS.

    X.509 material is a directory in qemu/nbdkit/libnbd layout (server-cert.pem, server-key.pem, and
    ca-cert.pem for ``verify_peer``); PSK is a psktool keys file.  With a PSK file the server offers PSK
    only (its certificates are not loaded): a client without the key cannot fall back to a certificate
    handshake (TLS 1.3 would otherwise authenticate by certificate and skip the PSK).
    """

    mode: TLSMode = "off"
    certificates: str | os.PathLike[str] | None = None
    psk_file: str | os.PathLike[str] | None = None
    verify_peer: bool = False
    handshake_timeout: float = 10.0
    # (minimum, maximum) protocol versions offered, names of ssl.TLSVersion ("TLSv1_2"); None: OpenSSL's
    # defaults.  Below TLS 1.2 the security level drops to 0 so the old version is really offered (a
    # client must then refuse it: "SHOULD NOT [support older versions] by default", TLS-046).
    versions: tuple[str, str] | None = None

    def __post_init__(self) -> None:
        if self.mode not in ("off", "on", "require"):
            raise ValueError(f"TLS mode must be off, on or require, not {self.mode!r}")
        if self.mode != "off" and self.certificates is None and self.psk_file is None:
            raise ValueError("TLS needs certificates or a PSK file")

    def context(self) -> ssl.SSLContext | None:
        if self.mode == "off":
            return None
        from .. import tls

        ctx = tls.server_context(self.certificates, psk_file=self.psk_file, verify_peer=self.verify_peer)
        if self.versions is not None:
            import warnings

            with warnings.catch_warnings():  # TLSVersion.TLSv1/TLSv1_1 are deprecated names, on purpose here
                warnings.simplefilter("ignore", DeprecationWarning)
                low, high = (ssl.TLSVersion[v] for v in self.versions)
                if low < ssl.TLSVersion.TLSv1_2:
                    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
                ctx.minimum_version, ctx.maximum_version = low, high
        return ctx


@dataclass(eq=False)
class ConnectionRecord:
    """Everything the server learned about one connection; complete once ``ended`` is set.

    ``violations``, ``checked`` and ``transcript`` are those of the core's ServerConnection (client
    breaches with requirement ids, the ids of every rule checked on the client's messages, and the C:/S:
    wire log).  ``reason`` says why the connection ended, in one line.
    """

    id: int
    peer: str
    started: float = field(default_factory=time.time)
    export: str | None = None
    tls: bool = False
    tls_version: str | None = None  # the negotiated protocol ("TLSv1.3"), once TLS is up
    # How the client left after NBD_OPT_ABORT's ACK: "close_notify" (TLS shut down, then EOF), "eof",
    # "data" (it sent more), "open" (still connected after a second); "" when it never aborted.
    after_abort: str = ""
    # (monotonic ns, "C" request arrived | "S" its reply sent, command, cookie): one clock for every
    # connection of the server, so tests can order requests across connections (MC-001, MC-003).
    timeline: list = field(default_factory=list)
    violations: list = field(default_factory=list)
    checked: set = field(default_factory=set)  # ids of the rules checked on the client's messages
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


class Budget:
    """A count of interchangeable units the connections of one server share: connection slots,
    threads or buffered bytes.  ``take`` never goes over ``limit``; ``give`` wakes those waiting."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"a budget needs a positive limit, not {limit}")
        self.limit = limit
        self.used = 0
        self.cond = threading.Condition(threading.RLock())  # also guards the Accounts drawing on it

    def free(self) -> int:
        return self.limit - self.used

    def take(self, want: int, *, minimum: int | None = None, timeout: float = 0.0,
             cap: Callable[[], int] | None = None, stop: threading.Event | None = None) -> int:
        """Take up to ``want`` units, at least ``minimum`` (default: all of them), waiting up to
        ``timeout`` seconds for them (0: not at all); ``cap()`` (called under the lock) bounds the amount
        further.  Returns what was taken, 0 when not enough became free in time or ``stop`` was set."""
        need = want if minimum is None else minimum

        def room() -> int:
            f = self.limit - self.used
            return min(f, cap()) if cap is not None else f

        deadline = time.monotonic() + timeout
        with self.cond:
            while room() < need:
                left = deadline - time.monotonic()
                if left <= 0 or (stop is not None and stop.is_set()):
                    return 0
                self.cond.wait(min(left, 0.25))  # short slices: stop() need not know who waits
            n = max(0, min(want, room()))
            self.used += n
            return n

    def give(self, n: int) -> None:
        if n:
            with self.cond:
                self.used -= n
                self.cond.notify_all()


class Account:
    """One connection's share of the server's byte budget: the bytes it read and still holds.

    ``held`` = bytes in the core (``ServerConnection.buffered_bytes``) + payloads handed to workers
    (``queued``) + the read in progress (reserved before ``recv_into``, settled after).  Bytes are
    charged before they are read, so the total never exceeds the budget; a connection reads nothing
    while its own share (``limit``) or the total is used up, and waits for the budget instead.
    """

    def __init__(self, budget: Budget, limit: int) -> None:
        self.budget = budget
        self.limit = limit
        self.held = 0
        self.queued = 0
        self.pledged = 0  # the whole declared payload being received, charged before its bytes

    def pledge(self, n: int, in_core: int, timeout: float, stop: threading.Event | None = None) -> bool:
        """Charge the whole ``n``-byte payload that has started arriving, before reading more of it
        (what the core holds of it already counts): a connection that got its pledge can always finish
        its payload, so connections partway through big WRITEs cannot starve each other.  False when
        the room did not become free within ``timeout``."""
        with self.budget.cond:
            self.settle(in_core)
            extra = max(0, n - in_core)
            got = self.budget.take(extra, timeout=timeout, cap=lambda: self.limit - self.held, stop=stop)
            if extra and not got:
                return False
            self.held += got
            self.pledged = n
        return True

    @property
    def max_payload(self) -> int:
        """The largest payload this connection could ever buffer: a longer declared WRITE is refused."""
        return min(self.limit, self.budget.limit)

    def reserve(self, want: int, minimum: int, timeout: float, stop: threading.Event | None = None) -> int:
        """Charge up to ``want`` bytes (at least ``minimum``) for the next read; 0 when they did not
        become free within ``timeout``."""
        with self.budget.cond:  # an RLock: wait() inside take() releases it
            n = self.budget.take(want, minimum=minimum, timeout=timeout, cap=lambda: self.limit - self.held,
                                 stop=stop)
            self.held += n
        return n

    def settle(self, in_core: int) -> None:
        """The core now holds ``in_core`` bytes of ours: give back what the last reservation did not use
        (and what the core consumed)."""
        with self.budget.cond:
            new = max(in_core, self.pledged) + self.queued  # a pledge covers the payload's bytes in the core
            delta = new - self.held
            self.held = new
            self.budget.used += delta
            if delta < 0:
                self.budget.cond.notify_all()

    def queue(self, n: int) -> None:
        """A payload of ``n`` bytes left the core for a worker: still held, until ``done``.  The request
        was complete, so its pledge (if any) ends; the next ``settle`` gives back what it does not cover."""
        with self.budget.cond:
            self.queued += n
            self.pledged = 0

    def done(self, n: int) -> None:
        """The request whose payload was ``n`` bytes is answered: its bytes are free."""
        with self.budget.cond:
            self.queued -= n
            self.held -= n
            self.budget.used -= n
            self.budget.cond.notify_all()

    def close(self) -> None:
        with self.budget.cond:
            self.budget.used -= self.held
            self.held = self.queued = self.pledged = 0
            self.budget.cond.notify_all()
