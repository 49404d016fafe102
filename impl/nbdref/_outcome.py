"""What a server should answer to a request it ought to refuse (proto.md "Error values" and friends).

A pure function of the request and the negotiated state, so the rules read as a table. Each rule is
``(req_id, expected)``: ``expected`` is the NBD error the reply should carry, or ``None`` for "any
error, but not success". The connection applies them when a reply completes (on the client side they
judge the server; on the server side they guard our own replies).
"""

from __future__ import annotations

from dataclasses import dataclass

from ._constants import DEFAULT_MAX_PAYLOAD, VALID_CMD_FLAGS, Cmd, CmdFlag, Err, TxFlag, cmd_name

# Plain ints throughout: this runs for every request and reply, and IntFlag arithmetic (or reading an
# enum member off its class) costs far more than the int operation itself.
_READ, _WRITE, _CACHE, _WRITE_ZEROES = int(Cmd.READ), int(Cmd.WRITE), int(Cmd.CACHE), int(Cmd.WRITE_ZEROES)
_BLOCK_STATUS = int(Cmd.BLOCK_STATUS)
_FAST_ZERO, _DF = int(CmdFlag.FAST_ZERO), int(CmdFlag.DF)
_SEND_CACHE, _SEND_FAST_ZERO, _READ_ONLY = int(TxFlag.SEND_CACHE), int(TxFlag.SEND_FAST_ZERO), int(TxFlag.READ_ONLY)
_BLOCK_STATUS_PAYLOAD = int(TxFlag.BLOCK_STATUS_PAYLOAD)
# Expected errors stay Err members (the API shows names); comparing them is int comparison in C.
_EINVAL, _ENOSPC, _EPERM = Err.EINVAL, Err.ENOSPC, Err.EPERM
_ENOTSUP, _EOVERFLOW = Err.ENOTSUP, Err.EOVERFLOW
# Commands that modify the export ("If NBD_FLAG_READ_ONLY is set the server MUST fail subsequent
# write operations", WR-001).
_WRITES = frozenset({_WRITE, int(Cmd.TRIM), _WRITE_ZEROES})
# Per command: which requirement names the error for a request reaching past the end of the export.
_BEYOND_END: dict[int, tuple[str, int]] = {
    _WRITE: ("ERR-001", _ENOSPC),  # "A WRITE reaching past the end ... SHOULD fail with NBD_ENOSPC"
    _WRITE_ZEROES: ("WZ-030", _ENOSPC),
    _READ: ("ERR-003", _EINVAL),  # "A READ or TRIM reaching past the end ... SHOULD fail with NBD_EINVAL"
    int(Cmd.TRIM): ("ERR-003", _EINVAL),
    _BLOCK_STATUS: ("BS-085", _EINVAL),
}
_ALL_FLAGS = sum(int(f) for f in CmdFlag)  # a plain int: ~ of an IntFlag drops unknown bits
_VALID_FLAGS: dict[int, int] = {int(c): int(f) for c, f in VALID_CMD_FLAGS.items()}
_READ_ONLY_ERR: dict[int, str] = {_WRITE: "ERR-005", int(Cmd.TRIM): "ERR-005", _WRITE_ZEROES: "WZ-031"}


@dataclass(frozen=True, slots=True)
class Negotiated:
    """The parts of the connection state the rules need."""

    export_size: int | None
    transmission_flags: int
    min_block: int | None  # advertised minimum block size, if any
    max_payload: int | None
    contexts: int  # number of negotiated meta contexts
    context_ids: frozenset[int] = frozenset()  # their ids
    structured: bool = False  # structured replies or extended headers negotiated


def refusals(
    cmd: int, flags: int, offset: int, length: int, st: Negotiated, *, payload_ids: tuple[int, ...] | None = None
) -> list[tuple[str, int | None]]:
    """The rules that say this request should fail, with the error each expects.

    ``length`` is the effect length; ``payload_ids`` the context ids of a BLOCK_STATUS sent in payload
    form (its effect length then comes from the payload too).
    """
    cmd, flags = int(cmd), int(flags)
    out: list[tuple[str, int | None]] = []
    valid = _VALID_FLAGS.get(cmd)
    if valid is None:
        out.append(("ERR-008", _EINVAL))  # "An unknown command type should fail with NBD_EINVAL"
        return out
    tx = st.transmission_flags
    if flags & ~_ALL_FLAGS:
        out.append(("ERR-009", _EINVAL))  # "An unknown command flag should fail with NBD_EINVAL"
        if cmd == _CACHE and tx & _SEND_CACHE:
            # "A server advertising NBD_FLAG_SEND_CACHE must reject CACHE requests carrying command flags
            # it does not recognise" (CACHE-006)
            out.append(("CACHE-006", None))
    elif flags & ~valid:
        out.append(("ERR-010", _EINVAL))  # "A flag not documented for the given command"
    if cmd == _WRITE_ZEROES and flags & _FAST_ZERO and not tx & _SEND_FAST_ZERO:
        out.append(("WZ-026", _EINVAL))  # "...and should fail with NBD_EINVAL if FAST_ZERO is set anyway"
    if tx & _READ_ONLY and cmd in _WRITES:
        out.append(("WR-001", None))
        out.append((_READ_ONLY_ERR[cmd], _EPERM))
    if st.export_size is not None and offset + length > st.export_size and cmd in _BEYOND_END:
        out.append(_BEYOND_END[cmd])
    if st.min_block and cmd in (_READ, _WRITE) and (offset % st.min_block or length % st.min_block):
        out.append(("ERR-004", _EINVAL))  # "not aligned to the advertised minimum block size"
    if cmd == _BLOCK_STATUS and not st.contexts:
        out.append(("BS-004", _EINVAL))  # "SHOULD answer NBD_EINVAL when no context was selected"
    if payload_ids is not None and cmd == _BLOCK_STATUS:
        unsupported = not tx & _BLOCK_STATUS_PAYLOAD
        odd = len(set(payload_ids)) != len(payload_ids) or not st.context_ids.issuperset(payload_ids)
        if unsupported or odd:
            # "If the server does not support the payload form, or detects duplicate or unknown
            # metacontext ids in the client's payload, the server MUST gracefully consume the client's
            # payload before failing with NBD_EINVAL" (EXT-055)
            out.append(("EXT-055", _EINVAL))
    return out


def judge(
    cmd: int,
    flags: int,
    offset: int,
    length: int,
    error: int,
    st: Negotiated,
    *,
    payload_ids: tuple[int, ...] | None = None,
    considered: set[str] | None = None,
) -> list[tuple[str, str]]:
    """Rules the reply ``error`` breaks: ``[(req_id, why), ...]`` (arguments as for ``refusals``).
    ``considered``, when given, receives the ids of every rule the reply was judged by, held or not."""
    broken: list[tuple[str, str]] = []
    rules = refusals(cmd, flags, offset, length, st, payload_ids=payload_ids)
    cmd, flags, error = int(cmd), int(flags), int(error)
    if rules:
        wanted = {e for _, e in rules if e is not None}
        # Rules that disagree on the value leave only "it must fail" to judge, when such a rule applies.
        only_failure = len(wanted) > 1 and any(e is None for _, e in rules)
        for req_id, expected in rules:
            if error == 0:
                if only_failure and expected is not None:
                    continue
                broken.append((req_id, f"success for a request that must fail ({cmd_name(cmd)})"))
            elif expected is not None and len(wanted) == 1:
                # Only judge the exact value when every applicable rule agrees on it.
                if error != expected:
                    broken.append((req_id, f"error {_err(error)} where {_err(expected)} is expected "
                                           f"({cmd_name(cmd)})"))
            elif expected is not None:
                continue        # the rules disagree on the value: this one was not judged
            if considered is not None:
                considered.add(req_id)
    if error == 0:
        return broken
    tx = st.transmission_flags
    if error == _ENOTSUP:
        wz = cmd == _WRITE_ZEROES
        if wz and not tx & _SEND_FAST_ZERO:
            # "A server not advertising SEND_FAST_ZERO should not fail WRITE_ZEROES with NBD_ENOTSUP" (WZ-025)
            broken.append(("WZ-025", "NBD_ENOTSUP for WRITE_ZEROES without SEND_FAST_ZERO advertised"))
        elif wz and not flags & _FAST_ZERO:
            # "If SEND_FAST_ZERO is advertised but FAST_ZERO is not set, the server MUST NOT fail with
            # NBD_ENOTSUP" (WZ-020)
            broken.append(("WZ-020", "NBD_ENOTSUP for WRITE_ZEROES without FAST_ZERO"))
        elif not wz:
            # "NBD_ENOTSUP should only be returned for WRITE_ZEROES with FAST_ZERO" (ERR-007)
            broken.append(("ERR-007", f"NBD_ENOTSUP for {cmd_name(cmd)}"))
        if considered is not None:
            # the one rule this reply was judged by
            considered.add("WZ-025" if wz and not tx & _SEND_FAST_ZERO else "WZ-020" if wz and not flags & _FAST_ZERO
                           else "ERR-007")
    if error == _EOVERFLOW:
        if considered is not None:
            considered.add("ERR-006")
        # "The server SHOULD NOT return NBD_EOVERFLOW except as documented in response to NBD_CMD_READ
        # when NBD_CMD_FLAG_DF is supported, or when a command without payload requests a length larger
        # than an advertised maximum payload length" (ERR-006).
        df_read = cmd == _READ and flags & _DF
        oversize = st.max_payload is not None and length > st.max_payload and cmd not in (_READ, _WRITE)
        # Also documented, in NBD_CMD_READ's structured-reply paragraph: "A server MAY support read
        # requests larger than the maximum payload size by splitting the response across multiple
        # chunks ...; however, the server is also permitted to reject large read requests up front with
        # NBD_EOVERFLOW". "Large" is over the maximum payload size: the advertised one, else the 2^25
        # default ("Absent advertised constraints ... payloads of at most 2^25 bytes", BSZ-008). With
        # simple replies such a READ is the client's breach (BSZ-025) and nothing documents EOVERFLOW.
        limit = st.max_payload if st.max_payload is not None else DEFAULT_MAX_PAYLOAD
        large_read = cmd == _READ and st.structured and length > limit
        if not (df_read or oversize or large_read):
            broken.append(("ERR-006", f"NBD_EOVERFLOW for {cmd_name(cmd)}"))
    return broken


def _err(e: int) -> str:
    try:
        return "NBD_" + Err(e).name
    except ValueError:
        return str(e)
