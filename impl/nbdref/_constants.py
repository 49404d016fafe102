"""Every magic number, code and flag of the NBD protocol, in one place.

Names are the spec's names without the ``NBD_`` / ``NBD_OPT_`` ... prefix, so code reads like the
spec (``Opt.GO``, ``Rep.ERR_UNSUP``, ``TxFlag.SEND_FUA``). Values come from ``data/constants.yaml``
(the spec catalogue, vendored); ``tests/test_constants.py`` checks every entry
of that file against this module, so the two cannot drift apart silently.
"""

from __future__ import annotations

import errno as _errno
from enum import IntEnum, IntFlag


class Magic(IntEnum):
    """Magic numbers on the wire (64-bit handshake magics, 32-bit transmission magics)."""

    NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC", first 8 bytes sent by every server
    CLISERV = 0x0000420281861253  # cliserv_magic: second magic of the oldstyle greeting
    IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT": newstyle greeting and every option request
    OPT_REPLY = 0x0003E889045565A9  # prefix of every option reply
    REQUEST = 0x25609513
    SIMPLE_REPLY = 0x67446698
    STRUCTURED_REPLY = 0x668E33EF
    EXTENDED_REQUEST = 0x21E41C71  # extended headers (experimental)
    EXTENDED_REPLY = 0x6E8A278C  # extended headers (experimental)
    HISTORIC_REQUEST = 0x12560953  # reserved: used until Linux 2.1.116pre2
    HISTORIC_REPLY = 0x96744668  # reserved: used until Linux 2.1.116pre2
    TRACELOG = 0x25609514  # reserved: nbd-server transaction log only, never on the wire


class HandshakeFlag(IntFlag):
    """16-bit handshake flags the server sends after IHAVEOPT."""

    FIXED_NEWSTYLE = 1 << 0
    NO_ZEROES = 1 << 1


class ClientFlag(IntFlag):
    """32-bit client flags the client answers the handshake flags with."""

    FIXED_NEWSTYLE = 1 << 0
    NO_ZEROES = 1 << 1


class Opt(IntEnum):
    """Option types (32-bit ``option`` field of an option request)."""

    EXPORT_NAME = 1
    ABORT = 2
    LIST = 3
    PEEK_EXPORT = 4  # withdrawn
    STARTTLS = 5
    INFO = 6
    GO = 7
    STRUCTURED_REPLY = 8
    LIST_META_CONTEXT = 9
    SET_META_CONTEXT = 10
    EXTENDED_HEADERS = 11  # experimental


REP_FLAG_ERROR = 1 << 31
"""Bit 31 of an option reply type: set in every error reply."""


class Rep(IntEnum):
    """Option reply types (bit 31 marks errors)."""

    ACK = 1
    SERVER = 2
    INFO = 3
    META_CONTEXT = 4
    ERR_UNSUP = REP_FLAG_ERROR + 1
    ERR_POLICY = REP_FLAG_ERROR + 2
    ERR_INVALID = REP_FLAG_ERROR + 3
    ERR_PLATFORM = REP_FLAG_ERROR + 4
    ERR_TLS_REQD = REP_FLAG_ERROR + 5
    ERR_UNKNOWN = REP_FLAG_ERROR + 6
    ERR_SHUTDOWN = REP_FLAG_ERROR + 7
    ERR_BLOCK_SIZE_REQD = REP_FLAG_ERROR + 8
    ERR_TOO_BIG = REP_FLAG_ERROR + 9
    ERR_EXT_HEADER_REQD = REP_FLAG_ERROR + 10  # experimental


class Info(IntEnum):
    """Information types inside NBD_REP_INFO and in the request list of INFO/GO."""

    EXPORT = 0
    NAME = 1
    DESCRIPTION = 2
    BLOCK_SIZE = 3


class TxFlag(IntFlag):
    """16-bit transmission flags (EXPORT_NAME reply or NBD_INFO_EXPORT)."""

    HAS_FLAGS = 1 << 0
    READ_ONLY = 1 << 1
    SEND_FLUSH = 1 << 2
    SEND_FUA = 1 << 3
    ROTATIONAL = 1 << 4
    SEND_TRIM = 1 << 5
    SEND_WRITE_ZEROES = 1 << 6
    SEND_DF = 1 << 7
    CAN_MULTI_CONN = 1 << 8
    SEND_RESIZE = 1 << 9  # experimental (resize extension)
    SEND_CACHE = 1 << 10
    SEND_FAST_ZERO = 1 << 11
    BLOCK_STATUS_PAYLOAD = 1 << 12  # experimental (extended headers)


class Cmd(IntEnum):
    """Request types (16-bit ``type`` field of a request)."""

    READ = 0
    WRITE = 1
    DISC = 2
    FLUSH = 3
    TRIM = 4
    CACHE = 5
    WRITE_ZEROES = 6
    BLOCK_STATUS = 7
    RESIZE = 8  # experimental (resize extension)


def cmd_name(cmd: int) -> str:
    """``NBD_CMD_<NAME>`` of a request type, ``command <n>`` for an undefined one (messages)."""
    try:
        return "NBD_CMD_" + Cmd(cmd).name
    except ValueError:
        return f"command {cmd}"


class CmdFlag(IntFlag):
    """16-bit command flags of a request."""

    FUA = 1 << 0
    NO_HOLE = 1 << 1
    DF = 1 << 2
    REQ_ONE = 1 << 3
    FAST_ZERO = 1 << 4
    PAYLOAD_LEN = 1 << 5  # experimental (extended headers)


class ReplyFlag(IntFlag):
    """16-bit flags of a structured or extended reply chunk."""

    DONE = 1 << 0


REPLY_TYPE_ERROR_BIT = 1 << 15
"""Bit 15 of a chunk type: set in every error chunk type."""


class ReplyType(IntEnum):
    """Structured reply chunk types (bit 15 marks error chunks)."""

    NONE = 0
    OFFSET_DATA = 1
    OFFSET_HOLE = 2
    BLOCK_STATUS = 5
    BLOCK_STATUS_EXT = 6  # experimental (extended headers)
    ERROR = REPLY_TYPE_ERROR_BIT + 1
    ERROR_OFFSET = REPLY_TYPE_ERROR_BIT + 2


class Err(IntEnum):
    """NBD error values (simple reply ``error`` and error chunks); see ``to_errno``."""

    EPERM = 1
    EIO = 5
    ENOMEM = 12
    EINVAL = 22
    ENOSPC = 28
    EOVERFLOW = 75
    ENOTSUP = 95
    ESHUTDOWN = 108

    @property
    def errno(self) -> int:
        """The host errno with the same meaning (values differ from NBD's on some systems)."""
        return _ERRNO[self]

    @classmethod
    def from_errno(cls, value: int) -> Err:
        """The NBD error for a host errno; unknown ones map to EINVAL, as ERR-012 suggests for clients.

        EDQUOT and EFBIG map to ENOSPC ("The server SHOULD map EDQUOT and EFBIG to NBD_ENOSPC", ERR-002).
        """
        if value in (_errno.EDQUOT, _errno.EFBIG):
            return cls.ENOSPC
        if value == getattr(_errno, "EOPNOTSUPP", -1):
            return cls.ENOTSUP
        for err, host in _ERRNO.items():
            if host == value:
                return err
        return cls.EINVAL


_ERRNO = {
    Err.EPERM: _errno.EPERM,
    Err.EIO: _errno.EIO,
    Err.ENOMEM: _errno.ENOMEM,
    Err.EINVAL: _errno.EINVAL,
    Err.ENOSPC: _errno.ENOSPC,
    Err.EOVERFLOW: _errno.EOVERFLOW,
    Err.ENOTSUP: _errno.ENOTSUP,
    Err.ESHUTDOWN: _errno.ESHUTDOWN,
}


class StateFlag(IntFlag):
    """Status bits of the metadata contexts the spec and qemu define.

    ``HOLE``/``ZERO`` belong to ``base:allocation``; ``DIRTY`` to ``qemu:dirty-bitmap:*`` and is bit 0
    of *that* context, so it is an alias of ``HOLE`` here: the context id says which applies.
    """

    HOLE = 1 << 0
    ZERO = 1 << 1
    DIRTY = 1 << 0


# Metadata context names and namespaces.
CONTEXT_BASE_ALLOCATION = "base:allocation"
CONTEXT_QEMU_DIRTY_BITMAP_PREFIX = "qemu:dirty-bitmap:"
CONTEXT_QEMU_ALLOCATION_DEPTH = "qemu:allocation-depth"

# Limits the spec uses normatively (constants.yaml "limits").
NBD_PORT = 10809
STRING_RECOMMENDED_MAX = 256
STRING_MAX = 4096
ZERO_PAD = 124
DEFAULT_MIN_BLOCK = 1
DEFAULT_PREF_BLOCK = 4096
DEFAULT_MAX_PAYLOAD = 1 << 25
INTEROP_BLOCK = 512
MAX_MIN_BLOCK = 1 << 16
RECOMMENDED_MIN_MAX_PAYLOAD = 1 << 20
MAX_PAYLOAD_UNLIMITED = 0xFFFFFFFF
MAX_EXTENTS_PER_CHUNK = 1 << 20
DF_MIN_SUPPORTED = 1 << 16
MAX_DATA_CHUNK = (1 << 32) - 8

# Which transmission flag exposes which command / command flag (CMD-008).
COMMAND_NEEDS_TXFLAG: dict[Cmd, TxFlag] = {
    Cmd.FLUSH: TxFlag.SEND_FLUSH,
    Cmd.TRIM: TxFlag.SEND_TRIM,
    Cmd.WRITE_ZEROES: TxFlag.SEND_WRITE_ZEROES,
    Cmd.CACHE: TxFlag.SEND_CACHE,
    Cmd.RESIZE: TxFlag.SEND_RESIZE,
}
FLAG_NEEDS_TXFLAG: dict[CmdFlag, TxFlag] = {
    CmdFlag.FUA: TxFlag.SEND_FUA,
    CmdFlag.DF: TxFlag.SEND_DF,
    CmdFlag.FAST_ZERO: TxFlag.SEND_FAST_ZERO,
}
# Command flags documented per command (CMD-014); FUA is valid on every command when advertised
# ("If NBD_FLAG_SEND_FUA was advertised the server must accept FUA on every command", FUA-002).
VALID_CMD_FLAGS: dict[Cmd, CmdFlag] = {
    Cmd.READ: CmdFlag.FUA | CmdFlag.DF,
    Cmd.WRITE: CmdFlag.FUA | CmdFlag.PAYLOAD_LEN,
    Cmd.DISC: CmdFlag.FUA,
    Cmd.FLUSH: CmdFlag.FUA,
    Cmd.TRIM: CmdFlag.FUA,
    Cmd.CACHE: CmdFlag.FUA,
    Cmd.WRITE_ZEROES: CmdFlag.FUA | CmdFlag.NO_HOLE | CmdFlag.FAST_ZERO,
    Cmd.BLOCK_STATUS: CmdFlag.FUA | CmdFlag.REQ_ONE | CmdFlag.PAYLOAD_LEN,
    Cmd.RESIZE: CmdFlag.FUA,
}
# Commands that may change the export (refused on a read-only export, WR-001).
WRITE_COMMANDS = frozenset({Cmd.WRITE, Cmd.TRIM, Cmd.WRITE_ZEROES, Cmd.RESIZE})
