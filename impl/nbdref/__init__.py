"""nbdref: a strict reference implementation of the NBD protocol (sans-I/O core + drivers).

The flat namespace holds the core: connections, events, constants, errors and strictness.
Drivers live in submodules (``nbdref.client``, ``nbdref.server``) and are imported explicitly.
"""

from . import events
from ._constants import (
    REP_FLAG_ERROR,
    REPLY_TYPE_ERROR_BIT,
    ClientFlag,
    Cmd,
    CmdFlag,
    Err,
    HandshakeFlag,
    Info,
    Magic,
    Opt,
    Rep,
    ReplyFlag,
    ReplyType,
    StateFlag,
    TxFlag,
)
from ._errors import LocalProtocolError, ProtocolError, RemoteProtocolError, Violation
from ._strict import Strictness
from ._transcript import Entry, Transcript
from .connection import NEED_DATA, ClientConnection, Connection, Role, ServerConnection, State

__all__ = [
    "NEED_DATA",
    "REPLY_TYPE_ERROR_BIT",
    "REP_FLAG_ERROR",
    "ClientConnection",
    "ClientFlag",
    "Cmd",
    "CmdFlag",
    "Connection",
    "Entry",
    "Err",
    "HandshakeFlag",
    "Info",
    "LocalProtocolError",
    "Magic",
    "Opt",
    "ProtocolError",
    "RemoteProtocolError",
    "Rep",
    "ReplyFlag",
    "ReplyType",
    "Role",
    "ServerConnection",
    "State",
    "StateFlag",
    "Strictness",
    "Transcript",
    "TxFlag",
    "Violation",
    "events",
]
