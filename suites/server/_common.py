"""What the server suites share: the block-status collector and readable flag names."""

from __future__ import annotations

from typing import Any

BASE = "base:allocation"
# base:allocation: "NBD_STATE_HOLE (bit 0)", "NBD_STATE_ZERO (bit 1)"; bits 2-31 reserved (BS-023).
HOLE, ZERO = 1, 2
REGION = 64 * 1024


def collect_extents(c: Any, count: int, offset: int, flags: int = 0) -> dict[str, list[tuple[int, int]]]:
    """context name -> [(length, flags)] of one NBD_CMD_BLOCK_STATUS."""
    seen: dict[str, list[tuple[int, int]]] = {}

    def callback(name: str, _offset: int, entries: list[int], _err: int) -> None:
        seen.setdefault(name, []).extend(zip(entries[0::2], entries[1::2], strict=True))

    c.block_status(count, offset, callback, flags)
    return seen


def flag_names(flags: int) -> str:
    """HAS_FLAGS|SEND_FLUSH|... for a transmission flags value."""
    from nbdref._constants import TxFlag

    return "|".join(f.name or "?" for f in TxFlag if f & flags) or "0"


def acked(c: Any, option: int) -> bool:
    """Did the server answer `option` (an nbdref._constants.Opt) with NBD_REP_ACK on this connection?"""
    from nbdref import events as ev

    return any(isinstance(e.event, ev.RepAck) and e.event.option == option
               for e in c.transcript if e.direction == "S")


# ---- helpers of the command, error and block-size suites (helper B, issue 9)

# proto.md "Error values": "The following error values are defined" -- an error outside them is no
# "appropriate error code" (RD-011, WR-007, WZ-029, CACHE-002 ask for one).
def nbd_error_values() -> frozenset[int]:
    """The NBD error values proto.md defines."""
    from nbdref._constants import Err

    return frozenset(int(e) for e in Err)


def error_name(error: int) -> str:
    """NBD_EINVAL for 22, 'success' for 0, the number otherwise."""
    from nbdref._constants import Err

    if error == 0:
        return "success"
    try:
        return "NBD_" + Err(error).name
    except ValueError:
        return f"error {error}"


def outcome(c: Any, command: int, offset: int, length: int, flags: int = 0, *, payload: bytes | None = None,
            buffer: bytearray | None = None) -> int:
    """Send one request and wait for it: the NBD error of its reply (0 = success).  A lost connection
    or a broken reply raises (a request the server may refuse must still get a reply)."""
    from nbdref.client import ClientError

    if command == 0 and buffer is None:           # NBD_CMD_READ: somewhere for the data to land
        buffer = bytearray(length)
    try:
        c.wait(c.aio_command(command, offset, length, flags, payload=payload, buffer=buffer))
    except ClientError as e:
        if e.errno is None:
            raise
        return int(e.errno)
    return 0


def server_chunks(c: Any, cookie: int | None = None) -> list[Any]:
    """The structured reply chunks (and simple replies) the server sent on this client, in order; only
    those of `cookie` when given (from the transcript: data is a preview, offsets and lengths are exact)."""
    from nbdref import events as ev

    out = []
    for entry in c.transcript:
        e = entry.event
        if (entry.direction == "S" and isinstance(e, ev.Chunk | ev.SimpleReply)
                and (cookie is None or e.cookie == cookie)):
            out.append(e)
    return out


def go_without_block_size(c: Any) -> None:
    """NBD_OPT_GO (or NBD_OPT_INFO via `c.opt_info`) without an NBD_INFO_BLOCK_SIZE request from now
    on: a client that does not negotiate sizes (libnbd's set_request_block_size(false)); the reference
    client has no public switch, so its info list is replaced."""
    c._info_request = lambda: ()


def option_replies(c: Any, option: Any) -> list[Any]:
    """Send one option event on a client in opt mode; its replies up to the final ACK or error (the last
    element).  The core tracks and checks the option like any other (replies to it are expected), which
    the public opt_* calls cannot do for illegal or error-ending options."""
    return c._option_replies(option)


def rep_name(reply: Any) -> str:
    """NBD_REP_ACK, NBD_REP_ERR_INVALID, ... of an option reply event (hex for unknown types)."""
    from nbdref._constants import Rep

    t = int(getattr(reply, "reply_type", -1))
    return f"NBD_REP_{Rep(t).name}" if t in Rep._value2member_map_ else hex(t)


def held(c: Any, *ids: str) -> bool:
    """None of ``ids`` among the violations the core recorded on this client's connection: for rules the
    core checks only where they can break (a chunk's magic or type against what was negotiated), so a
    conforming message leaves no trace of its own."""
    return not any(getattr(v, "req_id", None) in ids for v in c.violations)


def reference_style(spec: Any) -> dict[str, Any]:
    """Server() keyword arguments for the handshake style of an nbdref matrix row (``--oldstyle``,
    ``--mask-handshake``), for tests that start a reference server of their own for that row."""
    from fixtures.peers.nbdref import handshake_settings

    oldstyle, mask = handshake_settings(spec)
    style: dict[str, Any] = {"oldstyle": True} if oldstyle else {}
    if mask is not None:
        style["mask_handshake"] = mask
    return style


class InProcessServer:
    """What ref_client and Judge.watch_server need of an nbdref Server a test started itself: its URI, and
    whether it is still alive (serving, or stopped by the test on purpose -- not died)."""

    spec = None

    def __init__(self, server: Any, uri: str | None = None) -> None:
        self.server, self.uri = server, uri or server.uri

    def alive(self) -> bool:
        return bool(self.server.stopped or self.server.serving())
