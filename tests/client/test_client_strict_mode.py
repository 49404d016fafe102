"""`Client.set_strict_mode(Strict...)`: libnbd's strict flags, one test per flag against the in-process
reference server.

With a flag set (the default: `Strict.ALL`) the client refuses the request before sending it: a
`LocalProtocolError` naming the requirement, nothing in the client's transcript, nothing reaching the
server.  With the flag cleared the same request goes on the wire: the server's transcript shows it
arrived, and the server's answer (an error, or success) comes back.
"""

from __future__ import annotations

import errno
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from nbdref import CmdFlag, LocalProtocolError, Strictness, personas, requirements
from nbdref.client import STRICT_IDS, Client, ClientError, Strict, strict_flags, strictness_for
from nbdref.server import Export, Server

SIZE = 1 << 20


@pytest.fixture
def serve(workdir: Path) -> Iterator[Callable[..., Server]]:
    """``serve(export=None, **Server kwargs)`` -> a started in-process server, stopped at teardown."""
    servers: list[Server] = []

    def start(export: Export | None = None, **kw: object) -> Server:
        kw.setdefault("unix", str(workdir / f"s{len(servers)}.sock"))
        server = Server([export or Export.memory("exp", SIZE)], **kw).start()  # type: ignore[arg-type]
        servers.append(server)
        return server

    yield start
    for s in servers:
        s.stop()


def client(server: Server, flags: Strict | int | None = None) -> Client:
    c = Client(timeout=10)
    if flags is not None:
        c.set_strict_mode(flags)
    c.connect_uri(server.uri)
    return c


def received(server: Server, command: str) -> list[str]:
    """The requests named ``command`` the server's core decoded (its transcript, after the client left)."""
    assert server.wait_closed(10)
    return [line for record in server.records for line in record.transcript.lines()
            if line.startswith(f"C: {command} ")]


def refused_locally(c: Client, req_id: str, call: Callable[[], object]) -> None:
    """``call`` raises LocalProtocolError for ``req_id`` and puts nothing on the wire."""
    before = len(c.transcript)
    with pytest.raises(LocalProtocolError) as info:
        call()
    assert info.value.violation is not None and info.value.violation.req_id == req_id, info.value
    assert len(c.transcript) == before
    c.close()


def sent(c: Client, call: Callable[[], object], error: int | None) -> None:
    """``call`` goes to the server, which answers ``error`` (None: success)."""
    if error is None:
        call()
    else:
        with pytest.raises(ClientError) as info:
            call()
        assert info.value.errno == error
    assert c.pread(512, 0) == bytes(512)  # the connection goes on
    c.close()


def without(flag: Strict) -> Strict:
    return Strict.ALL & ~flag


# ---------------------------------------------------------------------------- the flags themselves


def test_flag_values_are_libnbds() -> None:
    # libnbd's generator/API.ml (strict_flags) and libnbd.h: LIBNBD_STRICT_COMMANDS 0x01 ... PAYLOAD 0x20.
    assert {f.name: f.value for f in Strict if f is not Strict.ALL} == {
        "COMMANDS": 0x01, "FLAGS": 0x02, "BOUNDS": 0x04, "ZERO_SIZE": 0x08, "ALIGN": 0x10, "PAYLOAD": 0x20,
        "AUTO_FLAG": 0x40}
    assert Strict.ALL == 0x3F


def test_default_is_every_flag_and_get_returns_what_was_set(serve) -> None:
    assert Client().get_strict_mode() == Strict.ALL
    assert isinstance(Client().get_strict_mode(), Strict)
    for flags in (Strict.BOUNDS, Strict.ALIGN | Strict.PAYLOAD, without(Strict.ZERO_SIZE), Strict.ALL):
        c = Client()
        c.set_strict_mode(flags)
        assert c.get_strict_mode() == flags
        c.set_strict_mode(int(flags))  # a plain int of known flags, libnbd style
        assert c.get_strict_mode() == flags


def test_zero_is_lenient() -> None:
    # libnbd: 0 clears every strict flag; here it keeps its old meaning too (nothing refused, the server's
    # violations recorded, not raised).
    c = Client()
    c.set_strict_mode(0)
    assert c.get_strict_mode() == Strict(0)
    assert c.get_strictness() == Strictness.lenient()


def test_auto_flag_is_accepted_as_libnbd_1_20_default() -> None:
    """libnbd >= 1.20's default mask includes AUTO_FLAG (0x40): accepted, and it changes nothing here
    (the client always sets PAYLOAD_LEN exactly when extended headers need it)."""
    c = Client()
    c.set_strict_mode(0x7F)
    assert c.get_strict_mode() == Strict.ALL


def test_payload_limit_is_the_advertised_maximum_not_2_25() -> None:
    """As libnbd: with a maximum advertised, the payload limit is that maximum (up to 64 MiB); 2^25 only
    when none was sent (BSZ-008 applies only then)."""
    c = Client()
    c._info["block_size"] = (1, 4096, 64 << 20)
    assert c.get_block_size("payload") == 64 << 20
    c._info["block_size"] = (1, 4096, 128 << 20)
    assert c.get_block_size("payload") == 64 << 20
    del c._info["block_size"]
    assert c.get_block_size("payload") == 32 << 20


@pytest.mark.parametrize("bad", [0x80, 0xFF, 1 << 31, -1])
def test_unknown_bits_are_refused_naming_the_flags(bad: int) -> None:
    c = Client()
    with pytest.raises(ValueError, match=r"COMMANDS=0x1.*PAYLOAD=0x20"):
        c.set_strict_mode(bad)
    assert c.get_strict_mode() == Strict.ALL  # unchanged


@pytest.mark.parametrize("bad", [True, "all", 1.0])
def test_other_types_are_refused(bad: object) -> None:
    with pytest.raises(TypeError, match="Strict flags"):
        Client().set_strict_mode(bad)  # type: ignore[arg-type]


def test_a_strictness_is_still_accepted_and_reported_as_flags() -> None:
    c = Client()
    c.set_strict_mode(Strictness(disabled=frozenset({"BSZ-031", "BSZ-033"}), refuse=STRICT_IDS[Strict.ZERO_SIZE]))
    assert c.get_strict_mode() == Strict.ZERO_SIZE  # the other flags have SHOULD-level ids only noted
    assert strict_flags(Strictness.lenient()) == Strict(0)


def test_each_flag_switches_exactly_its_ids() -> None:
    ids = [i for group in STRICT_IDS.values() for i in group]
    assert len(ids) == len(set(ids)), "a requirement belongs to one flag"
    assert set(STRICT_IDS) == {f for f in Strict if f not in (Strict.ALL, Strict.AUTO_FLAG)}
    for req_id in ids:
        assert requirements.binds(req_id) in ("client", "both"), req_id
    for flag, own in STRICT_IDS.items():
        s = strictness_for(without(flag))
        assert s.disabled == own
        assert s.refuse == frozenset(ids) - own
        assert s.fatal_levels == Strictness().fatal_levels and s.check_local


# ---------------------------------------------------------------------------- one test per flag
# Each: the request with the flag set (refused, nothing sent), then with only that flag cleared (sent).


def test_commands(serve) -> None:
    # "The client MUST NOT use a flag-exposed feature (... CACHE ...) unless its flag was set" (CMD-008).
    s = serve(persona=personas.with_changes(personas.get(personas.DEFAULT), cache=False))
    c = client(s)
    assert not c.can_cache()
    refused_locally(c, "CMD-008", lambda: c.cache(4096, 0))
    assert received(s, "NBD_CMD_CACHE") == []
    c = client(s, without(Strict.COMMANDS))
    sent(c, lambda: c.cache(4096, 0), errno.EINVAL)  # the server refuses what it did not advertise
    assert len(received(s, "NBD_CMD_CACHE")) == 1


def test_flags(serve) -> None:
    # "Clients MUST NOT set a command flag ... not documented for that command" (CMD-014): NO_HOLE on READ.
    s = serve()
    c = client(s)
    refused_locally(c, "CMD-014", lambda: c.pread(512, 0, CmdFlag.NO_HOLE))
    assert received(s, "NBD_CMD_READ") == []
    c = client(s, without(Strict.FLAGS))
    sent(c, lambda: c.pread(512, 0, CmdFlag.NO_HOLE), errno.EINVAL)  # "A flag not documented" (ERR-010)
    assert any("NO_HOLE" in line for line in received(s, "NBD_CMD_READ"))


def test_bounds(serve) -> None:
    # "The client MUST NOT send a request whose offset plus length exceeds the export size" (BSZ-033).
    s = serve()
    c = client(s)
    refused_locally(c, "BSZ-033", lambda: c.pread(512, SIZE))
    assert received(s, "NBD_CMD_READ") == []
    c = client(s, without(Strict.BOUNDS))
    sent(c, lambda: c.pread(512, SIZE), errno.EINVAL)  # a READ past the end: NBD_EINVAL (ERR-003)
    assert any(f"offset={SIZE}" in line.split() for line in received(s, "NBD_CMD_READ"))


def test_zero_size(serve) -> None:
    # "The client SHOULD NOT send a zero-length WRITE_ZEROES" (WZ-010): a SHOULD NOT, refused all the same
    # while ZERO_SIZE is set (libnbd: "rejects client requests with length 0").
    s = serve()
    c = client(s)
    refused_locally(c, "WZ-010", lambda: c.zero(0, 4096))
    assert received(s, "NBD_CMD_WRITE_ZEROES") == []
    c = client(s, without(Strict.ZERO_SIZE))
    sent(c, lambda: c.zero(0, 4096), None)  # the reference server accepts it
    assert any("length=0" in line.split() for line in received(s, "NBD_CMD_WRITE_ZEROES"))
    assert "WZ-010" not in str(c.transcript)  # not even noted: the check is off


def test_align(serve) -> None:
    # "For requests with offset/length, the client MUST use multiples of any advertised minimum block
    # size" (BSZ-031); the server advertised 512 (NBD_INFO_BLOCK_SIZE, requested with GO).
    s = serve(Export.memory("exp", SIZE, block_size=(512, 4096, 1 << 20)))
    c = client(s)
    assert c.get_block_size("minimum") == 512
    refused_locally(c, "BSZ-031", lambda: c.pread(100, 512))
    assert received(s, "NBD_CMD_READ") == []
    c = client(s, without(Strict.ALIGN))
    sent(c, lambda: c.pread(100, 512), errno.EINVAL)  # "not aligned to the minimum block size" (ERR-004)
    assert any("length=100" in line.split() for line in received(s, "NBD_CMD_READ"))


def test_payload_over_the_advertised_maximum(serve) -> None:
    # "A client MUST NOT request a WRITE ... longer than the maximum payload size" (BSZ-025): 64 KiB here.
    s = serve(Export.memory("exp", SIZE, block_size=(1, 4096, 64 << 10)))
    data = b"\x5a" * (128 << 10)
    c = client(s)
    assert c.get_block_size("payload") == 64 << 10
    refused_locally(c, "BSZ-025", lambda: c.pwrite(data, 0))
    assert received(s, "NBD_CMD_WRITE") == []
    c = client(s, without(Strict.PAYLOAD))
    sent(c, lambda: c.pwrite(data, 0), errno.EINVAL)
    assert len(received(s, "NBD_CMD_WRITE")) == 1


def test_payload_over_the_default_maximum(serve) -> None:
    # No maximum advertised: "Absent advertised constraints, an interoperable client should use ...
    # READ/WRITE payloads of at most 2^25 bytes" (BSZ-008, a SHOULD): the client's payload maximum.
    s = serve(Export.memory("exp", 40 << 20), persona=personas.with_changes(personas.get(personas.DEFAULT),
                                                                            info_block_size=None))
    data = bytes((32 << 20) + 4096)
    c = client(s)
    assert c.get_block_size("maximum") == 0 and c.get_block_size("payload") == 32 << 20
    refused_locally(c, "BSZ-008", lambda: c.pwrite(data, 0))
    assert received(s, "NBD_CMD_WRITE") == []
    c = client(s, without(Strict.PAYLOAD))
    sent(c, lambda: c.pwrite(data, 0), errno.EINVAL)  # the reference server's limit is 2^25 too
    assert len(received(s, "NBD_CMD_WRITE")) == 1
