"""nbdref.uri: the spec's examples, every scheme, errors naming the bad part and the URI-* rule."""

from __future__ import annotations

import pytest
from nbdref.uri import DEFAULT_PORT, Uri, UriError, UriWarning, parse_uri


@pytest.mark.parametrize(
    ("uri", "export"),
    [  # the table in uri.md, "NBD URI export name" (URI-015)
        ("nbd://example.com/disk", "disk"),
        ("nbd+unix:///disk?socket=sock", "disk"),
        ("nbd://example.com/", ""),
        ("nbd://example.com", ""),
        ("nbd://example.com//disk", "/disk"),
        ("nbd://example.com/hello%20world", "hello world"),
        ("nbd://h/caf%C3%A9", "café"),
    ],
)
def test_export_name_examples(uri: str, export: str) -> None:
    assert parse_uri(uri).export_name == export


@pytest.mark.parametrize(
    ("uri", "transport", "tls"),
    [
        ("nbd://h/", "tcp", False),
        ("nbds://h/", "tcp", True),
        ("nbd+unix:///?socket=s", "unix", False),
        ("nbds+unix:///?socket=s", "unix", True),
        ("nbd+vsock://2/", "vsock", False),
        ("nbds+vsock://2:1234/", "vsock", True),
        ("NBD://h/", "tcp", False),  # RFC 3986 3.1: schemes are case-insensitive
    ],
)
def test_schemes(uri: str, transport: str, tls: bool) -> None:
    parsed = parse_uri(uri)
    assert (parsed.transport, parsed.tls_required) == (transport, tls)


def test_tcp_defaults_and_ports() -> None:
    assert parse_uri("nbd://example.com/x").port == DEFAULT_PORT == 10809  # URI-013
    assert parse_uri("nbd://example.com:1234/x").address() == ("example.com", 1234)
    assert parse_uri("nbd://example.com:/x").port == DEFAULT_PORT  # RFC 3986: empty port = default
    assert parse_uri("nbd:///x").address() == ("localhost", DEFAULT_PORT)


def test_ipv6_literals() -> None:  # URI-012
    assert parse_uri("nbd://[::1]:10810/e").address() == ("::1", 10810)
    assert parse_uri("nbd://[fe80::1%25eth0]/e").host == "fe80::1%eth0"
    with pytest.raises(UriError, match="URI-012") as info:
        parse_uri("nbd://::1/e")
    assert info.value.part == "host"
    with pytest.raises(UriError, match="URI-012"):
        parse_uri("nbd://[::1/e")
    with pytest.raises(UriError, match="URI-012"):
        parse_uri("nbd://[not-ipv6]/e")


def test_unix_socket_and_user() -> None:
    uri = parse_uri("nbds+unix://alice@/exp?socket=/s/q.sock&tls-psk-file=/s/psk/keys.psk")
    assert uri.address() == "/s/q.sock"
    assert (uri.user, uri.tls_user, uri.tls_psk_file, uri.export_name) == ("alice", "alice", "/s/psk/keys.psk", "exp")
    assert uri.warnings == ()  # a user alone in a Unix URI is what libnbd documents for PSK
    # URI-017: "%00" at the start of socket= is the abstract namespace
    assert parse_uri("nbd+unix:///?socket=%00/abstract").socket == "\0/abstract"


@pytest.mark.parametrize(("scheme", "req"), [("nbd+unix", "URI-004"), ("nbds+unix", "URI-006")])
def test_unix_needs_socket(scheme: str, req: str) -> None:
    with pytest.raises(UriError, match=req) as info:
        parse_uri(f"{scheme}:///exp")
    assert info.value.req_id == req and info.value.part == "query socket"


def test_tls_parameters() -> None:
    uri = parse_uri(
        "nbds://h/e?tls-certificates=/c&tls-hostname=localhost&tls-verify-peer=0&tls-type=x509&tls-username=bob"
    )
    assert uri.tls_certificates == "/c"
    assert uri.tls_hostname == "localhost"
    assert uri.tls_verify_peer is False
    assert uri.tls_type == "x509"
    assert uri.tls_user == "bob"
    assert parse_uri("nbds://h/e?tls-verify-peer=1").tls_verify_peer is True
    assert parse_uri("nbds://h/e").tls_verify_peer is None
    with pytest.raises(UriError, match="tls-verify-peer"):
        parse_uri("nbds://h/e?tls-verify-peer=maybe")
    with pytest.raises(UriError, match="tls-type"):
        parse_uri("nbds://h/e?tls-type=kerberos")


def test_unknown_query_is_diagnosed_not_fatal() -> None:  # URI-022
    uri = parse_uri("nbd://h/e?x-experimental=1&bogus=2")
    assert uri.extra == (("x-experimental", "1"), ("bogus", "2"))
    assert len(uri.warnings) == 2 and all("URI-022" in w for w in uri.warnings)
    with pytest.warns(UriWarning, match="bogus"):
        parse_uri("nbd://h/e?bogus=2", warn=True)


def test_authority_on_unix_is_diagnosed() -> None:  # URI-010
    assert any("URI-010" in w for w in parse_uri("nbd+unix://host/e?socket=s").warnings)


@pytest.mark.parametrize(
    ("uri", "part", "req"),
    [
        ("nbd://h/a b", "uri", "URI-001"),  # spaces must be percent-encoded
        ("nbd://h/%zz", "uri", "URI-001"),
        ("nbd://h/%ff", "path", "URI-001"),  # not UTF-8
        ("nbd://h/a%00b", "path", "URI-015"),  # export names may hold any character except NUL
        ("nbd://h:99999/", "port", "URI-001"),
        ("nbd://h:port/", "port", "URI-001"),
        ("http://h/", "scheme", "URI-002"),
        ("//h/e", "scheme", "URI-001"),
    ],
)
def test_errors_name_the_part(uri: str, part: str, req: str) -> None:
    with pytest.raises(UriError) as info:
        parse_uri(uri)
    assert (info.value.part, info.value.req_id) == (part, req)
    assert part in str(info.value)


def test_vsock_parses_but_cannot_connect() -> None:
    uri = parse_uri("nbd+vsock://3/e")
    assert (uri.host, uri.port) == ("3", DEFAULT_PORT)
    with pytest.raises(NotImplementedError, match="vsock"):
        uri.address()


@pytest.mark.parametrize(
    "uri",
    [
        "nbd://example.com/disk",
        "nbd://example.com//disk",
        "nbd://example.com/hello%20world",
        "nbds://alice@[::1]:1234/e%3Fq?tls-psk-file=/k&tls-verify-peer=0",
        "nbds+unix:///e?socket=/tmp/a%26b.sock&tls-certificates=/c&tls-hostname=localhost",
        "nbd+unix:///?socket=%00abs&x-foo=a%3Db",
    ],
)
def test_to_string_round_trips(uri: str) -> None:
    parsed = parse_uri(uri)
    assert isinstance(parsed, Uri)
    assert parse_uri(parsed.to_string()) == parsed


def test_percent_encoded_reg_name_is_decoded() -> None:
    # RFC 3986 section 3.2.2: reg-name = *( unreserved / pct-encoded / sub-delims )
    u = parse_uri("nbd://ex%61mple.com:10810/disk")
    assert (u.host, u.port, u.export_name) == ("example.com", 10810, "disk")
    u = parse_uri("nbd://my%20host/disk")
    assert u.host == "my host"
    assert parse_uri(u.to_string()) == u
    with pytest.raises(UriError):
        parse_uri("nbd://bad%2/disk")
    with pytest.raises(UriError):
        parse_uri("nbd://b%ffd/disk")  # not UTF-8
