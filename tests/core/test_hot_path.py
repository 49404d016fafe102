"""The per-request path builds no enum values and does no IntFlag arithmetic (a guard, not a timing).

IntFlag ``&``/``|``/``~`` run Python code and build a new flag object each time (~0.8 µs), and
``Cmd(x)``/``CmdFlag(x)`` cost ~0.4 µs: a handful per request doubled the cost of a round trip
(``benchmarks/bench_core.py``). Counting those calls during steady-state round trips catches a
regression without measuring time. The transcript stays on: it formats lazily, so recording costs no
enum work either.
"""

from __future__ import annotations

import enum
from collections.abc import Callable

import pytest
from nbdref import NEED_DATA, ClientFlag, Cmd, CmdFlag, HandshakeFlag, ReplyFlag, StateFlag, TxFlag
from nbdref import events as ev

from .helpers import ConnectionPair

_FLAG_OPS = ("__and__", "__or__", "__xor__", "__invert__", "__rand__", "__ror__", "__rxor__")
# Enum creation copies some operators into each flag class, so each class is hooked.
_FLAG_CLASSES = (enum.Flag, enum.IntFlag, CmdFlag, TxFlag, HandshakeFlag, ClientFlag, ReplyFlag, StateFlag)


def _hook(monkeypatch: pytest.MonkeyPatch, calls: list[str]) -> None:
    """Record every IntFlag operator call and every enum value lookup (``Cmd(0)``, ``CmdFlag(5)``)."""

    def counting(name: str, original: Callable) -> Callable:
        def wrapper(*args, **kwargs):
            calls.append(name)
            return original(*args, **kwargs)

        return wrapper

    for cls in _FLAG_CLASSES:
        for op in _FLAG_OPS:
            if op in cls.__dict__:
                monkeypatch.setattr(cls, op, counting(f"{cls.__name__}.{op}", cls.__dict__[op]))
    monkeypatch.setattr(enum.EnumType, "__call__", counting("EnumType.__call__", enum.EnumType.__call__))


def _round_trip(p: ConnectionPair, cookie: int, structured: bool, buf: bytearray) -> None:
    c, s = p.client, p.server
    s.receive_data(
        c.send(ev.Request(cookie=cookie, command=Cmd.READ, flags=0, offset=512, length=8, read_buffer=buf))
    )
    req = s.next_event()
    assert isinstance(req, ev.Request) and s.next_event() is NEED_DATA
    reply = (
        ev.OffsetData(cookie=cookie, offset=512, data=b"12345678")
        if structured
        else ev.SimpleReply(cookie=cookie, data=b"12345678")
    )
    for part in s.send_iov(reply):
        c.receive_data(part)
    got = []
    while (e := c.next_event()) is not NEED_DATA:
        got.append(e)
    assert isinstance(got[-1], ev.ReplyComplete) and got[-1].error == 0


@pytest.mark.parametrize("structured", [False, True], ids=["simple", "structured"])
def test_round_trips_do_no_enum_work(structured: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    p = ConnectionPair()
    p.handshake(structured=structured)
    buf = bytearray(8)
    _round_trip(p, 1, structured, buf)  # warms the caches (e.g. the CmdFlag value of flags=0)
    calls: list[str] = []
    _hook(monkeypatch, calls)
    for cookie in range(2, 6):
        _round_trip(p, cookie, structured, buf)
    monkeypatch.undo()
    assert calls == []
    assert buf == b"12345678" and p.client.violations == [] and p.server.violations == []


def test_the_guard_sees_enum_work(monkeypatch: pytest.MonkeyPatch) -> None:
    """The hooks fire on IntFlag arithmetic and enum construction (the guard above can fail)."""
    calls: list[str] = []
    _hook(monkeypatch, calls)
    assert CmdFlag.FUA & 1
    assert ~TxFlag.HAS_FLAGS
    assert Cmd(0) is Cmd.READ
    monkeypatch.undo()
    assert "CmdFlag.__and__" in calls
    assert any(c.endswith(".__invert__") for c in calls)
    assert "EnumType.__call__" in calls
