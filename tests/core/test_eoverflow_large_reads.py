"""ERR-006: NBD_EOVERFLOW for a structured READ over the maximum payload is documented behaviour.

Through the in-memory pair and the outcome table (``_outcome.judge``); qemu 10.0 / 11.1 answer large
reads that way.
"""

from __future__ import annotations

import pytest
from nbdref import Cmd, Err, Strictness, TxFlag
from nbdref import _outcome as outcome
from nbdref import events as ev

from .helpers import ConnectionPair, ids, send_lenient

NO_FATAL = Strictness(fatal_levels=frozenset())


# ---------------------------------------------------------------------------- ERR-006
# "The server SHOULD NOT return NBD_EOVERFLOW except as documented in response to NBD_CMD_READ when
# NBD_CMD_FLAG_DF is supported, or when a command without payload requests a length larger than an
# advertised maximum payload length" (ERR-006); proto.md, NBD_CMD_READ with structured replies: "A server
# MAY support read requests larger than the maximum payload size by splitting the response across
# multiple chunks ...; however, the server is also permitted to reject large read requests up front with
# NBD_EOVERFLOW".

BIG = 1 << 30


def _eoverflow_read(length: int, *, structured: bool = True, block_size=None) -> ConnectionPair:
    p = ConnectionPair(server=NO_FATAL)  # the simple-reply case has the client break BSZ-025
    p.handshake(structured=structured, export_size=BIG, block_size=block_size)
    send_lenient(p, p.client, ev.Request(cookie=1, command=Cmd.READ, length=length))
    if structured:
        p.send(p.server, ev.ErrorChunk(cookie=1, error=Err.EOVERFLOW, message="too large"))
    else:
        p.send(p.server, ev.SimpleReply(cookie=1, error=Err.EOVERFLOW))
    return p


@pytest.mark.parametrize(
    ("length", "block_size", "flagged"),
    [
        ((1 << 25) + 512, None, False),  # over the 2^25 default maximum payload
        (1 << 25, None, True),  # not over it
        ((1 << 20) + 512, (512, 4096, 1 << 20), False),  # over the advertised maximum
        (1 << 20, (512, 4096, 1 << 20), True),
        ((1 << 25) + 512, (512, 4096, 1 << 26), True),  # the advertised maximum is larger than 2^25
    ],
)
def test_eoverflow_for_a_large_structured_read(length, block_size, flagged):
    p = _eoverflow_read(length, block_size=block_size)
    assert ("ERR-006" in ids(p.client)) is flagged
    # Our own server side notes a SHOULD it breaks in the transcript ("sent anyway"): only when flagged.
    assert ("ERR-006" in str(p.server.transcript)) is flagged


def test_eoverflow_for_a_simple_reply_read_is_still_flagged():
    # With simple replies a READ over the maximum is the client's breach (BSZ-025); nothing documents
    # EOVERFLOW for it.
    p = _eoverflow_read(1 << 20, structured=False, block_size=(512, 4096, 65536))
    assert "ERR-006" in ids(p.client)


def test_outcome_eoverflow_table():
    st = outcome.Negotiated(
        export_size=BIG, transmission_flags=TxFlag.HAS_FLAGS, min_block=None, max_payload=None, contexts=0,
        structured=True,
    )
    assert outcome.judge(Cmd.READ, 0, 0, (1 << 25) + 1, Err.EOVERFLOW, st) == []
    assert [r for r, _ in outcome.judge(Cmd.READ, 0, 0, 1 << 25, Err.EOVERFLOW, st)] == ["ERR-006"]
    simple = outcome.Negotiated(
        export_size=BIG, transmission_flags=TxFlag.HAS_FLAGS, min_block=None, max_payload=None, contexts=0
    )
    assert [r for r, _ in outcome.judge(Cmd.READ, 0, 0, (1 << 25) + 1, Err.EOVERFLOW, simple)] == ["ERR-006"]
