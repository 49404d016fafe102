"""Handshake styles: the greeting (oldstyle, newstyle, fixed newstyle, NO_ZEROES), client flags the
server must reject, and NBD_OPT_EXPORT_NAME's reply with and without the 124 zero bytes.

The rows of each style (matrix.yaml: nbdkit -o / --mask-handshake, nbdref --oldstyle / --mask-handshake)
are judged on what they advertise: a style absent as configured is unsupported-ok, present early /
missing as the timeline says.  Raw sockets: these bytes come before anything the client core could frame.
"""

from __future__ import annotations

import struct

import pytest
from nbdref import events as ev
from nbdref._constants import ClientFlag, HandshakeFlag, Magic

from fixtures.expectations import handshake_style, option_haggling
from fixtures.exports import expected_bytes
from suites.server._haggle import Plain, connect, drain, recv_exact

SECTION = "Handshake"
DEFINED = HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES


def _greeting(server) -> tuple[bool, int, object]:
    """(oldstyle?, flags, socket) after the first 16/18 bytes of the greeting."""
    sock = connect(server)
    head = recv_exact(sock, 16)
    magic, second = struct.unpack(">QQ", head)
    assert magic == Magic.NBDMAGIC, f"not NBDMAGIC: {head.hex()}"
    if second == Magic.CLISERV:
        return True, 0, sock
    assert second == Magic.IHAVEOPT, f"neither cliserv_magic nor IHAVEOPT: {head.hex()}"
    return False, struct.unpack(">H", recv_exact(sock, 2))[0], sock


# Oldstyle greeting: "S: 32 bits, flags" whose upper 16 bits are handshake flags, which "MUST NOT" be
# set in oldstyle (OLD-003, checked by the core); the export is then served as usual.
@pytest.mark.req("OLD-003", "INTEROP-009", "INTEROP-010")
@pytest.mark.feature("oldstyle")
def test_oldstyle_greeting(server_peer, shared_server, shared_export, ref_client, verdict):
    """A server that speaks oldstyle sends no handshake flags and serves the export."""
    oldstyle, _, sock = _greeting(shared_server)
    sock.close()
    verdict.timeline("oldstyle", oldstyle, export=shared_export)
    if not oldstyle:
        return
    c = ref_client(shared_server)
    verdict.expect(c.get_protocol() == "oldstyle", "OLD-003", expected="an oldstyle session",
                   observed=c.get_protocol())
    verdict.expect(c.get_size() == shared_export.size, "INTEROP-010", expected=f"size {shared_export.size}",
                   observed=str(c.get_size()))
    data = c.pread(4096, shared_export.size - 4096)
    verdict.expect(data == expected_bytes(shared_export, shared_export.size - 4096, 4096), "INTEROP-010",
                   "INTEROP-009", expected="the export's bytes in a simple reply", observed="other bytes")


# Newstyle greeting: "Servers supporting fixed newstyle MUST set NBD_FLAG_FIXED_NEWSTYLE" (HS-008), and
# "MUST NOT set undefined handshake flags" (HS-010); "Every implementation MUST support the fixed newstyle
# handshake" (INTEROP-003) — unless the row masks it on purpose (then fixed-newstyle is unsupported-ok).
# A server answering options other than NBD_OPT_EXPORT_NAME "must support fixed newstyle" (OPT-008).
# "The server SHOULD refuse to allow oldstyle negotiations on the newstyle port" (OLD-002): where it
# speaks newstyle, every connection gets IHAVEOPT, never cliserv_magic.
@pytest.mark.req("HS-008", "HS-010", "INTEROP-003", "OPT-008", "OLD-002")
@pytest.mark.feature("fixed-newstyle")
def test_newstyle_greeting_flags(server_peer, shared_server, shared_export, verdict):
    """The handshake flags are defined ones, fixed newstyle is offered, and options are answered."""
    oldstyle, flags, sock = _greeting(shared_server)
    sock.close()
    if oldstyle:
        verdict.timeline("fixed-newstyle", False, export=shared_export, how="oldstyle greeting")
        return
    styles = []
    for _ in range(3):
        again, _, s = _greeting(shared_server)
        s.close()
        styles.append("oldstyle" if again else "newstyle")
    verdict.expect(styles == ["newstyle"] * 3, "OLD-002", expected="newstyle on every connection to the "
                   "newstyle socket", observed=str(styles))
    verdict.expect(not flags & ~DEFINED, "HS-010", expected="handshake flags within bits 0-1",
                   observed=f"{flags:#06x}")
    fixed = bool(flags & HandshakeFlag.FIXED_NEWSTYLE)
    verdict.timeline("fixed-newstyle", fixed, export=shared_export)
    verdict.timeline("NBD_FLAG_NO_ZEROES", bool(flags & HandshakeFlag.NO_ZEROES), export=shared_export)
    if option_haggling(server_peer) is None:
        verdict.expect(fixed, "INTEROP-003", expected="NBD_FLAG_FIXED_NEWSTYLE", observed=f"flags {flags:#06x}")
    plain = Plain(shared_server)
    # without fixed newstyle NBD_OPT_LIST breaks the client's MUST: the server may hard-disconnect
    verdict.watch(plain.conn, allow=() if fixed else ("DISC-006",))
    try:
        replies = plain.option(ev.OptList())
    finally:
        plain.close()
    answered = any(isinstance(r, ev.OptionReply) for r in replies)
    story = f"flags {flags:#06x}, NBD_OPT_LIST answered {[type(r).__name__ for r in replies]}"
    if fixed:
        verdict.expect(answered, "OPT-008", "HS-008", expected="NBD_FLAG_FIXED_NEWSTYLE set and options answered",
                       observed=story)
    else:
        # "A server which wishes to use any other option MUST support fixed newstyle" (OPT-008): a server
        # that hides the flag (--mask-handshake) may still support it underneath, and "Servers MAY choose
        # to honour fixed newstyle from clients that didn't set this bit": recorded, not judged.
        verdict.info(f"without NBD_FLAG_FIXED_NEWSTYLE: {story}")


def _send_flags_and_listen(server, extra: int, *, quiet: float = 1.0) -> tuple[int, bytes, bool]:
    oldstyle, flags, sock = _greeting(server)
    try:
        assert not oldstyle
        # the flags, then a well-formed NBD_OPT_LIST: a server that accepted the flags would answer it
        try:
            sock.sendall(struct.pack(">I", (flags & DEFINED) | extra) + struct.pack(">QII", Magic.IHAVEOPT, 3, 0))
        except (BrokenPipeError, ConnectionResetError):
            return flags, b"", True
        data, closed = drain(sock, quiet)
    finally:
        sock.close()
    return flags, data, closed


def _need_newstyle(server_peer, verdict) -> None:
    if handshake_style(server_peer) == "oldstyle":
        verdict.not_applicable("the server runs in the oldstyle handshake: no client flags")


# "The server must close the connection if it does not recognise the client flags" (HS-006); "MUST
# drop the connection if the client sets an unknown flag, or a flag the server did not advertise" (HS-017).
@pytest.mark.req("HS-006", "HS-017")
@pytest.mark.feature("newstyle")
def test_unknown_client_flag_closes(server_peer, shared_server, verdict):
    """Client flags with an undefined bit set make the server close without an option reply."""
    _need_newstyle(server_peer, verdict)
    _, data, closed = _send_flags_and_listen(shared_server, 1 << 5)
    verdict.expect(closed and not data, "HS-006", "HS-017", expected="the connection closed, no reply",
                   observed=f"{'closed' if closed else 'still open'} after {len(data)} bytes {data[:24].hex()}")


# ... "or a flag the server did not advertise" (HS-017): NBD_FLAG_C_NO_ZEROES to a server that did not
# offer NBD_FLAG_NO_ZEROES (the masked rows).
@pytest.mark.req("HS-017")
@pytest.mark.feature("NBD_FLAG_NO_ZEROES")
def test_unoffered_no_zeroes_closes(server_peer, shared_server, shared_export, verdict):
    """NBD_FLAG_C_NO_ZEROES to a server that did not offer it makes the server close."""
    _need_newstyle(server_peer, verdict)
    _, flags, sock = _greeting(shared_server)
    sock.close()
    if flags & HandshakeFlag.NO_ZEROES:
        verdict.not_applicable("the server offers NBD_FLAG_NO_ZEROES")
    verdict.timeline("NBD_FLAG_NO_ZEROES", False, export=shared_export)
    flags, data, closed = _send_flags_and_listen(shared_server, ClientFlag.NO_ZEROES)
    verdict.expect(closed and not data, "HS-017", expected="the connection closed, no reply",
                   observed=f"{'closed' if closed else 'still open'} after {len(data)} bytes {data[:24].hex()}")


def _export_name(server, name: str, no_zeroes: bool) -> tuple[int, bytes, bool]:
    """(handshake flags, bytes after NBD_OPT_EXPORT_NAME, closed?)"""
    oldstyle, flags, sock = _greeting(server)
    try:
        assert not oldstyle
        mine = flags & HandshakeFlag.FIXED_NEWSTYLE
        if no_zeroes:
            mine |= flags & HandshakeFlag.NO_ZEROES
        raw = name.encode()
        sock.sendall(struct.pack(">IQII", mine, Magic.IHAVEOPT, 1, len(raw)) + raw)
        data, closed = drain(sock, 0.5)
        if not closed:
            sock.sendall(struct.pack(">IHHQQI", Magic.REQUEST, 0, 2, 1, 0, 0))     # NBD_CMD_DISC
    finally:
        sock.close()
    return flags, data, closed


# NBD_OPT_EXPORT_NAME: "S: 64 bits, size ... S: 16 bits, transmission flags ... S: 124 bytes, zeroes
# (reserved) (unless NBD_FLAG_C_NO_ZEROES was negotiated by the client)": 10 bytes with NO_ZEROES
# negotiated (HS-009, HS-015), 134 without — the server does not act on a flag the client did not answer
# (HS-011).  Every implementation should keep NBD_OPT_EXPORT_NAME (INTEROP-019).
@pytest.mark.feature("NBD_OPT_EXPORT_NAME")
@pytest.mark.parametrize("no_zeroes", [
    pytest.param(True, id="no-zeroes", marks=pytest.mark.req("HS-009", "HS-015", "INTEROP-019")),
    pytest.param(False, id="zeroes", marks=pytest.mark.req("HS-011", "INTEROP-019"))])
def test_export_name_reply_length(server_peer, shared_server, shared_export, verdict, no_zeroes):
    """NBD_OPT_EXPORT_NAME's reply is 10 bytes with NO_ZEROES negotiated, 134 without."""
    _need_newstyle(server_peer, verdict)
    flags, data, closed = _export_name(shared_server, shared_export.name, no_zeroes)
    if no_zeroes and not flags & HandshakeFlag.NO_ZEROES:
        verdict.timeline("NBD_FLAG_NO_ZEROES", False, export=shared_export)
        return
    want = 10 if no_zeroes else 134
    verdict.expect(bool(data), "INTEROP-019", expected="NBD_OPT_EXPORT_NAME accepted",
                   observed=f"closed={closed}, nothing sent")
    if not data:
        return
    size = struct.unpack(">Q", data[:8])[0] if len(data) >= 8 else None
    ids = ("HS-009", "HS-015") if no_zeroes else ("HS-011",)
    verdict.expect(len(data) == want and data[10:] == bytes(want - 10) and size == shared_export.size, *ids,
                   expected=f"{want} bytes: size {shared_export.size}, flags" + ("" if no_zeroes else ", 124 zeroes"),
                   observed=f"{len(data)} bytes, size {size}")


# "If the server will not allow the export requested by NBD_OPT_EXPORT_NAME it must terminate the
# session" (OPT-001, OPT-007), a hard disconnect since no error reply is possible (DISC-005).  A server
# that serves every name (nbdkit's file plugin) allows it: recorded.
@pytest.mark.req("OPT-001", "OPT-007", "DISC-005")
@pytest.mark.feature("NBD_OPT_EXPORT_NAME")
def test_export_name_unknown_ends_session(server_peer, shared_server, verdict):
    """NBD_OPT_EXPORT_NAME for an export that does not exist ends the session, with nothing sent."""
    _need_newstyle(server_peer, verdict)
    _, data, closed = _export_name(shared_server, "no-such-export-here", True)
    if data and len(data) in (10, 134):
        verdict.info(f"NBD_OPT_EXPORT_NAME 'no-such-export-here' accepted ({len(data)} bytes): the server "
                     "serves any name", only=True)
        return
    verdict.expect(closed and not data, "OPT-001", "OPT-007", "DISC-005", expected="the session ends, nothing sent",
                   observed=f"closed={closed}, {len(data)} bytes {data[:24].hex()}")
