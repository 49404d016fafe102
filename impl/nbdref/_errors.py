"""Exceptions of the core and the Violation record.

As in h11: ``LocalProtocolError`` means *we* were about to break the protocol (the message was not
sent), ``RemoteProtocolError`` means the peer did. Both derive from ``ProtocolError`` so a driver
can catch one class; nothing else ever escapes ``next_event()``.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True, kw_only=True)
class Violation:
    """One breach of a catalogued requirement, seen on the wire.

    ``direction`` is the sender of the offending message ("C" or "S"); ``data`` is the offending
    bytes (the whole message where possible, capped).
    """

    req_id: str
    level: str
    binds: str
    message: str
    data: bytes = b""
    direction: str = ""

    def __str__(self) -> str:
        return f"{self.req_id} ({self.level}, {self.binds}): {self.message}"


class ProtocolError(Exception):
    """Base class: the protocol could not continue as asked."""

    def __init__(self, message: str, *, violation: Violation | None = None) -> None:
        super().__init__(message)
        self.violation = violation


class LocalProtocolError(ProtocolError):
    """We tried to send something the rules binding our role forbid (nothing was sent)."""


class RemoteProtocolError(ProtocolError):
    """The peer broke the protocol so that this connection cannot go on."""
