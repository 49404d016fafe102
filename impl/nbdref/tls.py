"""ssl contexts for NBD's STARTTLS: X.509 and PSK, client and server.

X.509 material follows the directory layout qemu (``tls-creds-x509,dir=``), nbdkit
(``--tls-certificates=``) and libnbd (``tls-certificates=``) share: ``ca-cert.pem``, ``server-cert.pem``,
``server-key.pem``, ``client-cert.pem``, ``client-key.pem``.  PSK keys files are psktool's format, one
``identity:hexkey`` per line.

Python's ssl module gained PSK callbacks only in 3.13 (``SSLContext.set_psk_client_callback``), and
pyOpenSSL has no PSK API at all.  On 3.11/3.12 we install OpenSSL's PSK callbacks
(``SSL_CTX_set_psk_client_callback`` / ``..._server_callback``) with ctypes on the ``SSL_CTX*`` behind
the ``ssl.SSLContext``.  CPython < 3.13 also sets a session-id context on every SSL_CTX, which makes
OpenSSL reject the TLS 1.3 external-PSK session (ATTEMPT_TO_REUSE_SESSION_IN_DIFFERENT_CONTEXT); we
clear it.  The ctypes callbacks are kept alive as attributes of the returned context, which is an
`NbdSSLContext`.

A PSK context authenticates with the PSK and nothing else: TLS 1.2 offers only PSK-authenticated
suites, TLS 1.3 only the SHA-256 suites the callbacks' PSK can be used with (OpenSSL treats a PSK from
these callbacks as SHA-256), the client trusts no CA at all (so a certificate-only handshake fails
verification), a server loads no certificate, and `require_psk` checks the finished session on both ends.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import ssl
import sys
from pathlib import Path

__all__ = [
    "CA_CERT",
    "CLIENT_CERT",
    "CLIENT_KEY",
    "SERVER_CERT",
    "SERVER_KEY",
    "NbdSSLContext",
    "PskAuthError",
    "client_context",
    "psk_used",
    "read_psk_file",
    "require_psk",
    "server_context",
]

CA_CERT = "ca-cert.pem"
SERVER_CERT = "server-cert.pem"
SERVER_KEY = "server-key.pem"
CLIENT_CERT = "client-cert.pem"
CLIENT_KEY = "client-key.pem"

# TLS 1.2: PSK-authenticated suites only (no certificate suites, no RSA-PSK, which needs a server
# certificate, no NULL encryption).  TLS 1.3 suites are configured separately (_PSK_TLS13_SUITES).
_PSK_CIPHERS = "ECDHEPSK:DHEPSK:aPSK:!eNULL:!aNULL"
# TLS 1.3: OpenSSL uses a PSK from the (legacy) PSK callbacks with SHA-256 suites only; offering just
# those makes the peer pick a suite the PSK works with instead of a SHA-384 certificate handshake.
_PSK_TLS13_SUITES = "TLS_AES_128_GCM_SHA256:TLS_CHACHA20_POLY1305_SHA256:TLS_AES_128_CCM_SHA256"

_NATIVE_PSK = sys.version_info >= (3, 13)

PathLike = str | os.PathLike[str]


class NbdSSLContext(ssl.SSLContext):
    """An SSLContext that remembers what the NBD driver needs besides the context itself.

    `server_hostname` is what a client passes to `wrap_socket` (None: no hostname check);
    `psk_identity` is the PSK identity offered (client) or None; `psk_required` says the driver must
    call `require_psk` after the handshake.  `_keepalive` holds ctypes callbacks.
    """

    server_hostname: str | None
    psk_identity: str | None
    psk_required: bool
    _keepalive: list[object]


class PskAuthError(ssl.SSLError):
    """TLS-PSK authentication failed: the handshake did not prove that the peer knows our PSK (it has
    another key, no key for the identity, or answered with a certificate instead).

    An ssl.SSLError so drivers treat it as any failed handshake; `reason` and `strerror` are set as
    OpenSSL's errors have them (str() and log lines use them)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.strerror = message
        self.reason = message
        self.library = "nbdref"


def read_psk_file(path: PathLike) -> dict[str, bytes]:
    """Read a psktool keys file: ``identity:hexkey`` per line, as qemu and nbdkit do."""
    keys: dict[str, bytes] = {}
    for lineno, line in enumerate(Path(path).read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        identity, sep, hexkey = line.rpartition(":")
        if not sep or not identity:
            raise ValueError(f"{path}:{lineno}: expected identity:hexkey")
        try:
            keys[identity] = bytes.fromhex(hexkey)
        except ValueError:
            raise ValueError(f"{path}:{lineno}: key of {identity!r} is not hex") from None
    if not keys:
        raise ValueError(f"{path}: no keys")
    return keys


def _new_context(protocol: int) -> NbdSSLContext:
    ctx = NbdSSLContext(protocol)
    ctx.server_hostname = None
    ctx.psk_identity = None
    ctx.psk_required = False
    ctx._keepalive = []
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2  # proto.md: TLS 1.2 or later "SHOULD" be used
    return ctx


def client_context(
    certificates_dir: PathLike | None = None,
    *,
    psk_file: PathLike | None = None,
    psk_identity: str | None = None,
    hostname: str | None = None,
    verify_peer: bool = True,
) -> NbdSSLContext:
    """A client context.  With `psk_file`, TLS-PSK with identity `psk_identity` (default: the login
    name, as libnbd does: uri.md "it SHOULD default to a local operating system credential", URI-014);
    otherwise X.509, trusting
    `certificates_dir`/ca-cert.pem (or the system CAs without a directory) and presenting
    client-cert.pem/client-key.pem when they exist.  `hostname` is checked against the server
    certificate when given and `verify_peer` is on."""
    ctx = _new_context(ssl.PROTOCOL_TLS_CLIENT)
    if psk_file is not None:
        keys = read_psk_file(psk_file)
        identity = psk_identity if psk_identity is not None else _login_name()
        if identity not in keys:
            raise ValueError(f"{psk_file}: no key for PSK identity {identity!r} (has {', '.join(keys)})")
        # The PSK is the only credential: verify "certificates" against an empty trust store, so a
        # server that answers with a certificate instead of the PSK fails the handshake.
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_REQUIRED
        _set_psk_only(ctx)
        ctx.psk_identity = identity
        _set_psk_client(ctx, identity, keys[identity])
        return ctx
    if verify_peer:
        if certificates_dir is not None:
            ctx.load_verify_locations(cafile=os.path.join(certificates_dir, CA_CERT))
        else:
            ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
        ctx.check_hostname = hostname is not None
        ctx.verify_mode = ssl.CERT_REQUIRED
    else:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if certificates_dir is not None:
        cert = os.path.join(certificates_dir, CLIENT_CERT)
        key = os.path.join(certificates_dir, CLIENT_KEY)
        if os.path.exists(cert) and os.path.exists(key):
            ctx.load_cert_chain(cert, key)
    ctx.server_hostname = hostname
    return ctx


def server_context(
    certificates_dir: PathLike | None = None,
    *,
    psk_file: PathLike | None = None,
    verify_peer: bool = False,
) -> NbdSSLContext:
    """A server context: X.509 from `certificates_dir` (server-cert.pem, server-key.pem; with
    `verify_peer`, client certificates must chain to ca-cert.pem) or TLS-PSK from `psk_file`.

    With `psk_file` the server authenticates clients by PSK only, even if `certificates_dir` is given
    too: it loads no certificate, so a client without the PSK cannot fall back to a certificate
    handshake (the driver still calls `require_psk`).  `certificates_dir` and `verify_peer` are then
    unused."""
    if certificates_dir is None and psk_file is None:
        raise ValueError("server_context needs certificates_dir or psk_file")
    ctx = _new_context(ssl.PROTOCOL_TLS_SERVER)
    if psk_file is not None:
        _set_psk_only(ctx)
        _set_psk_server(ctx, read_psk_file(psk_file))
        return ctx
    assert certificates_dir is not None
    ctx.load_cert_chain(os.path.join(certificates_dir, SERVER_CERT), os.path.join(certificates_dir, SERVER_KEY))
    if verify_peer:
        ctx.load_verify_locations(cafile=os.path.join(certificates_dir, CA_CERT))
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def psk_used(tls: ssl.SSLSocket | ssl.SSLObject) -> bool:
    """Whether a finished handshake authenticated with the PSK and not with a certificate.

    TLS 1.3: the server accepts the client's external PSK in its pre_shared_key extension, which OpenSSL
    reports as a reused session; no certificate is exchanged then.  TLS 1.2: the negotiated suite is a
    PSK-authenticated one (RSA-PSK, which authenticates the server by certificate, is not)."""
    if tls.getpeercert(binary_form=True) is not None:
        return False
    version = tls.version()
    if version == "TLSv1.3":
        return bool(tls.session_reused)
    cipher = tls.cipher()
    if version != "TLSv1.2" or cipher is None:
        return False
    name = cipher[0]
    return "PSK" in name and not name.startswith("RSA-PSK")


def require_psk(tls: ssl.SSLSocket | ssl.SSLObject) -> None:
    """Raise PskAuthError unless the finished handshake of a PSK context used the PSK: a peer that
    completed a certificate handshake instead has not proven that it knows the key."""
    if psk_used(tls):
        return
    cipher = tls.cipher()
    raise PskAuthError(
        f"TLS-PSK required but the {tls.version()} session ({cipher[0] if cipher else '?'}) was not "
        "authenticated with the PSK (the peer lacks it or used a certificate)"
    )


def _login_name() -> str:
    try:
        return os.getlogin()
    except OSError:
        import pwd

        return pwd.getpwuid(os.getuid()).pw_name


# --- PSK -------------------------------------------------------------------------------------------


def _set_psk_only(ctx: NbdSSLContext) -> None:
    """Offer PSK suites only, on TLS 1.2 (cipher string) and TLS 1.3 (ciphersuites, via ctypes: the
    ssl module has no setter for them on any version)."""
    ctx.set_ciphers(_PSK_CIPHERS)
    ctx.psk_required = True
    try:
        ok = _libssl().SSL_CTX_set_ciphersuites(_ssl_ctx_ptr(ctx), _PSK_TLS13_SUITES.encode()) == 1
    except (OSError, AttributeError, RuntimeError):
        ok = False
    # On 3.13+ (native PSK, no ctypes needed otherwise) a libssl we cannot reach is tolerated: the
    # client's empty trust store and require_psk on both ends still refuse a certificate handshake.
    if not ok and not _NATIVE_PSK:
        raise RuntimeError("could not restrict the TLS 1.3 ciphersuites to PSK-capable ones")


def _set_psk_client(ctx: NbdSSLContext, identity: str, key: bytes) -> None:
    if _NATIVE_PSK:
        ctx.set_psk_client_callback(lambda _hint: (identity, key))  # type: ignore[attr-defined]
        return
    lib = _libssl()
    ident = identity.encode()

    def callback(_ssl: int, _hint: bytes | None, idbuf: int, maxid: int, pskbuf: int, maxpsk: int) -> int:
        # Never raise here: an exception in a ctypes callback is printed and the return value is lost.
        if len(ident) + 1 > maxid or len(key) > maxpsk:
            return 0
        ctypes.memmove(idbuf, ident + b"\0", len(ident) + 1)
        ctypes.memmove(pskbuf, key, len(key))
        return len(key)

    c_callback = _PSK_CLIENT_CB(callback)
    ctx._keepalive.append(c_callback)
    lib.SSL_CTX_set_psk_client_callback(_ssl_ctx_ptr(ctx), c_callback)
    _clear_session_id_context(lib, ctx)


def _set_psk_server(ctx: NbdSSLContext, keys: dict[str, bytes]) -> None:
    if _NATIVE_PSK:
        ctx.set_psk_server_callback(lambda identity: keys.get(identity or "", b""))  # type: ignore[attr-defined]
        return
    lib = _libssl()

    def callback(_ssl: int, identity: bytes | None, pskbuf: int, maxpsk: int) -> int:
        try:
            key = keys.get((identity or b"").decode("utf-8", "replace"))
        except Exception:  # pragma: no cover - defensive, see the client callback
            return 0
        if key is None or len(key) > maxpsk:
            return 0  # unknown identity: the handshake fails
        ctypes.memmove(pskbuf, key, len(key))
        return len(key)

    c_callback = _PSK_SERVER_CB(callback)
    ctx._keepalive.append(c_callback)
    lib.SSL_CTX_set_psk_server_callback(_ssl_ctx_ptr(ctx), c_callback)
    _clear_session_id_context(lib, ctx)


_PSK_CLIENT_CB = ctypes.CFUNCTYPE(
    ctypes.c_uint, ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p, ctypes.c_uint, ctypes.c_void_p, ctypes.c_uint
)
_PSK_SERVER_CB = ctypes.CFUNCTYPE(ctypes.c_uint, ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p, ctypes.c_uint)
_LIBSSL: ctypes.CDLL | None = None


def _ssl_ctx_ptr(ctx: ssl.SSLContext) -> int:
    """The SSL_CTX* of a CPython SSLContext: the first field after PyObject_HEAD (PySSLContext.ctx)."""
    pointer = ctypes.c_void_p.from_address(id(ctx) + object.__basicsize__).value
    if not pointer:
        raise RuntimeError("could not find the SSL_CTX behind ssl.SSLContext")
    return pointer


def _clear_session_id_context(lib: ctypes.CDLL, ctx: ssl.SSLContext) -> None:
    if lib.SSL_CTX_set_session_id_context(_ssl_ctx_ptr(ctx), b"", 0) != 1:
        raise RuntimeError("SSL_CTX_set_session_id_context failed")


def _libssl() -> ctypes.CDLL:
    """The libssl that the _ssl module already uses (scanning /proc/self/maps), so the SSL_CTX we poke
    belongs to the same library; a second copy of libssl would corrupt it."""
    global _LIBSSL
    if _LIBSSL is not None:
        return _LIBSSL
    path = None
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                name = line.rsplit(None, 1)[-1]
                if "/libssl.so" in name:
                    path = name
                    break
    except OSError:
        pass
    if path is None:
        # No guess with find_library: a libssl other than the one the _ssl module linked (a statically
        # linked OpenSSL) would write into a struct that is not its own.
        raise RuntimeError("the _ssl module's libssl is not a mapped shared library (statically linked "
                           "OpenSSL?): TLS-PSK through ctypes needs it; on Python >= 3.13 the native API is used")
    lib = ctypes.CDLL(path)
    lib.SSL_CTX_set_psk_client_callback.argtypes = [ctypes.c_void_p, _PSK_CLIENT_CB]
    lib.SSL_CTX_set_psk_client_callback.restype = None
    lib.SSL_CTX_set_psk_server_callback.argtypes = [ctypes.c_void_p, _PSK_SERVER_CB]
    lib.SSL_CTX_set_psk_server_callback.restype = None
    lib.SSL_CTX_set_session_id_context.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_uint]
    lib.SSL_CTX_set_session_id_context.restype = ctypes.c_int
    lib.SSL_CTX_set_ciphersuites.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    lib.SSL_CTX_set_ciphersuites.restype = ctypes.c_int
    _LIBSSL = lib
    return lib
