"""What a server should answer to a request it ought to refuse (proto.md "Error values" and friends).

A pure function of the request and the negotiated state, so the rules read as a table. Each rule is
``(req_id, expected)``: ``expected`` is the NBD error the reply should carry, or ``None`` for "any
error, but not success". The connection applies them when a reply completes (on the client side they
judge the server; on the server side they guard our own replies).
"""

from __future__ import annotations

from dataclasses import dataclass

from ._constants import VALID_CMD_FLAGS, Cmd, CmdFlag, Err, TxFlag

# Commands that modify the export ("If NBD_FLAG_READ_ONLY is set the server MUST fail subsequent
# write operations", WR-001).
_WRITES = frozenset({Cmd.WRITE, Cmd.TRIM, Cmd.WRITE_ZEROES})
# Per command: which requirement names the error for a request reaching past the end of the export.
_BEYOND_END: dict[int, tuple[str, int]] = {
    Cmd.WRITE: ("ERR-001", Err.ENOSPC),  # "A WRITE reaching past the end ... SHOULD fail with NBD_ENOSPC"
    Cmd.WRITE_ZEROES: ("WZ-030", Err.ENOSPC),
    Cmd.READ: ("ERR-003", Err.EINVAL),  # "A READ or TRIM reaching past the end ... SHOULD fail with NBD_EINVAL"
    Cmd.TRIM: ("ERR-003", Err.EINVAL),
    Cmd.BLOCK_STATUS: ("BS-085", Err.EINVAL),
}
_ALL_FLAGS = sum(int(f) for f in CmdFlag)  # a plain int: ~ of an IntFlag drops unknown bits
_READ_ONLY_ERR: dict[int, str] = {Cmd.WRITE: "ERR-005", Cmd.TRIM: "ERR-005", Cmd.WRITE_ZEROES: "WZ-031"}


@dataclass(frozen=True, slots=True)
class Negotiated:
    """The parts of the connection state the rules need."""

    export_size: int | None
    transmission_flags: int
    min_block: int | None  # advertised minimum block size, if any
    max_payload: int | None
    contexts: int  # number of negotiated meta contexts


def refusals(cmd: int, flags: int, offset: int, length: int, st: Negotiated) -> list[tuple[str, int | None]]:
    """The rules that say this request should fail, with the error each expects."""
    out: list[tuple[str, int | None]] = []
    known = cmd in VALID_CMD_FLAGS
    if not known:
        out.append(("ERR-008", Err.EINVAL))  # "An unknown command type should fail with NBD_EINVAL"
        return out
    tx = st.transmission_flags
    if flags & ~_ALL_FLAGS:
        out.append(("ERR-009", Err.EINVAL))  # "An unknown command flag should fail with NBD_EINVAL"
        if cmd == Cmd.CACHE and tx & TxFlag.SEND_CACHE:
            # "A server advertising NBD_FLAG_SEND_CACHE must reject CACHE requests carrying command flags
            # it does not recognise" (CACHE-006)
            out.append(("CACHE-006", None))
    elif flags & ~int(VALID_CMD_FLAGS[Cmd(cmd)]):
        out.append(("ERR-010", Err.EINVAL))  # "A flag not documented for the given command"
    if cmd == Cmd.WRITE_ZEROES and flags & CmdFlag.FAST_ZERO and not tx & TxFlag.SEND_FAST_ZERO:
        out.append(("WZ-026", Err.EINVAL))  # "...and should fail with NBD_EINVAL if FAST_ZERO is set anyway"
    if cmd in _WRITES and tx & TxFlag.READ_ONLY:
        out.append(("WR-001", None))
        out.append((_READ_ONLY_ERR[cmd], Err.EPERM))
    if cmd in _BEYOND_END and st.export_size is not None and offset + length > st.export_size:
        out.append(_BEYOND_END[cmd])
    if cmd in (Cmd.READ, Cmd.WRITE) and st.min_block and (offset % st.min_block or length % st.min_block):
        out.append(("ERR-004", Err.EINVAL))  # "not aligned to the advertised minimum block size"
    if cmd == Cmd.BLOCK_STATUS and not st.contexts:
        out.append(("BS-004", Err.EINVAL))  # "SHOULD answer NBD_EINVAL when no context was selected"
    return out


def judge(
    cmd: int, flags: int, offset: int, length: int, error: int, st: Negotiated
) -> list[tuple[str, str]]:
    """Rules the reply ``error`` breaks: ``[(req_id, why), ...]``."""
    broken: list[tuple[str, str]] = []
    rules = refusals(cmd, flags, offset, length, st)
    wanted = {e for _, e in rules if e is not None}
    for req_id, expected in rules:
        if expected is None:
            if error == 0:
                broken.append((req_id, f"success for a request that must fail ({_name(cmd)})"))
        elif len(wanted) == 1 and error != expected:
            # Only judge the exact value when every applicable rule agrees on it.
            broken.append((req_id, f"error {_err(error)} where {_err(expected)} is expected ({_name(cmd)})"))
    tx = st.transmission_flags
    if error == Err.ENOTSUP:
        wz = cmd == Cmd.WRITE_ZEROES
        if wz and not tx & TxFlag.SEND_FAST_ZERO:
            # "A server not advertising SEND_FAST_ZERO should not fail WRITE_ZEROES with NBD_ENOTSUP" (WZ-025)
            broken.append(("WZ-025", "NBD_ENOTSUP for WRITE_ZEROES without SEND_FAST_ZERO advertised"))
        elif wz and not flags & CmdFlag.FAST_ZERO:
            # "If SEND_FAST_ZERO is advertised but FAST_ZERO is not set, the server MUST NOT fail with
            # NBD_ENOTSUP" (WZ-020)
            broken.append(("WZ-020", "NBD_ENOTSUP for WRITE_ZEROES without FAST_ZERO"))
        elif not wz:
            # "NBD_ENOTSUP should only be returned for WRITE_ZEROES with FAST_ZERO" (ERR-007)
            broken.append(("ERR-007", f"NBD_ENOTSUP for {_name(cmd)}"))
    if error == Err.EOVERFLOW:
        df_read = cmd == Cmd.READ and flags & CmdFlag.DF
        oversize = st.max_payload is not None and length > st.max_payload and cmd not in (Cmd.READ, Cmd.WRITE)
        if not (df_read or oversize):
            # "NBD_EOVERFLOW should only be returned for DF reads or oversize payload-less requests"
            broken.append(("ERR-006", f"NBD_EOVERFLOW for {_name(cmd)}"))
    return broken


def _name(cmd: int) -> str:
    try:
        return "NBD_CMD_" + Cmd(cmd).name
    except ValueError:
        return f"command {cmd}"


def _err(e: int) -> str:
    try:
        return "NBD_" + Err(e).name
    except ValueError:
        return str(e)
