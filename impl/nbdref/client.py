"""The blocking reference client: one socket over the sans-I/O `ClientConnection`, libnbd's vocabulary.

    with Client() as c:
        c.add_meta_context("base:allocation")
        c.connect_uri("nbd+unix:///exp?socket=/tmp/s")
        data = c.pread(4096, 0)
        c.block_status(1 << 20, 0, lambda ctx, off, entries, err: ...)

Names and defaults follow libnbd (>= 1.18): structured replies and extended headers are requested
by default, base:allocation only when added, NBD_OPT_GO falls back to NBD_OPT_EXPORT_NAME on
NBD_REP_ERR_UNSUP, `set_opt_mode(True)` stops in the option phase so `opt_*` can be called one by one.
Commands can be issued asynchronously (`aio_pread`, `aio_pwrite`, `aio_command`) and are matched by
cookie in whatever order the server answers; `pread` & co. are `aio_*` + `wait`.

Every socket operation has a timeout (`set_timeout`).  What the core found wrong with the server is in
`violations`; the wire log is `transcript`.  A MUST-level breach raises `RemoteProtocolError` from the
core.  Which of our own requests the client refuses before sending is libnbd's strict mode
(`set_strict_mode(Strict...)`, `get_strict_mode()`): each `Strict` flag switches the core's checks of
the requirement ids in `STRICT_IDS`.
"""

from __future__ import annotations

import contextlib
import errno as _errno
import os
import socket
import ssl
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import IntFlag
from typing import Any

from . import events as ev
from . import requirements
from ._constants import (
    DEFAULT_MAX_PAYLOAD,
    ClientFlag,
    Cmd,
    CmdFlag,
    Err,
    HandshakeFlag,
    Info,
    Rep,
    TxFlag,
    cmd_name,
)
from ._errors import LocalProtocolError, ProtocolError, RemoteProtocolError, Violation
from ._sockio import sendmsg_all
from ._strict import PAYLOAD_CAP, Strictness
from ._transcript import Transcript
from ._transmission import CMDFLAG_FLAG_REQ, COMMAND_FLAG_REQ, ZERO_LENGTH_REQ
from ._wire import nbytes
from .connection import NEED_DATA, ClientConnection
from .tls import NbdSSLContext, PskAuthError, client_context, require_psk
from .uri import Uri, parse_uri

__all__ = [
    "BLOCK_SIZE_MAXIMUM",
    "BLOCK_SIZE_MINIMUM",
    "BLOCK_SIZE_PAYLOAD",
    "BLOCK_SIZE_PREFERRED",
    "STRICT_IDS",
    "TLS_ALLOW",
    "TLS_DISABLE",
    "TLS_REQUIRE",
    "Client",
    "ClientError",
    "CmdFlag",
    "RemoteProtocolError",
    "Strict",
    "strict_flags",
    "strictness_for",
]

# libnbd's nbd_set_tls values
TLS_DISABLE, TLS_ALLOW, TLS_REQUIRE = 0, 1, 2
_TLS_NAMES = {"off": TLS_DISABLE, "disable": TLS_DISABLE, "allow": TLS_ALLOW, "require": TLS_REQUIRE}
# libnbd's nbd_get_block_size values
BLOCK_SIZE_MINIMUM, BLOCK_SIZE_PREFERRED, BLOCK_SIZE_MAXIMUM, BLOCK_SIZE_PAYLOAD = 0, 1, 2, 3
_BLOCK_SIZE_NAMES = {"minimum": 0, "preferred": 1, "maximum": 2, "payload": 3}


class Strict(IntFlag):
    """libnbd's ``LIBNBD_STRICT_*`` flags (nbd_set_strict_mode), same names, values and meanings: with a
    flag set the client refuses, before sending, a request of that kind; cleared, it sends the request
    and leaves the judgement to the server.  Each flag is the set of requirement ids in ``STRICT_IDS``:
    set, the core refuses a breach of any of them (``Strictness.refuse``, whatever its level); cleared,
    those ids are in ``Strictness.disabled``.  ``AUTO_FLAG`` (0x40, libnbd >= 1.20, part of its default) is
    accepted and changes nothing: this client always sets NBD_CMD_FLAG_PAYLOAD_LEN exactly when extended
    headers require it (EXT-002), which is what the flag asks libnbd to do.
    """

    COMMANDS = 0x01  # commands and command flags the server did not advertise (NBD_FLAG_SEND_*)
    FLAGS = 0x02  # command flags not defined, or not documented for that command
    BOUNDS = 0x04  # requests past the end of the export
    ZERO_SIZE = 0x08  # zero-length requests
    ALIGN = 0x10  # offset / length not multiples of the advertised minimum block size
    PAYLOAD = 0x20  # payloads over the client's payload maximum (get_block_size(BLOCK_SIZE_PAYLOAD))
    AUTO_FLAG = 0x40  # let the client set PAYLOAD_LEN itself: always so here (accepted, no effect)
    ALL = 0x3F  # every checking flag above: the default


# Which requirement ids each Strict flag switches (the ids are the core's, from its own tables).
STRICT_IDS: dict[Strict, frozenset[str]] = {
    # "The client MUST NOT send NBD_CMD_FLUSH unless NBD_FLAG_SEND_FLUSH was set" and the like (CMD-008 and
    # the per-command ids), BLOCK_STATUS without a selected context (BS-003), the payload form of
    # BLOCK_STATUS without NBD_FLAG_BLOCK_STATUS_PAYLOAD (EXT-013).  As in libnbd, a flag gated by a
    # transmission flag (FUA, DF, FAST_ZERO) belongs here, not to FLAGS.
    Strict.COMMANDS: frozenset({"CMD-008", *COMMAND_FLAG_REQ.values(), *CMDFLAG_FLAG_REQ.values(), "BS-003",
                                "EXT-013"}),
    # A flag not documented for the command (CMD-014, unknown bits too), FUA on a command that does not
    # write (FUA-003), NBD_CMD_FLAG_PAYLOAD_LEN without extended headers (EXT-001).
    Strict.FLAGS: frozenset({"CMD-014", "FUA-003", "EXT-001"}),
    # "The client MUST NOT send a request whose offset plus length exceeds the export size" (BSZ-033).
    Strict.BOUNDS: frozenset({"BSZ-033"}),
    # "The client SHOULD NOT send a zero-length READ / WRITE / TRIM / WRITE_ZEROES / BLOCK_STATUS".
    Strict.ZERO_SIZE: frozenset(ZERO_LENGTH_REQ.values()),
    # "the client MUST use multiples of any advertised minimum block size" (BSZ-031).
    Strict.ALIGN: frozenset({"BSZ-031"}),
    # Over the advertised maximum payload (BSZ-025), over 2^25 when none was advertised (BSZ-008).
    Strict.PAYLOAD: frozenset({"BSZ-025", "BSZ-008"}),
}
_STRICT_NAMES = ", ".join(f"{f.name}={f.value:#x}" for f in Strict if f is not Strict.ALL)  # AUTO_FLAG too


def strictness_for(flags: Strict | int) -> Strictness:
    """The core's strictness for a combination of Strict flags (0: `Strictness.lenient()`, as before)."""
    flags = _check_strict(flags)
    if not flags:
        # libnbd's 0 clears every strict flag; ours has always also meant lenient: the server's violations
        # are recorded, not raised.
        return Strictness.lenient()
    disabled: set[str] = set()
    refuse: set[str] = set()
    for flag, ids in STRICT_IDS.items():
        (refuse if flags & flag else disabled).update(ids)
    return Strictness(disabled=frozenset(disabled), refuse=frozenset(refuse))


def strict_flags(strictness: Strictness) -> Strict:
    """The Strict flags a strictness fully enforces: local checks on, none of the flag's ids disabled, and
    each of them refused (its level fatal, or the id in ``refuse``)."""
    if not strictness.check_local:
        return Strict(0)
    flags = Strict(0)
    for flag, ids in STRICT_IDS.items():
        if all(strictness.enabled(i) and strictness.refuses(i, requirements.level(i)) for i in ids):
            flags |= flag
    return flags


def _check_strict(flags: object) -> Strict:
    if isinstance(flags, bool) or not isinstance(flags, int):
        raise TypeError(f"strict mode must be Strict flags ({_STRICT_NAMES}) or a Strictness, not {flags!r}")
    if flags < 0 or flags & ~(int(Strict.ALL) | int(Strict.AUTO_FLAG)):  # (~ of an IntFlag drops unknown bits)
        raise ValueError(f"strict mode {flags:#x} is not a combination of the Strict flags {_STRICT_NAMES}")
    return Strict(flags & int(Strict.ALL))

_RECV_CHUNK = 256 * 1024
# With a READ of at least _BIG_READ bytes in flight, the driver reads reply headers in small pieces so
# the payload goes straight into the caller's buffer (saves a copy: 256 KiB reads went 1.0 -> 1.7 GiB/s);
# smaller reads are cheaper to copy than to fetch with an extra recv.
_BIG_READ = 64 * 1024
_HEADER_READ = 40  # an extended chunk header + the offset of NBD_REPLY_TYPE_OFFSET_DATA

ExtentCallback = Callable[[str, int, list[int], int], Any]


class ClientError(Exception):
    """A command or option failed as the protocol allows (error reply, refused option, timeout...).

    `errno` is the NBD error of a failed command (an errno value) or None; `reply` is the option reply
    (`RepError`) that refused an option, if any.
    """

    def __init__(self, message: str, *, errno: int | None = None, reply: ev.OptionReply | None = None) -> None:
        super().__init__(message)
        self.errno = errno
        self.reply = reply


class UsageError(ClientError):
    """The caller used the client wrongly (a setting after connect, an unknown cookie): a fault of the
    code driving the client, never of the server.  The suites report it as a harness error."""


# connect() errors of a listener that is only busy.  A Unix listener whose backlog is full answers a
# non-blocking connect -- which every socket with a timeout is -- with EAGAIN at once instead of
# queueing it; a TCP connect may see EAGAIN (no local port free for a moment).  A full TCP backlog
# drops the SYN and connect() waits by itself; ECONNREFUSED means nobody listens (a dead peer), which
# must fail at once, not after the whole timeout.
_BUSY_UNIX = frozenset({_errno.EAGAIN})
_BUSY_TCP = frozenset({_errno.EAGAIN})
_RETRY_FIRST_DELAY, _RETRY_MAX_DELAY = 0.005, 0.1


def _connect_retrying(
    attempt: Callable[[float | None], socket.socket], what: str, timeout: float | None, busy: frozenset[int]
) -> socket.socket:
    """`attempt(time left)` until it connects: errors in `busy` are retried with a short exponential
    backoff until `timeout` runs out (then TimeoutError), because a busy listener is a transient state
    the caller's timeout is meant to cover.  Without a timeout (blocking) nothing is retried."""
    deadline = None if timeout is None else time.monotonic() + timeout
    delay = _RETRY_FIRST_DELAY
    attempts = 0
    left = timeout
    while True:
        attempts += 1
        try:
            return attempt(left)
        except OSError as exc:
            if deadline is None or exc.errno not in busy:
                raise
            last = exc
        left = deadline - time.monotonic()
        if left > 0:
            time.sleep(min(delay, left))
            delay = min(delay * 2, _RETRY_MAX_DELAY)
            left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(
                _errno.ETIMEDOUT,
                f"{what}: still {_errno.errorcode.get(last.errno or 0, last.errno)} ({last.strerror}) after "
                f"{attempts} attempts in {timeout} s: the listener is not accepting connections",
            ) from last


@dataclass(slots=True)
class _Command:
    """One request in flight: what the driver must remember to deliver its reply."""

    request: ev.Request
    buffer: memoryview | None = None  # READ: where data goes (request.offset maps to buffer[0])
    extent_cb: ExtentCallback | None = None
    error: int = 0
    done: bool = False
    covered: list[tuple[int, int]] = field(default_factory=list)


# Wire log entries a Client keeps by default: the head and the tail, like the server's sessions.
TRANSCRIPT_MAX = 20000


class Client:
    """A blocking NBD client; one instance is one connection (like an nbd handle)."""

    def __init__(
        self, *, strictness: Strictness | None = None, timeout: float = 30.0, transcript: bool | Transcript = True
    ) -> None:
        """`transcript=False` switches the wire log off (benchmarks); a `Transcript` is used as given;
        by default the log keeps its first and last `TRANSCRIPT_MAX` / 2 entries."""
        self._strictness = strictness or strictness_for(Strict.ALL)
        self._strict: tuple[Strictness, Strict] | None = None  # (strictness, its flags), computed on use
        self._transcript = transcript
        self._timeout = timeout
        self._conn: ClientConnection | None = None
        self._sock: socket.socket | None = None
        # option-phase settings (libnbd defaults)
        self._export_name = ""
        self._request_sr = True
        self._request_eh = True
        self._request_meta = True
        self._meta_queries: list[str] = []
        self._handshake_flags = ClientFlag.FIXED_NEWSTYLE | ClientFlag.NO_ZEROES
        self._full_info = False
        self._opt_mode = False
        self._tls = TLS_DISABLE
        self._tls_certificates: str | None = None
        self._tls_psk_file: str | None = None
        self._tls_username: str | None = None
        self._tls_hostname: str | None = None
        self._tls_verify_peer = True
        # what was learned
        self._protocol: str | None = None
        self._server_flags = 0
        self._structured = False
        self._extended = False
        self._tls_done = False
        self._meta_set_for: str | None = None
        self._info: dict[str, Any] = {}
        self._ready = False
        self._closed = False
        self._commands: dict[int, _Command] = {}
        self._read_targets: dict[int, object] = {}  # cookie -> base object of a READ buffer in flight

    # ------------------------------------------------------------------ settings (before connecting)

    def set_timeout(self, seconds: float) -> None:
        """Timeout of every socket operation (connect, send, each receive); applies immediately."""
        self._timeout = seconds
        if self._sock is not None:
            self._sock.settimeout(seconds)

    def set_strict_mode(self, flags: Strict | int | Strictness) -> None:
        """libnbd's nbd_set_strict_mode: the `Strict` flags of the requests to refuse before sending
        (default `Strict.ALL`); a cleared flag lets such requests reach the server.  0 is lenient mode:
        nothing refused, and the server's violations recorded, never raised.  An int that is not a
        combination of Strict flags raises ValueError (a bool or another type: TypeError).  A
        `Strictness` configures the core directly (per requirement id)."""
        self._before_connect("set_strict_mode")
        self._strictness = flags if isinstance(flags, Strictness) else strictness_for(flags)

    def get_strict_mode(self) -> Strict:
        """libnbd's nbd_get_strict_mode: the Strict flags in effect (a flag counts when all its checks
        refuse; see `get_strictness` for the whole configuration)."""
        cached = self._strict
        if cached is None or cached[0] is not self._strictness:
            cached = self._strict = (self._strictness, strict_flags(self._strictness))
        return cached[1]

    def get_strictness(self) -> Strictness:
        """The core's strictness this client uses (what `set_strict_mode` set)."""
        return self._strictness

    def set_export_name(self, name: str) -> None:
        self._export_name = name

    def get_export_name(self) -> str:
        return self._export_name

    def set_request_structured_replies(self, request: bool) -> None:
        self._request_sr = request

    def get_request_structured_replies(self) -> bool:
        return self._request_sr

    def set_request_extended_headers(self, request: bool) -> None:
        self._request_eh = request

    def get_request_extended_headers(self) -> bool:
        return self._request_eh

    def set_request_meta_context(self, request: bool) -> None:
        """Whether opt_go / connect send NBD_OPT_SET_META_CONTEXT for the added contexts (default on)."""
        self._request_meta = request

    def get_request_meta_context(self) -> bool:
        return self._request_meta

    def add_meta_context(self, name: str) -> None:
        self._meta_queries.append(name)

    def get_nr_meta_contexts(self) -> int:
        return len(self._meta_queries)

    def get_meta_context(self, i: int) -> str:
        return self._meta_queries[i]

    def clear_meta_contexts(self) -> None:
        self._meta_queries.clear()

    def set_handshake_flags(self, flags: int) -> None:
        """Client flags we are willing to send (masked by what the server offers, like libnbd)."""
        self._handshake_flags = ClientFlag(flags)

    def get_handshake_flags(self) -> int:
        """Like libnbd: before connecting, the flags we are willing to send; after, those agreed."""
        if self._conn is not None and self._conn.client_flags is not None:
            return int(self._conn.client_flags)
        return int(self._handshake_flags)

    def set_full_info(self, full: bool) -> None:
        """Also request NBD_INFO_NAME and NBD_INFO_DESCRIPTION in GO/INFO."""
        self._full_info = full

    def set_opt_mode(self, enable: bool) -> None:
        self._opt_mode = enable

    def get_opt_mode(self) -> bool:
        return self._opt_mode

    def set_tls(self, mode: int | str) -> None:
        """TLS_DISABLE / TLS_ALLOW / TLS_REQUIRE, or "off" / "allow" / "require"."""
        self._tls = _TLS_NAMES[mode] if isinstance(mode, str) else int(mode)

    def get_tls(self) -> int:
        return self._tls

    def set_tls_certificates(self, directory: str | os.PathLike[str]) -> None:
        self._tls_certificates = os.fspath(directory)

    def set_tls_psk_file(self, path: str | os.PathLike[str]) -> None:
        self._tls_psk_file = os.fspath(path)

    def set_tls_username(self, username: str) -> None:
        self._tls_username = username

    def set_tls_hostname(self, hostname: str) -> None:
        self._tls_hostname = hostname

    def set_tls_verify_peer(self, verify: bool) -> None:
        self._tls_verify_peer = verify

    # ------------------------------------------------------------------ connecting

    def connect_uri(self, uri: str | Uri) -> None:
        """Connect as libnbd's nbd_connect_uri: transport, export, TLS settings from the URI.
        Unknown query parameters are diagnosed with a UriWarning (URI-022) and otherwise ignored."""
        self._before_connect("connect_uri")  # before any setting changes or any socket opens
        parsed = parse_uri(uri, warn=True) if isinstance(uri, str) else uri
        self._export_name = parsed.export_name
        if parsed.tls_required:
            # uri.md: "If encryption cannot be negotiated then the connection MUST fail" (URI-003/005)
            self._tls = TLS_REQUIRE
        if parsed.tls_certificates is not None:
            self._tls_certificates = parsed.tls_certificates
        if parsed.tls_psk_file is not None:
            self._tls_psk_file = parsed.tls_psk_file
        if parsed.tls_user is not None:
            self._tls_username = parsed.tls_user
        if parsed.tls_hostname is not None:
            self._tls_hostname = parsed.tls_hostname
        elif parsed.transport == "tcp" and self._tls_hostname is None:
            self._tls_hostname = parsed.host
        if parsed.tls_verify_peer is not None:
            self._tls_verify_peer = parsed.tls_verify_peer
        address = parsed.address()
        if isinstance(address, str):
            self.connect_unix(address)
        else:
            self.connect_tcp(*address)

    def connect_unix(self, path: str | os.PathLike[str]) -> None:
        """Connect to a Unix socket; while its backlog is full (EAGAIN), retry within the timeout."""
        self._before_connect("connect_unix")  # before the socket opens: it would leak
        address = os.fspath(path)

        def attempt(timeout: float | None) -> socket.socket:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            try:
                sock.connect(address)
            except BaseException:
                sock.close()
                raise
            return sock

        self.connect_socket(_connect_retrying(attempt, f"connect_unix({address!r})", self._timeout, _BUSY_UNIX))

    def connect_tcp(self, host: str, port: int | str) -> None:
        """Connect over TCP; EAGAIN (no local port free for a moment) is retried within the timeout.  A
        refusal is final at once: nobody listens (a full backlog drops the SYN and connect waits)."""
        self._before_connect("connect_tcp")  # before the socket opens: it would leak
        sock = _connect_retrying(lambda timeout: socket.create_connection((host, int(port)), timeout=timeout),
                                 f"connect_tcp({host!r}, {port!r})", self._timeout, _BUSY_TCP)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self._tls_hostname is None:
            self._tls_hostname = host
        self.connect_socket(sock)

    def connect_socket(self, sock: socket.socket) -> None:
        """Run the handshake on a connected socket (ours from now on), up to transmission unless in
        opt mode."""
        self._before_connect("connect")
        sock.settimeout(self._timeout)
        self._sock = sock
        if isinstance(self._transcript, Transcript):
            transcript = self._transcript
        else:
            transcript = Transcript(max_entries=TRANSCRIPT_MAX, enabled=bool(self._transcript))
        self._conn = ClientConnection(strictness=self._strictness, transcript=transcript)
        try:
            self._handshake()
        except BaseException:
            self._abandon()
            raise

    def _before_connect(self, what: str) -> None:
        if self._conn is not None:
            raise UsageError(f"{what}: already connected")

    def _handshake(self) -> None:
        greeting = self._next()
        if isinstance(greeting, ev.OldstyleGreeting):
            self._protocol = "oldstyle"
            self._learn_export(greeting.export_size, greeting.transmission_flags)
            if self._tls == TLS_REQUIRE:
                raise ClientError("TLS required but the server speaks oldstyle (no STARTTLS)")
            self._ready = True
            return
        if not isinstance(greeting, ev.NewstyleGreeting):
            raise ClientError(f"unexpected greeting {greeting!r}")
        fixed = bool(greeting.flags & HandshakeFlag.FIXED_NEWSTYLE)
        self._protocol = "newstyle-fixed" if fixed else "newstyle"
        offered = ClientFlag(int(greeting.flags) & (ClientFlag.FIXED_NEWSTYLE | ClientFlag.NO_ZEROES))
        self._send(ev.ClientFlags(flags=self._handshake_flags & offered))
        if not fixed:
            # Without fixed newstyle only NBD_OPT_EXPORT_NAME is safe.
            if self._tls == TLS_REQUIRE:
                raise ClientError("TLS required but the server is not fixed newstyle")
            self._export_name_option()
            return
        if self._tls != TLS_DISABLE and not self.opt_starttls() and self._tls == TLS_REQUIRE:
            raise ClientError("TLS required but the server refused NBD_OPT_STARTTLS")
        if self._request_eh:
            self.opt_extended_headers()
        if self._request_sr and not self._extended:
            self.opt_structured_reply()
        if self._opt_mode:
            return
        self.opt_go()

    # ------------------------------------------------------------------ options

    def _need_options(self, what: str) -> ClientConnection:
        if self._conn is None:
            raise ClientError(f"{what}: not connected")
        if self._ready or self._protocol != "newstyle-fixed":
            raise ClientError(f"{what}: not in the option phase of a fixed-newstyle connection")
        return self._conn

    def _option_replies(self, option: ev.Option) -> list[ev.OptionReply]:
        """Send an option and collect its replies up to the final ACK or error (the last element)."""
        self._send(option)
        replies: list[ev.OptionReply] = []
        while True:
            event = self._next()
            if isinstance(event, ev.ConnectionClosed):
                raise ClientError(f"server closed the connection in reply to {type(option).__name__}")
            if not isinstance(event, ev.OptionReply):
                raise ClientError(f"unexpected {event!r} in reply to {type(option).__name__}")
            replies.append(event)
            if isinstance(event, ev.RepError) and event.reply_type == Rep.ERR_SHUTDOWN:
                # "On receiving NBD_REP_ERR_SHUTDOWN the client MUST initiate a soft disconnect"
                # (NBD_OPT_ABORT, DISC-014): whatever the option was, the session ends here.
                with contextlib.suppress(ProtocolError, OSError, ClientError):
                    self.opt_abort()
                self._abandon()
                raise self._refused(type(option).__name__, event)
            if isinstance(event, ev.RepAck | ev.RepError):
                return replies

    @staticmethod
    def _refused(what: str, reply: ev.OptionReply) -> ClientError:
        name = Rep(reply.reply_type).name if reply.reply_type in Rep._value2member_map_ else hex(reply.reply_type)
        message = getattr(reply, "message", "")
        return ClientError(f"{what}: server replied NBD_REP_{name}" + (f": {message}" if message else ""), reply=reply)

    def opt_starttls(self) -> bool:
        """NBD_OPT_STARTTLS then the TLS handshake; False if the server refused (ERR_UNSUP/POLICY...)."""
        self._need_options("opt_starttls")
        replies = self._option_replies(ev.OptStartTLS())
        if isinstance(replies[-1], ev.RepError):
            return False
        # The core pauses after the ACK: next_event() yields StartTLS once.
        event = self._next()
        if not isinstance(event, ev.StartTLS):
            raise ClientError(f"expected the StartTLS pause after the ACK, got {event!r}")
        self._start_tls()
        return True

    def _tls_context(self) -> NbdSSLContext:
        """PSK when a keys file is set (the PSK is then the only credential), else X.509: the chain is
        verified on every transport (Unix sockets too), the name only when a hostname is known."""
        if self._tls_psk_file is not None:
            return client_context(psk_file=self._tls_psk_file, psk_identity=self._tls_username)
        return client_context(self._tls_certificates, hostname=self._tls_hostname, verify_peer=self._tls_verify_peer)

    def _start_tls(self) -> None:
        assert self._sock is not None and self._conn is not None
        context = self._tls_context()
        tls_sock = context.wrap_socket(self._sock, server_hostname=context.server_hostname,
                                       do_handshake_on_connect=False)
        self._sock = tls_sock
        tls_sock.settimeout(self._timeout)
        if context.psk_required:
            self._psk_handshake(tls_sock, context.psk_identity)
        else:
            tls_sock.do_handshake()
        self._conn.tls_established()
        self._tls_done = True
        # "the server MUST forget all earlier negotiation state" (TLS-054): so do we.
        self._structured = self._extended = False
        self._meta_set_for = None

    @staticmethod
    def _psk_handshake(tls_sock: ssl.SSLSocket, identity: str | None) -> None:
        """The handshake of a PSK context, then proof that the session used the PSK; failures become
        one PskAuthError that says what went wrong (the bare OpenSSL reasons do not say "PSK")."""
        try:
            tls_sock.do_handshake()
        except ssl.SSLCertVerificationError as exc:
            raise PskAuthError(f"TLS-PSK identity {identity!r}: the server authenticated with a certificate, "
                               "not the PSK (it has no PSK, or no key for this identity)") from exc
        except ssl.SSLError as exc:
            raise PskAuthError(f"TLS-PSK identity {identity!r}: handshake failed ({exc.reason or exc}); most "
                               "likely the server has another key for this identity, or none") from exc
        # uri.md: "By default clients SHOULD verify the server's identity if TLS is negotiated" (URI-019);
        # in PSK mode only the PSK proves it, so a session that did not use the PSK fails here.
        require_psk(tls_sock)

    def opt_structured_reply(self) -> bool:
        self._need_options("opt_structured_reply")
        ok = isinstance(self._option_replies(ev.OptStructuredReply())[-1], ev.RepAck)
        self._structured = self._structured or ok
        return ok

    def opt_extended_headers(self) -> bool:
        self._need_options("opt_extended_headers")
        ok = isinstance(self._option_replies(ev.OptExtendedHeaders())[-1], ev.RepAck)
        if ok:
            # ext-header draft: extended headers imply structured replies are used.
            self._extended = self._structured = True
        return ok

    def opt_list(self, callback: Callable[[str, str], Any] | None = None) -> list[tuple[str, str]]:
        """NBD_OPT_LIST: [(name, description)], also passed one by one to `callback` like libnbd."""
        self._need_options("opt_list")
        replies = self._option_replies(ev.OptList())
        if isinstance(replies[-1], ev.RepError):
            raise self._refused("opt_list", replies[-1])
        exports = [(r.name, r.details) for r in replies if isinstance(r, ev.RepServer)]
        if callback is not None:
            for name, description in exports:
                callback(name, description)
        return exports

    def _meta(self, set_: bool, queries: Iterable[str] | None, callback: Callable[[str], Any] | None) -> list[str]:
        what = "opt_set_meta_context" if set_ else "opt_list_meta_context"
        self._need_options(what)
        q = tuple(self._meta_queries if queries is None else queries)
        option_cls = ev.OptSetMetaContext if set_ else ev.OptListMetaContext
        replies = self._option_replies(option_cls(name=self._export_name, queries=q))
        if isinstance(replies[-1], ev.RepError):
            raise self._refused(what, replies[-1])
        names = [r.name for r in replies if isinstance(r, ev.RepMetaContext)]
        if set_:
            self._meta_set_for = self._export_name
        if callback is not None:
            for name in names:
                callback(name)
        return names

    def opt_list_meta_context(
        self, queries: Iterable[str] | None = None, callback: Callable[[str], Any] | None = None
    ) -> list[str]:
        """NBD_OPT_LIST_META_CONTEXT for the export name; queries default to the added contexts."""
        return self._meta(False, queries, callback)

    def opt_set_meta_context(
        self, queries: Iterable[str] | None = None, callback: Callable[[str], Any] | None = None
    ) -> list[str]:
        """NBD_OPT_SET_META_CONTEXT: the contexts the server selected (see can_meta_context)."""
        return self._meta(True, queries, callback)

    def _info_request(self) -> tuple[int, ...]:
        wanted = [Info.BLOCK_SIZE]
        if self._full_info:
            wanted = [Info.NAME, Info.DESCRIPTION, Info.BLOCK_SIZE]
        return tuple(wanted)

    def _collect_info(self, replies: list[ev.OptionReply]) -> None:
        for reply in replies:
            if isinstance(reply, ev.RepInfoExport):
                self._learn_export(reply.export_size, reply.transmission_flags)
            elif isinstance(reply, ev.RepInfoName):
                self._info["name"] = reply.name
            elif isinstance(reply, ev.RepInfoDescription):
                self._info["description"] = reply.description
            elif isinstance(reply, ev.RepInfoBlockSize):
                self._info["block_size"] = (reply.minimum, reply.preferred, reply.maximum)

    def opt_info(self) -> None:
        """NBD_OPT_INFO for the export name: fills get_size, can_*, block sizes; stays in options."""
        self._need_options("opt_info")
        self._info = {}
        self._maybe_set_meta()
        replies = self._option_replies(ev.OptInfo(name=self._export_name, info=self._info_request()))
        if isinstance(replies[-1], ev.RepError):
            raise self._refused("opt_info", replies[-1])
        self._collect_info(replies)

    def _maybe_set_meta(self) -> None:
        # libnbd: with request_meta_context on, opt_go/opt_info set the added contexts first, unless
        # opt_set_meta_context already did for this export name.
        if (
            self._request_meta
            and self._meta_queries
            and self._structured
            and self._meta_set_for != self._export_name
        ):
            with contextlib.suppress(ClientError):
                self._meta(True, None, None)

    def opt_go(self) -> None:
        """NBD_OPT_GO; on NBD_REP_ERR_UNSUP fall back to NBD_OPT_EXPORT_NAME (as libnbd does)."""
        self._need_options("opt_go")
        self._info = {}
        self._maybe_set_meta()
        replies = self._option_replies(ev.OptGo(name=self._export_name, info=self._info_request()))
        last = replies[-1]
        if isinstance(last, ev.RepError):
            if last.reply_type == Rep.ERR_UNSUP:
                self._export_name_option()
                return
            raise self._refused("opt_go", last)
        self._collect_info(replies)
        self._ready = True

    def _export_name_option(self) -> None:
        self._send(ev.OptExportName(name=self._export_name))
        event = self._next()
        if isinstance(event, ev.ConnectionClosed):
            # proto.md: on an unknown export the server "MUST terminate the session" (no error reply).
            raise ClientError(f"server closed the connection after NBD_OPT_EXPORT_NAME {self._export_name!r}")
        if not isinstance(event, ev.ExportNameReply):
            raise ClientError(f"unexpected {event!r} in reply to NBD_OPT_EXPORT_NAME")
        self._learn_export(event.export_size, event.transmission_flags)
        self._ready = True

    def opt_abort(self) -> None:
        """NBD_OPT_ABORT, wait briefly for the ACK (or EOF), then close."""
        self._need_options("opt_abort")
        self._send(ev.OptAbort())
        with contextlib.suppress(ProtocolError, OSError, ClientError):
            self._next()
        self._abandon()

    def _learn_export(self, size: int, flags: int) -> None:
        self._info["size"] = size
        self._server_flags = int(flags)

    # ------------------------------------------------------------------ what was negotiated

    def _need_info(self, what: str) -> None:
        if "size" not in self._info:
            raise ClientError(f"{what}: no export information yet (connect, opt_info or opt_go first)")

    def get_size(self) -> int:
        self._need_info("get_size")
        return int(self._info["size"])

    def _flag(self, flag: TxFlag, what: str) -> bool:
        self._need_info(what)
        return bool(self._server_flags & flag)

    def get_transmission_flags(self) -> int:
        self._need_info("get_transmission_flags")
        return self._server_flags

    def can_flush(self) -> bool:
        return self._flag(TxFlag.SEND_FLUSH, "can_flush")

    def can_fua(self) -> bool:
        return self._flag(TxFlag.SEND_FUA, "can_fua")

    def can_trim(self) -> bool:
        return self._flag(TxFlag.SEND_TRIM, "can_trim")

    def can_zero(self) -> bool:
        return self._flag(TxFlag.SEND_WRITE_ZEROES, "can_zero")

    def can_fast_zero(self) -> bool:
        return self._flag(TxFlag.SEND_FAST_ZERO, "can_fast_zero")

    def can_df(self) -> bool:
        return self._flag(TxFlag.SEND_DF, "can_df")

    def can_multi_conn(self) -> bool:
        return self._flag(TxFlag.CAN_MULTI_CONN, "can_multi_conn")

    def can_cache(self) -> bool:
        return self._flag(TxFlag.SEND_CACHE, "can_cache")

    def is_read_only(self) -> bool:
        return self._flag(TxFlag.READ_ONLY, "is_read_only")

    def is_rotational(self) -> bool:
        return self._flag(TxFlag.ROTATIONAL, "is_rotational")

    def can_meta_context(self, name: str) -> bool:
        """Whether the server selected `name` for this connection (NBD_OPT_SET_META_CONTEXT)."""
        return name in self.get_meta_contexts().values()

    def get_meta_contexts(self) -> dict[int, str]:
        """Negotiated contexts: id -> name (from the core)."""
        return dict(self._conn.meta_contexts) if self._conn is not None else {}

    def get_block_size(self, which: int | str) -> int:
        """libnbd's nbd_get_block_size: 0 when the server sent no NBD_INFO_BLOCK_SIZE (except PAYLOAD)."""
        index = _BLOCK_SIZE_NAMES[which] if isinstance(which, str) else int(which)
        sizes = self._info.get("block_size")
        if index == BLOCK_SIZE_PAYLOAD:
            # as libnbd: the advertised maximum (capped at 64 MiB, what the core accepts), else 2^25
            return min(sizes[2], PAYLOAD_CAP) if sizes else DEFAULT_MAX_PAYLOAD
        return int(sizes[index]) if sizes else 0

    def get_structured_replies_negotiated(self) -> bool:
        return self._structured

    def get_extended_headers_negotiated(self) -> bool:
        return self._extended

    def get_tls_negotiated(self) -> bool:
        return self._tls_done

    def get_protocol(self) -> str:
        """"oldstyle", "newstyle" or "newstyle-fixed" (libnbd's names)."""
        if self._protocol is None:
            raise ClientError("get_protocol: not connected")
        return self._protocol

    def get_canonical_export_name(self) -> str:
        """NBD_INFO_NAME if the server sent it (set_full_info), else the requested name."""
        return str(self._info.get("name", self._export_name))

    def get_export_description(self) -> str:
        if "description" not in self._info:
            raise ClientError("get_export_description: the server sent no NBD_INFO_DESCRIPTION (set_full_info?)")
        return str(self._info["description"])

    def aio_is_ready(self) -> bool:
        """In transmission: commands may be issued."""
        return self._ready and not self._closed

    @property
    def violations(self) -> list[Any]:
        return list(self._conn.violations) if self._conn is not None else []

    @property
    def checked(self) -> set[str]:
        """Ids of the rules the core checked on what the server sent (held or broken)."""
        return set(self._conn.checked) if self._conn is not None else set()

    @property
    def transcript(self) -> Any:
        return self._conn.transcript if self._conn is not None else None

    @property
    def connection(self) -> ClientConnection | None:
        """The underlying sans-I/O connection (for suites that inspect state)."""
        return self._conn

    # ------------------------------------------------------------------ commands (asynchronous core)

    def _need_ready(self, what: str) -> ClientConnection:
        if self._conn is None or not self._ready or self._closed:
            raise ClientError(f"{what}: not in the transmission phase")
        return self._conn

    def aio_command(
        self,
        command: int,
        offset: int = 0,
        length: int = 0,
        flags: int = 0,
        *,
        payload: ev.Buffer | None = None,
        buffer: memoryview | bytearray | None = None,
        extent_cb: ExtentCallback | None = None,
    ) -> int:
        """Send any request without waiting; returns its cookie (see `wait`, `aio_command_completed`)."""
        conn = self._need_ready(cmd_name(command))
        if payload is not None and Strict.PAYLOAD & self.get_strict_mode():
            self._check_payload(command, nbytes(payload))
        cookie = conn.next_cookie()  # the core knows what is in flight (CMD-001)
        view = memoryview(buffer).cast("B") if buffer is not None else None
        if payload is not None and conn.extended_headers:
            # ext-header draft: with extended headers a WRITE "MUST" set NBD_CMD_FLAG_PAYLOAD_LEN (EXT-002)
            flags |= CmdFlag.PAYLOAD_LEN
        request = ev.Request(
            cookie=cookie,
            command=command,
            flags=flags,
            offset=offset,
            length=length,
            payload=payload,
            read_buffer=view,
        )
        self._commands[cookie] = _Command(request=request, buffer=view, extent_cb=extent_cb)
        if view is not None and len(view) >= _BIG_READ:
            self._read_targets[cookie] = view.obj
        try:
            if payload is not None:
                self._send_iov(conn.send_iov(request))
            else:
                self._sendall(conn.send(request))
        except BaseException:
            del self._commands[cookie]
            self._read_targets.pop(cookie, None)
            raise
        return cookie

    def _check_payload(self, command: int, n: int) -> None:
        """Strict.PAYLOAD: refuse a payload over the client's outgoing maximum, as libnbd does
        (`get_block_size(BLOCK_SIZE_PAYLOAD)`: the advertised maximum up to 64 MiB, else 2^25)."""
        limit = self.get_block_size(BLOCK_SIZE_PAYLOAD)
        if n <= limit:
            return
        sizes = self._info.get("block_size")
        # Over an advertised maximum: "A client MUST NOT request a WRITE ... longer than the maximum payload
        # size" (BSZ-025); otherwise over 2^25: "Absent advertised constraints, a client SHOULD use ...
        # payloads of at most 2^25 bytes" (BSZ-008).
        req_id = "BSZ-025" if sizes else "BSZ-008"
        r = requirements.get(req_id)
        message = f"{cmd_name(command)} payload of {n} bytes exceeds the payload maximum {limit} (Strict.PAYLOAD)"
        violation = Violation(req_id=req_id, level=r.level, binds=r.binds, message=message, direction="C")
        raise LocalProtocolError(f"{req_id}: {message}", violation=violation)

    def aio_pread(self, buf: bytearray | memoryview, offset: int, flags: int = 0) -> int:
        """READ into `buf` (len(buf) bytes at `offset`); the data lands in place."""
        return self.aio_command(Cmd.READ, offset, len(buf), flags, buffer=buf)

    def aio_pwrite(self, buf: ev.Buffer, offset: int, flags: int = 0) -> int:
        return self.aio_command(Cmd.WRITE, offset, len(buf), flags, payload=buf)

    def aio_in_flight(self) -> int:
        return sum(1 for c in self._commands.values() if not c.done)

    def aio_command_completed(self, cookie: int) -> bool:
        """True once the reply of `cookie` is complete (then forgotten); raises its error, if any."""
        command = self._commands.get(cookie)
        if command is None:
            raise UsageError(f"unknown cookie {cookie}")
        if not command.done:
            return False
        del self._commands[cookie]
        if command.error:
            what = cmd_name(command.request.command)
            try:
                err = Err(command.error)
                extra = ""
            except ValueError:
                # "a client SHOULD treat an unexpected value as if it were NBD_EINVAL" (ERR-012)
                err, extra = Err.EINVAL, f"; the server sent undefined error value {command.error}"
            name = _errno.errorcode.get(err.errno, err.name)
            raise ClientError(f"{what} failed: {name} ({os.strerror(err.errno)}){extra}", errno=err.errno)
        return True

    def poll(self) -> int:
        """Block until at least one command completes, then return how many did.

        Events already received are dispatched first; the socket is then read as often as needed
        (each read waits up to the timeout, then raises TimeoutError). With nothing in flight it
        blocks until the timeout or until the server closes the connection (ClientError)."""
        self._need_ready("poll")
        return self._dispatch_available(block=True)

    def wait(self, cookie: int) -> None:
        """Block until `cookie` completes; raise ClientError with its errno if it failed."""
        while not self.aio_command_completed(cookie):
            self._dispatch_available(block=True)

    def wait_all(self) -> None:
        """Block until nothing is in flight."""
        while self.aio_in_flight():
            self._dispatch_available(block=True)

    def _dispatch_available(self, *, block: bool) -> int:
        conn = self._conn
        assert conn is not None
        completed = 0
        while True:
            event = conn.next_event()
            if event is NEED_DATA:
                # Block for more bytes only while nothing has completed yet.
                if completed or not block:
                    return completed
                self._receive()
                continue
            completed += self._on_reply_event(event)

    def _on_reply_event(self, event: Any) -> int:
        if isinstance(event, ev.ConnectionClosed):
            self._closed = True
            pending = [c for c in self._commands.values() if not c.done]
            for command in pending:
                command.error = command.error or _errno.ESHUTDOWN
                command.done = True
            raise ClientError(f"server closed the connection with {len(pending)} command(s) in flight")
        cookie = getattr(event, "cookie", None)
        command = self._commands.get(cookie) if cookie is not None else None
        if command is None:
            # The core checks cookies against what is in flight (a violation there); nothing to deliver.
            return 0
        if isinstance(event, ev.ReplyComplete):
            command.error = command.error or event.error
            command.done = True
            self._read_targets.pop(event.cookie, None)
            return 1
        if isinstance(event, ev.SimpleReply):
            if event.error:
                command.error = command.error or event.error
            elif command.buffer is not None and event.data is not None and not event.in_place:
                command.buffer[: len(event.data)] = event.data
        elif isinstance(event, ev.OffsetData):
            buffer = command.buffer
            if buffer is not None and event.data is not None and not event.in_place:
                start = event.offset - command.request.offset
                n = memoryview(event.data).nbytes
                # Outside the request (recorded as SR-032 by the core; lenient mode lets it through):
                # nothing of the caller's buffer is overwritten.
                if start >= 0 and start + n <= len(buffer):
                    buffer[start : start + n] = event.data
        elif isinstance(event, ev.OffsetHole):
            buffer = command.buffer
            if buffer is not None:
                start = event.offset - command.request.offset
                n = event.length
                # proto.md: "a hole ... reads as zeroes"; outside the request: skipped (see above)
                if start >= 0 and start + n <= len(buffer):
                    buffer[start : start + n] = bytes(n)
        elif isinstance(event, ev.BlockStatus):
            if command.extent_cb is not None:
                name = self.get_meta_contexts().get(event.context_id, f"#{event.context_id}")
                entries = [value for extent in event.extents for value in extent]
                command.extent_cb(name, command.request.offset, entries, 0)
        elif isinstance(event, ev.ErrorChunk):
            command.error = command.error or event.error or _errno.EIO
        return 0

    # ------------------------------------------------------------------ commands (blocking, libnbd names)

    def pread_into(self, buf: bytearray | memoryview, offset: int, flags: int = 0) -> None:
        self.wait(self.aio_pread(buf, offset, flags))

    def pread(self, count: int, offset: int, flags: int = 0) -> bytes:
        buf = bytearray(count)
        self.pread_into(buf, offset, flags)
        return bytes(buf)

    def pwrite(self, buf: ev.Buffer, offset: int, flags: int = 0) -> None:
        self.wait(self.aio_pwrite(buf, offset, flags))

    def zero(self, count: int, offset: int, flags: int = 0) -> None:
        self.wait(self.aio_command(Cmd.WRITE_ZEROES, offset, count, flags))

    def trim(self, count: int, offset: int, flags: int = 0) -> None:
        self.wait(self.aio_command(Cmd.TRIM, offset, count, flags))

    def cache(self, count: int, offset: int, flags: int = 0) -> None:
        self.wait(self.aio_command(Cmd.CACHE, offset, count, flags))

    def flush(self, flags: int = 0) -> None:
        self.wait(self.aio_command(Cmd.FLUSH, 0, 0, flags))

    def block_status(self, count: int, offset: int, callback: ExtentCallback, flags: int = 0) -> None:
        """NBD_CMD_BLOCK_STATUS; `callback(context, offset, entries, error)` per context, where
        `entries` is libnbd's flat list [length, flags, length, flags, ...]."""
        self.wait(self.aio_command(Cmd.BLOCK_STATUS, offset, count, flags, extent_cb=callback))

    # ------------------------------------------------------------------ teardown

    def shutdown(self) -> None:
        """Wait for commands in flight, send NBD_CMD_DISC, close our side and the socket."""
        if self._conn is None or self._closed:
            self._abandon()
            return
        try:
            if self._ready:
                self.wait_all()
                self._sendall(self._conn.send(ev.Request(cookie=self._conn.next_cookie(), command=Cmd.DISC)))
            elif self._protocol == "newstyle-fixed":
                self._send(ev.OptAbort())
        finally:
            self._abandon()

    def close(self) -> None:
        """Shut down politely if possible, then release the socket (never raises for I/O errors)."""
        with contextlib.suppress(ProtocolError, OSError, ClientError):
            self.shutdown()
        self._abandon()

    def _abandon(self, *, notify: bool = True) -> None:
        """Release the socket.  Over TLS, close_notify goes first ("the party initiating the transaction
        SHOULD shutdown TLS first", DISC-002 / DISC-016), sent without waiting for the peer's; a test that
        means a bare TCP close says ``notify=False``."""
        self._closed = True
        sock, self._sock = self._sock, None
        if sock is None:
            return
        if notify and isinstance(sock, ssl.SSLSocket):
            with contextlib.suppress(OSError, ValueError):
                sock.setblocking(False)
                sock.unwrap()           # sends close_notify; SSLWantReadError: the peer's has not come
        with contextlib.suppress(OSError):
            sock.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ socket plumbing

    def _send(self, event: ev.Event) -> None:
        assert self._conn is not None
        self._sendall(self._conn.send(event))

    def _sendall(self, data: bytes) -> None:
        if self._sock is None:
            raise ClientError("not connected")
        if data:
            self._sock.sendall(data)

    def _send_iov(self, pieces: list[Any]) -> None:
        sock = self._sock
        if sock is None:
            raise ClientError("not connected")
        if isinstance(sock, ssl.SSLSocket):  # SSLSocket has no sendmsg
            for piece in pieces:
                sock.sendall(piece)
            return
        sendmsg_all(sock, pieces)

    def _receive(self) -> None:
        """One recv_into the core's buffer (in place for READ data); EOF is fed as b""."""
        conn, sock = self._conn, self._sock
        if conn is None or sock is None:
            raise ClientError("not connected")
        view = conn.get_buffer(_RECV_CHUNK)
        limit = len(view)
        if self._read_targets and not any(view.obj is t for t in self._read_targets.values()):
            # READ replies pending and the next bytes go to the core's own buffer: read about one reply
            # header, so that the payload after it lands in the caller's buffer, not in ours then copied.
            limit = min(limit, _HEADER_READ)
        n = sock.recv_into(view, limit)
        if n == 0:
            conn.receive_data(b"")
        else:
            conn.buffer_updated(n)

    def _next(self) -> Any:
        """Next event of the option phase, receiving as needed."""
        assert self._conn is not None
        while True:
            event = self._conn.next_event()
            if event is not NEED_DATA:
                return event
            self._receive()

