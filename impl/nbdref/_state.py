"""Phases of an NBD connection and the table of legal transitions between them.

The table says which message each role may send in each state and where it leads; ``_connection``
looks every message up here before anything else. Refinements that depend on the option being
answered (an ACK to GO, ABORT or STARTTLS) are in ``ACK_TRANSITIONS``.
"""

from __future__ import annotations

import enum

from . import _events as ev
from ._constants import Opt


class Role(enum.Enum):
    CLIENT = "C"
    SERVER = "S"

    # Members are singletons compared by identity: hash them the same way, in C. Enum's own
    # __hash__ (hash of the name) is Python code run on every transition-table lookup.
    __hash__ = object.__hash__


CLIENT, SERVER = Role.CLIENT, Role.SERVER


class State(enum.Enum):
    """Phase of the connection, shared by both roles."""

    GREETING = "GREETING"  # the server has not sent its greeting yet
    CLIENT_FLAGS = "CLIENT_FLAGS"  # newstyle greeting sent, client flags expected
    OPTIONS = "OPTIONS"  # option haggling
    TLS_HANDSHAKE = "TLS_HANDSHAKE"  # STARTTLS acknowledged: bytes belong to TLS until tls_established()
    TRANSMISSION = "TRANSMISSION"
    DISCONNECTING = "DISCONNECTING"  # NBD_CMD_DISC sent: the server finishes in-flight requests, then closes
    CLOSED = "CLOSED"
    ERROR = "ERROR"

    __hash__ = object.__hash__  # see Role


class _NeedData:
    """Sentinel returned by next_event() when more bytes are needed."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA = _NeedData()


# (state, sender) -> {message class: next state}. Refinements live in ``_next_state``:
# the ACK to GO / ABORT / STARTTLS (ACK_TRANSITIONS) and NBD_CMD_DISC.
TRANSITIONS: dict[tuple[State, Role], dict[type[ev.Event], State]] = {
    (State.GREETING, SERVER): {
        ev.NewstyleGreeting: State.CLIENT_FLAGS,
        ev.OldstyleGreeting: State.TRANSMISSION,
    },
    (State.CLIENT_FLAGS, CLIENT): {ev.ClientFlags: State.OPTIONS},
    (State.OPTIONS, CLIENT): {ev.Option: State.OPTIONS},
    (State.OPTIONS, SERVER): {ev.OptionReply: State.OPTIONS, ev.ExportNameReply: State.TRANSMISSION},
    (State.TRANSMISSION, CLIENT): {ev.Request: State.TRANSMISSION},
    (State.TRANSMISSION, SERVER): {ev.SimpleReply: State.TRANSMISSION, ev.Chunk: State.TRANSMISSION},
    (State.DISCONNECTING, SERVER): {ev.SimpleReply: State.DISCONNECTING, ev.Chunk: State.DISCONNECTING},
}
ACK_TRANSITIONS: dict[int, State] = {
    Opt.GO: State.TRANSMISSION,
    Opt.ABORT: State.CLOSED,
    Opt.STARTTLS: State.TLS_HANDSHAKE,
}
