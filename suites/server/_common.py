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
