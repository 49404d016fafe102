"""Where a broken rule becomes an exception or a Violation: the one conversion point.

``Checker`` is a mixin of ``Connection`` (its attributes are set up there): ``_check`` holds the
message being processed (``_sender``, ``_raw``) to the rules binding its sender's role.
"""

from __future__ import annotations

import bisect

from . import _events as ev
from . import _wire as w
from . import requirements as _req
from ._constants import (
    STRING_MAX,
    STRING_RECOMMENDED_MAX,
    Cmd,
    ReplyType,
)
from ._errors import LocalProtocolError, RemoteProtocolError, Violation
from ._state import State
from .requirements import MANDATORY_LEVELS

_KNOWN_CMDS = frozenset(int(c) for c in Cmd)
_KNOWN_REPLY_TYPES = frozenset(int(t) for t in ReplyType)
_DATA_CAP = 64  # bytes of offending data kept in a Violation


# Where the ids of rules that held on our own messages go: a set nobody reads (bounded by the number of
# ids), so recording costs one C call whoever sent the message.
UNRECORDED: set[str] = set()


def _power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


class _Reply:
    """Bookkeeping of one request in flight: what its reply has covered so far.

    ``command`` and ``flags`` are the request's as plain ints (the per-chunk checks must not pay for
    IntEnum / IntFlag arithmetic).
    """

    __slots__ = (
        "chunks",
        "command",
        "content_chunks",
        "contexts",
        "covered",
        "covered_bytes",
        "effect",
        "error",
        "error_offsets",
        "flags",
        "plain_errors",
        "request",
        "view",
        "wanted",
    )

    def __init__(self, request: ev.Request, view: memoryview | None = None) -> None:
        self.request = request
        self.command = int(request.command)
        self.flags = int(request.flags)
        self.view = view  # request.read_buffer as a byte view
        self.chunks = 0
        self.content_chunks = 0
        self.covered: list[tuple[int, int]] = []  # sorted, non-overlapping [start, end)
        self.covered_bytes = 0
        self.error = 0
        self.contexts: set[int] = set()
        self.plain_errors = 0  # NBD_REPLY_TYPE_ERROR chunks seen
        self.error_offsets: list[int] = []  # offsets of ERROR_OFFSET chunks seen
        # How much of the export the request is about, and which contexts a BLOCK_STATUS asked for
        # (None = every negotiated one). The payload form of BLOCK_STATUS changes both: the header's
        # length is then the payload length and "C: 64 bits, effect length" is inside the payload.
        self.effect: int | None = request.length
        self.wanted: tuple[int, ...] | None = None

    def overlaps(self, start: int, end: int) -> bool:
        i = bisect.bisect_left(self.covered, (start, start))
        if i < len(self.covered) and self.covered[i][0] < end:
            return True
        return i > 0 and self.covered[i - 1][1] > start

    def cover(self, start: int, end: int) -> None:
        bisect.insort(self.covered, (start, end))
        self.covered_bytes += end - start


class Checker:
    """Mixin: rule checks and the conversion of breaches (attributes come from Connection)."""

    def _check(self, ok: object, req_id: str, message: str, *, fatal: bool = False,
               tolerated: bool = False) -> bool:
        """Enforce one catalogued rule on the message being processed; True when it holds.

        On our own message a breach raises LocalProtocolError (unless local checks are off); on the
        peer's it records a Violation, raised later if its level is fatal or ``fatal`` (the stream
        cannot be parsed on).  ``tolerated``: recorded, never fatal, because a rule of ours says to go on
        (an undefined handshake flag: "a client SHOULD ignore" it, HS-005).  A rule checked on the peer's
        message goes into ``checked`` (not when it broke and its check is switched off: then nothing was
        judged).
        """
        if ok:
            self._record(req_id)
            return True
        r = _req.get(req_id)
        ours = self._sender is self.role
        if not self.strictness.enabled(req_id):
            if ours and r.level in MANDATORY_LEVELS:
                self.local_breach = True
            return True
        if not ours:
            self.checked.add(req_id)
        v = Violation(
            req_id=req_id,
            level=r.level,
            binds=r.binds,
            message=message,
            data=self._raw[:_DATA_CAP],
            direction=self._sender.value,
        )
        if ours:
            # Our own breach: refused when its level is fatal (or its id is in ``refuse``), otherwise
            # only noted (a SHOULD we skip).
            if self.strictness.refuses(req_id, v.level):
                raise LocalProtocolError(f"{req_id}: {message}", violation=v)
            if r.level in MANDATORY_LEVELS:
                # Sent on purpose: the peer may now hard-disconnect ("Either party may hard-disconnect on
                # detecting a violation of a mandatory requirement", DISC-003 / DISC-017), so its EOF
                # is not held against it.
                self.local_breach = True
            self.transcript.note("!", "local", f"sent anyway: {v}")
            return False
        if tolerated:
            self.violations.append(v)
            self.transcript.note("!", "violation", f"{v} (ignored, as the spec asks)", len(v.data))
            return False
        self._found.append(v)
        if fatal:
            self._fatal_ids.add(id(v))
        return False

    def _string(self, s: str, what: str) -> None:
        """General string rules (Conventions): UTF-8, no NUL, at most 4096 bytes (256 recommended)."""
        b = w.enc_str(s)
        self._check(len(b) <= STRING_MAX, "GEN-003", f"{what} is {len(b)} bytes, more than 4096")
        self._check(b"\0" not in b, "GEN-001", f"{what} contains a NUL byte")
        self._check(w.is_valid_utf8(s), "GEN-001", f"{what} is not valid UTF-8")
        self._check(len(b) <= STRING_RECOMMENDED_MAX, "GEN-002", f"{what} is {len(b)} bytes, more than 256")

    def _record_violations(self) -> None:
        fatal = None
        for v in self._found:
            self.violations.append(v)
            self.transcript.note("!", "violation", str(v), len(v.data))
            if fatal is None and (id(v) in self._fatal_ids or self.strictness.is_fatal(v.level)):
                fatal = v
        self._found = []
        if fatal is not None:
            self._state = State.ERROR
            raise RemoteProtocolError(f"{fatal.req_id}: {fatal.message}", violation=fatal)

    def _violation_now(self, req_id: str, message: str, raw: bytes, *, fatal: bool = False) -> None:
        """A peer breach found while parsing, before any event exists.

        The parser may see the same header again after NEED_DATA; a breach is recorded once per message
        (``_parse_noted`` is cleared when the message is consumed).
        """
        if (req_id, message) in self._parse_noted:
            return
        self._parse_noted.add((req_id, message))
        self._sender, self._raw = self.peer, raw
        self._record = self.checked.add
        self._found, self._fatal_ids = [], set()
        self._check(False, req_id, message, fatal=fatal)
        if self._found:
            self._record_violations()

    def _fail(self, message: str, section: str | None = None) -> RemoteProtocolError:
        """The peer's bytes cannot be parsed on and no catalogued rule names the fault.

        ``section`` is the heading of proto.md (or of the extended-headers draft) that describes the
        expected bytes: the message names it, since there is no requirement id to look up. The
        resulting error has ``violation=None``.
        """
        if section:
            message = f"{message} (proto.md \"{section}\"; no catalogued requirement)"
        self._state = State.ERROR
        self.transcript.note("!", "error", message)
        return RemoteProtocolError(message)

    def _refuse_length(self, req_id: str | None, message: str, raw: bytes, section: str) -> RemoteProtocolError:
        """A length over a cap (``Strictness.max_*``), refused before anything is buffered.

        "Either side MAY hard-disconnect if a request or reply payload is large enough to be a denial of
        service" (BSZ-023). When the length also breaks a catalogued rule (``req_id``), that rule is the
        violation; otherwise the error has ``violation=None`` and names the spec section.
        """
        if req_id is not None:
            self._violation_now(req_id, message, raw, fatal=True)  # raises unless req_id is disabled
        return self._fail(message, section)
