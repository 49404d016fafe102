"""Strictness: which checks are on and which levels are fatal.

Every check is named by its requirement id, so a suite that wants to send illegal traffic on purpose
switches off exactly that id (``Strictness(disabled={"SR-006"})``) or all local checks
(``check_local=False``).  Our own breaches are refused when their level is fatal; ``refuse`` names ids
refused whatever their level (the reference client's strict mode refuses zero-length requests, a SHOULD
NOT, as libnbd does).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .requirements import MANDATORY_LEVELS

# By default the mandatory levels are fatal; a Strictness may choose others (``fatal_levels``).
DEFAULT_FATAL = MANDATORY_LEVELS


# The largest payload the core buffers (a hostile length beyond it is refused before any allocation).
PAYLOAD_CAP = 64 << 20


@dataclass(frozen=True, slots=True, kw_only=True)
class Strictness:
    """Frozen configuration of the checks of one connection.

    - ``disabled``: requirement ids whose check is skipped in both directions.
    - ``fatal_levels``: a peer violation at one of these levels raises RemoteProtocolError. Violations
      that leave the byte stream unparseable are always fatal.
    - ``refuse``: requirement ids whose breach in our own messages is refused (LocalProtocolError)
      whatever their level; without it a SHOULD-level breach is sent and noted in the transcript.
    - ``check_local``: when False, our own sends are never refused (fault injection); peer checks stay.
    - ``max_option_length``: option requests/replies longer than this are refused as a denial of service
      (BSZ-023 lets either side hard-disconnect); the spec's own string limit is 4096.
    - ``max_payload``: WRITE payloads / chunk lengths beyond this are refused before any allocation.
    """

    disabled: frozenset[str] = field(default_factory=frozenset)
    fatal_levels: frozenset[str] = DEFAULT_FATAL
    refuse: frozenset[str] = field(default_factory=frozenset)
    check_local: bool = True
    max_option_length: int = 65536 + 4096
    max_payload: int = PAYLOAD_CAP

    def __post_init__(self) -> None:
        object.__setattr__(self, "disabled", frozenset(self.disabled))
        object.__setattr__(self, "fatal_levels", frozenset(self.fatal_levels))
        object.__setattr__(self, "refuse", frozenset(self.refuse))

    def enabled(self, req_id: str) -> bool:
        return req_id not in self.disabled

    def is_fatal(self, level: str) -> bool:
        return level in self.fatal_levels

    def refuses(self, req_id: str, level: str) -> bool:
        """Whether our own breach of ``req_id`` (at ``level``) is refused rather than sent and noted."""
        return self.check_local and (level in self.fatal_levels or req_id in self.refuse)

    @classmethod
    def lenient(cls) -> Strictness:
        """Record every peer violation but never raise for it; never refuse our own sends."""
        return cls(fatal_levels=frozenset(), check_local=False)
