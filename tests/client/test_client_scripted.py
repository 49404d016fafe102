"""Client behaviours only a scripted server can show: fallbacks, out-of-order replies, split reads,
errors, timeouts, abstract and IPv6 sockets, oldstyle."""

from __future__ import annotations

import errno
import socket
import uuid

import pytest
from nbdref import ClientFlag, Opt
from nbdref.client import Client, ClientError
from nbdref.uri import UriWarning

from tests.client.scripted_server import Script, ScriptedServer, pair
from tests.helpers.servers import start_nbdkit


def client_for(script: Script, **settings: object) -> tuple[Client, ScriptedServer]:
    sock, server = pair(script)
    client = Client(timeout=5)
    for name, value in settings.items():
        getattr(client, f"set_{name}")(value)
    client.connect_socket(sock)
    return client, server


def finish(client: Client, server: ScriptedServer) -> None:
    client.close()
    server.join()
    assert server.error is None, server.error


def sent_options(script: Script) -> list[int]:
    return [e.option for e in script.seen if hasattr(e, "option") and type(e).__name__.startswith("Opt")]


def test_go_unsupported_falls_back_to_export_name() -> None:
    script = Script(unsupported=frozenset({Opt.GO, Opt.EXTENDED_HEADERS}))
    client, server = client_for(script, export_name="disk")
    assert client.get_size() == script.size
    assert client.pread(512, 0) == b"\x01" * 512
    finish(client, server)
    assert sent_options(script) == [Opt.EXTENDED_HEADERS, Opt.STRUCTURED_REPLY, Opt.GO, Opt.EXPORT_NAME]
    assert client.violations == []


def test_defaults_request_extended_then_structured_and_meta_only_when_added() -> None:
    script = Script()
    client, server = client_for(script)
    finish(client, server)
    assert sent_options(script) == [Opt.EXTENDED_HEADERS, Opt.STRUCTURED_REPLY, Opt.GO]
    script = Script()
    client, server = client_for(script, request_extended_headers=False, request_structured_replies=False)
    assert not client.get_structured_replies_negotiated()
    finish(client, server)
    assert sent_options(script) == [Opt.GO]
    script = Script()
    sock, server = pair(script)
    client = Client(timeout=5)
    client.add_meta_context("base:allocation")
    client.connect_socket(sock)
    assert client.can_meta_context("base:allocation")
    finish(client, server)
    assert sent_options(script) == [Opt.EXTENDED_HEADERS, Opt.STRUCTURED_REPLY, Opt.SET_META_CONTEXT, Opt.GO]


def test_replies_out_of_order_are_matched_by_cookie() -> None:
    script = Script(reverse_batch=4)
    client, server = client_for(script)
    patterns = [bytes([i + 1]) * 4096 for i in range(4)]
    for i, pattern in enumerate(patterns):
        client.pwrite(pattern, 4096 * i)
    buffers = [bytearray(4096) for _ in patterns]
    cookies = [client.aio_pread(buf, 4096 * i) for i, buf in enumerate(buffers)]
    client.wait(cookies[0])  # answered last: the other three complete on the way
    assert client.aio_in_flight() == 0
    assert buffers == patterns
    for cookie in cookies[1:]:
        assert client.aio_command_completed(cookie)
    # the server really answered in reverse order
    reads = [e.event.cookie for e in client.transcript if e.kind == "OffsetData" and e.direction == "S"]
    assert reads == cookies[::-1]
    assert client.violations == []
    finish(client, server)


def test_split_read_chunks_land_in_place() -> None:
    script = Script(split_reads=True)
    client, server = client_for(script)
    client.pwrite(b"\xff" * 8192, 0)
    data = client.pread(8192, 0)
    # first quarter data, second quarter a hole (zeroes), second half data
    assert data == b"\xff" * 2048 + bytes(2048) + b"\xff" * 4096
    assert client.violations == []
    finish(client, server)


@pytest.mark.parametrize("structured", [True, False], ids=["error-chunk", "simple-error"])
def test_read_error_is_reported_with_errno(structured: bool) -> None:
    script = Script(fail_offset=65536)
    client, server = client_for(script, request_structured_replies=structured)
    with pytest.raises(ClientError) as info:
        client.pread(4096, 65536)
    assert info.value.errno == errno.EIO
    assert client.pread(512, 0) == b"\x01" * 512  # still usable
    finish(client, server)


def test_block_status_flat_entries() -> None:
    script = Script(extents=((4096, 0), (8192, 3)))
    sock, server = pair(script)
    client = Client(timeout=5)
    client.add_meta_context("base:allocation")
    client.connect_socket(sock)
    calls = []
    client.block_status(12288, 0, lambda *args: calls.append(args))
    assert calls == [("base:allocation", 0, [4096, 0, 8192, 3], 0)]
    finish(client, server)


def test_oldstyle() -> None:
    client, server = client_for(Script(oldstyle=True))
    assert client.get_protocol() == "oldstyle"
    assert client.pread(512, 0) == b"\x01" * 512
    with pytest.raises(ClientError, match="option phase"):
        client.opt_list()
    finish(client, server)


def test_oldstyle_nbdkit(tmp_path_factory: pytest.TempPathFactory) -> None:
    workdir = tmp_path_factory.mktemp("o")
    with start_nbdkit("memory", "1M", workdir=workdir, extra_args=("--oldstyle",)) as srv, Client(timeout=5) as c:
        c.connect_uri(srv.uri)
        assert c.get_protocol() == "oldstyle"
        assert c.get_size() == 1 << 20
        assert c.violations == []


def test_timeout_applies_to_every_receive() -> None:
    a, b = socket.socketpair()
    client = Client(timeout=0.2)
    try:
        with pytest.raises(TimeoutError):
            client.connect_socket(a)  # the peer never greets
    finally:
        client.close()
        b.close()


def test_abstract_unix_socket_uri() -> None:
    # uri.md: "the socket parameter MAY begin with an ASCII NUL character" (URI-017)
    name = f"\0nbdref-test-{uuid.uuid4().hex}"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(name)
    listener.listen(1)
    server = ScriptedServer(listener, listening=True)
    with Client(timeout=5) as client, pytest.warns(UriWarning, match="URI-022.*x-unknown"):
        client.connect_uri(f"nbd+unix:///?socket=%00{name[1:]}&x-unknown=1")
        assert client.pread(512, 0) == b"\x01" * 512
    server.join()
    assert server.error is None


def test_ipv6_literal_uri() -> None:
    # uri.md: literal IPv6 addresses "MUST be formatted in the way specified by RFC 2732" (URI-012)
    try:
        listener = socket.create_server(("::1", 0), family=socket.AF_INET6)
    except OSError:
        pytest.skip("no IPv6 loopback here")
    port = listener.getsockname()[1]
    server = ScriptedServer(listener, listening=True)
    with Client(timeout=5) as client:
        client.connect_uri(f"nbd://[::1]:{port}/")
        assert client.get_size() == 1 << 20
    server.join()
    assert server.error is None


def test_commands_need_transmission() -> None:
    client, server = client_for(Script(), opt_mode=True)
    with pytest.raises(ClientError, match="transmission"):
        client.pread(512, 0)
    client.opt_go()
    assert client.pread(512, 0) == b"\x01" * 512
    finish(client, server)


def test_handshake_flags_without_no_zeroes() -> None:
    # Without NO_ZEROES the NBD_OPT_EXPORT_NAME reply carries 124 zero bytes; the next reply must still
    # parse, so a READ after the fallback proves they were consumed.
    script = Script(unsupported=frozenset({Opt.GO, Opt.EXTENDED_HEADERS}))
    client, server = client_for(script, handshake_flags=ClientFlag.FIXED_NEWSTYLE)
    assert client.connection is not None
    assert client.connection.handshake_flags & ClientFlag.NO_ZEROES  # the server offered it ...
    assert client.get_handshake_flags() == ClientFlag.FIXED_NEWSTYLE  # ... we did not take it
    assert not client.connection.no_zeroes
    assert client.pread(512, 0) == b"\x01" * 512
    finish(client, server)
    assert script.seen[0].flags == ClientFlag.FIXED_NEWSTYLE


def test_extended_headers_when_the_server_accepts_them() -> None:
    # No host server here has extended headers (qemu 10 / nbdkit 1.40 do); the scripted one ACKs them.
    script = Script(unsupported=frozenset(), split_reads=True, extents=((4096, 0), (1 << 33, 3)))
    sock, server = pair(script)
    client = Client(timeout=5)
    client.add_meta_context("base:allocation")
    client.connect_socket(sock)
    assert client.get_extended_headers_negotiated() and client.get_structured_replies_negotiated()
    client.pwrite(b"\xee" * 8192, 0)
    assert client.pread(8192, 0) == b"\xee" * 2048 + bytes(2048) + b"\xee" * 4096
    calls = []
    client.block_status(8192, 0, lambda *args: calls.append(args))
    # 64-bit extent lengths survive (NBD_REPLY_TYPE_BLOCK_STATUS_EXT)
    assert calls == [("base:allocation", 0, [4096, 0, 1 << 33, 3], 0)]
    assert sent_options(script) == [Opt.EXTENDED_HEADERS, Opt.SET_META_CONTEXT, Opt.GO]
    finish(client, server)
