"""NBD URIs (uri.md, the NBD URI specification): parse into a frozen `Uri`, print back with `Uri.to_string()`.

The parser is strict where the URI spec says MUST (each error names the bad part and the URI-* id of
the rule it enforces) and lenient where it says SHOULD: unknown query parameters are kept in
`Uri.extra` and reported in `Uri.warnings` (URI-022: "Any other query parameters which the client does
not understand SHOULD be diagnosed by the parser") instead of failing.

Known schemes are those of the spec plus libnbd's vsock pair, which parse but cannot be connected to by
this harness (`Uri.transport == "vsock"`).
"""

from __future__ import annotations

import re
import warnings as _warnings
from dataclasses import dataclass, field
from urllib.parse import quote, unquote_to_bytes

__all__ = ["DEFAULT_PORT", "SCHEMES", "Uri", "UriError", "UriWarning", "parse_uri"]

# "If the port field is not present then it MUST default to the NBD port number assigned by IANA
# (10809)."  (URI-013)
DEFAULT_PORT = 10809

# scheme -> (transport, tls required)
SCHEMES: dict[str, tuple[str, bool]] = {
    "nbd": ("tcp", False),
    "nbds": ("tcp", True),
    "nbd+unix": ("unix", False),
    "nbds+unix": ("unix", True),
    "nbd+vsock": ("vsock", False),
    "nbds+vsock": ("vsock", True),
}

# Query keys this parser understands.  tls-type comes from uri.md; the others from libnbd's
# nbd_connect_uri (tls-certificates, tls-psk-file, tls-username); socket and tls-* from uri.md.
KNOWN_QUERY_KEYS = frozenset(
    {"socket", "tls-certificates", "tls-psk-file", "tls-hostname", "tls-verify-peer", "tls-type", "tls-username"}
)
TLS_TYPES = frozenset({"anon", "x509", "psk"})

# RFC 3986 section 3.1: scheme = ALPHA *( ALPHA / DIGIT / "+" / "-" / "." )
_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")
# Characters allowed anywhere in a URI (RFC 3986 section 2: unreserved, reserved, and '%' for escapes).
_URI_CHARS_RE = re.compile(r"^[A-Za-z0-9\-._~:/?#\[\]@!$&'()*+,;=%]*$")
_BAD_ESCAPE_RE = re.compile(r"%(?![0-9A-Fa-f]{2})")
# RFC 3986 section 3.2.2: "reg-name = *( unreserved / pct-encoded / sub-delims )" (IPv4address is a
# reg-name too); the host is percent-decoded after this check.
_REG_NAME_RE = re.compile(r"^(?:[A-Za-z0-9\-._~!$&'()*+,;=]|%[0-9A-Fa-f]{2})*$")


class UriError(ValueError):
    """A URI that breaks a MUST of uri.md or RFC 3986.  `part` names the bad component, `req_id` the rule."""

    def __init__(self, message: str, *, part: str, req_id: str | None = None, uri: str = "") -> None:
        self.part = part
        self.req_id = req_id
        self.uri = uri
        rule = f" [{req_id}]" if req_id else ""
        super().__init__(f"invalid NBD URI {uri!r}: {part}: {message}{rule}")


class UriWarning(UserWarning):
    """Something a SHOULD of uri.md advises against (unknown query key, authority on a Unix URI...)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Uri:
    """A parsed NBD URI.  Absent query parameters are None; `port` is filled in for TCP (URI-013)."""

    scheme: str
    export_name: str = ""
    user: str | None = None
    host: str | None = None
    port: int | None = None
    socket: str | None = None
    tls_certificates: str | None = None
    tls_psk_file: str | None = None
    tls_hostname: str | None = None
    tls_verify_peer: bool | None = None
    tls_type: str | None = None
    tls_username: str | None = None
    extra: tuple[tuple[str, str], ...] = ()
    warnings: tuple[str, ...] = field(default=(), compare=False)

    @property
    def transport(self) -> str:
        """"tcp", "unix" or "vsock"."""
        return SCHEMES[self.scheme][0]

    @property
    def tls_required(self) -> bool:
        """True for nbds / nbds+unix: "If encryption cannot be negotiated then the connection MUST fail"."""
        return SCHEMES[self.scheme][1]

    @property
    def tls_user(self) -> str | None:
        """The PSK identity: the URI's userinfo, else a tls-username= parameter."""
        return self.user if self.user is not None else self.tls_username

    def address(self) -> str | tuple[str, int]:
        """What socket.connect takes: a path (Unix; leading NUL = abstract namespace) or (host, port)."""
        if self.transport == "unix":
            assert self.socket is not None
            return self.socket
        if self.transport == "vsock":
            raise NotImplementedError(f"{self.scheme}: vsock transport is parsed but not supported for connecting")
        assert self.host is not None and self.port is not None
        return (self.host, self.port)

    def to_string(self) -> str:
        """Print back a URI that `parse_uri` maps to an equal `Uri` (percent-encoding what needs it)."""
        authority = ""
        if self.user is not None:
            authority += quote(self.user, safe="!$&'()*+,;=") + "@"
        if self.host is not None:
            authority += f"[{self.host}]" if ":" in self.host else quote(self.host, safe="!$&'()*+,;=")
        if self.port is not None and self.port != DEFAULT_PORT:
            authority += f":{self.port}"
        # The path is "/" + export name; quote everything but the path-safe characters, including '/'
        # so "//disk" round-trips to the export "/disk".
        path = "/" + quote(self.export_name, safe="/!$&'()*+,;=:@") if self.export_name else ""
        params: list[tuple[str, str]] = []
        for key, value in (
            ("socket", self.socket),
            ("tls-certificates", self.tls_certificates),
            ("tls-psk-file", self.tls_psk_file),
            ("tls-hostname", self.tls_hostname),
            ("tls-type", self.tls_type),
            ("tls-username", self.tls_username),
        ):
            if value is not None:
                params.append((key, value))
        if self.tls_verify_peer is not None:
            params.append(("tls-verify-peer", "1" if self.tls_verify_peer else "0"))
        params.extend(self.extra)
        query = "&".join(f"{_q(k)}={_q(v)}" for k, v in params)
        if not path and query:
            path = "/"
        return f"{self.scheme}://{authority}{path}" + (f"?{query}" if query else "")


def _q(text: str) -> str:
    return quote(text, safe="/!$'()*+,;:@")


def _decode(text: str, *, part: str, uri: str) -> str:
    """Percent-decode as UTF-8 (RFC 3986 section 2.5: "the data should first be encoded as octets
    according to the UTF-8 character encoding")."""
    try:
        return unquote_to_bytes(text).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UriError(f"percent-encoded bytes are not UTF-8 ({exc.reason})", part=part, req_id="URI-001", uri=uri) from None


def _parse_bool(value: str, *, key: str, uri: str) -> bool:
    lowered = value.lower()
    if lowered in ("1", "true", "on", "yes"):
        return True
    if lowered in ("0", "false", "off", "no"):
        return False
    # uri.md: "This optional parameter may be 0 or 1"
    raise UriError(f"{value!r} is not a boolean (use 0 or 1)", part=f"query {key}", req_id="URI-018", uri=uri)


def parse_uri(uri: str, *, warn: bool = False) -> Uri:
    """Parse an NBD URI.  Raises `UriError` naming the bad part; with `warn=True` SHOULD-level
    diagnostics are also emitted as `UriWarning` (they are always in `Uri.warnings`)."""
    notes: list[str] = []

    # "All NBD URIs MUST also be valid URIs as described in RFC 3986" (URI-001)
    if not _URI_CHARS_RE.match(uri):
        bad = next(ch for ch in uri if not _URI_CHARS_RE.match(ch))
        raise UriError(f"character {bad!r} must be percent-encoded", part="uri", req_id="URI-001", uri=uri)
    if _BAD_ESCAPE_RE.search(uri):
        raise UriError("'%' not followed by two hex digits", part="uri", req_id="URI-001", uri=uri)
    match = _SCHEME_RE.match(uri)
    if not match:
        raise UriError("missing scheme (expected nbd://, nbds://, nbd+unix://...)", part="scheme", req_id="URI-001", uri=uri)
    scheme = match.group(1).lower()  # RFC 3986 section 3.1: schemes are case-insensitive
    if scheme not in SCHEMES:
        # "One of the following scheme names SHOULD be used" (URI-002); others "MAY be used but not all NBD
        # clients will understand them" (URI-007): this one does not.
        raise UriError(f"unknown scheme {scheme!r}; known: {', '.join(SCHEMES)}", part="scheme", req_id="URI-002", uri=uri)
    transport, _tls = SCHEMES[scheme]
    rest = uri[match.end() :]
    if "#" in rest:
        rest, fragment = rest.split("#", 1)
        if fragment:
            notes.append(f"fragment #{fragment} ignored")
    query = ""
    if "?" in rest:
        rest, query = rest.split("?", 1)

    authority: str | None = None
    if rest.startswith("//"):
        slash = rest.find("/", 2)
        authority, path = (rest[2:], "") if slash < 0 else (rest[2:slash], rest[slash:])
    else:
        path = rest
        if path and transport == "tcp":
            # "The authority field SHOULD be used for TCP/IP connections" (URI-009)
            notes.append("URI-009: no authority (//host) in a TCP URI; connecting to localhost")

    user = host = None
    port: int | None = None
    if authority:
        # "The authority field ... SHOULD NOT be used for Unix domain socket connections" (URI-010)
        # libnbd accepts a user here for PSK (nbds+unix://alice@/...), so only a host/port is noted.
        if transport == "unix" and authority.rsplit("@", 1)[-1]:
            notes.append(f"URI-010: authority {authority!r} in a Unix-socket URI is ignored except the user")
        if "@" in authority:
            userinfo, hostport = authority.rsplit("@", 1)
            user = _decode(userinfo, part="userinfo", uri=uri)
        else:
            hostport = authority
        host, port = _split_hostport(hostport, uri=uri)
    if transport == "unix":
        host, port = None, None
    elif transport == "tcp":
        host = host or "localhost"
        port = DEFAULT_PORT if port is None else port  # URI-013
    elif transport == "vsock":
        if not host:
            raise UriError("vsock URIs need a CID as host", part="host", uri=uri)
        if not host.isdigit():
            raise UriError(f"vsock CID {host!r} is not a number", part="host", uri=uri)
        port = DEFAULT_PORT if port is None else port

    # "the path part of the URI except for the leading / character MUST be passed to the server as the
    # export name" (URI-015)
    if path and not path.startswith("/"):
        raise UriError("path must start with '/'", part="path", req_id="URI-015", uri=uri)
    export_name = _decode(path[1:], part="path", uri=uri)
    if "\0" in export_name:
        # "they may contain any Unicode character except NUL"
        raise UriError("export name contains NUL (%00)", part="path", req_id="URI-015", uri=uri)

    fields: dict[str, str] = {}
    extra: list[tuple[str, str]] = []
    for item in query.split("&") if query else ():
        if not item:
            continue
        raw_key, _, raw_value = item.partition("=")
        key = _decode(raw_key, part="query", uri=uri)
        value = _decode(raw_value, part=f"query {key}", uri=uri)
        if key in KNOWN_QUERY_KEYS:
            if key in fields:
                raise UriError(f"{key} given twice", part=f"query {key}", uri=uri)
            fields[key] = value
        else:
            # "Any other query parameters which the client does not understand SHOULD be diagnosed by the
            # parser." (URI-022)
            extra.append((key, value))
            notes.append(f"URI-022: unknown query parameter {key!r} ignored")

    socket_path = fields.get("socket")
    if transport == "unix":
        if not socket_path:
            # "The query parameters MUST include a parameter called socket" (URI-004 nbd+unix, URI-006 nbds+unix)
            req = "URI-006" if scheme == "nbds+unix" else "URI-004"
            raise UriError(f"{scheme} needs a socket= query parameter", part="query socket", req_id=req, uri=uri)
    elif socket_path is not None:
        notes.append(f"socket= ignored for {scheme}")
    tls_type = fields.get("tls-type")
    if tls_type is not None and tls_type not in TLS_TYPES:
        raise UriError(f"tls-type {tls_type!r} not one of {sorted(TLS_TYPES)}", part="query tls-type", req_id="URI-018", uri=uri)
    verify = fields.get("tls-verify-peer")

    result = Uri(
        scheme=scheme,
        export_name=export_name,
        user=user,
        host=host,
        port=port,
        socket=socket_path if transport == "unix" else None,
        tls_certificates=fields.get("tls-certificates"),
        tls_psk_file=fields.get("tls-psk-file"),
        tls_hostname=fields.get("tls-hostname"),
        tls_verify_peer=None if verify is None else _parse_bool(verify, key="tls-verify-peer", uri=uri),
        tls_type=tls_type,
        tls_username=fields.get("tls-username"),
        extra=tuple(extra),
        warnings=tuple(notes),
    )
    if warn:
        for note in notes:
            _warnings.warn(f"{uri}: {note}", UriWarning, stacklevel=2)
    return result


def _split_hostport(hostport: str, *, uri: str) -> tuple[str | None, int | None]:
    """RFC 3986 host [":" port], with IPv6 literals in brackets (RFC 2732, URI-012)."""
    port_text = None
    if hostport.startswith("["):
        end = hostport.find("]")
        if end < 0:
            raise UriError("unterminated '[' in IPv6 literal", part="host", req_id="URI-012", uri=uri)
        host = hostport[1:end]
        after = hostport[end + 1 :]
        if after:
            if not after.startswith(":"):
                raise UriError(f"unexpected {after!r} after IPv6 literal", part="host", req_id="URI-012", uri=uri)
            port_text = after[1:]
        _check_ipv6(host, uri=uri)
        host = _decode(host, part="host", uri=uri)
    else:
        if "[" in hostport or "]" in hostport:
            raise UriError("brackets are only allowed around an IPv6 literal", part="host", req_id="URI-012", uri=uri)
        host, sep, port_text_ = hostport.rpartition(":")
        if not sep:
            host, port_text_ = hostport, None
        elif ":" in host:
            # "Literal IPv6 addresses MUST be formatted in the way specified by RFC 2732" (URI-012)
            raise UriError("IPv6 literal must be in brackets, e.g. nbd://[::1]:10809/", part="host", req_id="URI-012", uri=uri)
        port_text = port_text_
        if not _REG_NAME_RE.match(host):
            raise UriError(f"invalid host {host!r}", part="host", req_id="URI-001", uri=uri)
        host = _decode(host, part="host", uri=uri)
    port = None
    if port_text:  # RFC 3986: "port = *DIGIT"; an empty port means the default
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise UriError(f"port {port_text!r} is not a number in 1..65535", part="port", req_id="URI-001", uri=uri)
        port = int(port_text)
    return (host or None), port


def _check_ipv6(host: str, *, uri: str) -> None:
    import ipaddress

    address = host.split("%25", 1)[0]  # RFC 6874 zone id
    try:
        ipaddress.IPv6Address(address)
    except ValueError:
        raise UriError(f"{host!r} is not an IPv6 address", part="host", req_id="URI-012", uri=uri) from None
