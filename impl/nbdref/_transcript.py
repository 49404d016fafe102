"""Wire transcript in proto.md's ``C:``/``S:`` notation.

Entries keep the event and format it only when read, so the data path pays one small object per
message; a payload is kept as a `Preview` (length and first 16 bytes), never the buffer itself; ``max_entries`` keeps the head and the tail with an "... N omitted" line in between, and
``enabled=False`` switches recording off (benchmarks).
"""

from __future__ import annotations

import dataclasses
import enum
from collections import deque
from collections.abc import Iterator
from typing import Any

from . import _events as ev
from ._constants import Cmd, CmdFlag, Info, Opt, Rep, ReplyType, TxFlag
from ._constants import Err as _Err

_PREVIEW = 16


def _name(enum_cls: type[enum.IntEnum], prefix: str, value: int) -> str:
    try:
        return prefix + enum_cls(value).name
    except ValueError:
        return f"{prefix}{value:#x}"


def _flags(flag_cls: type[enum.IntFlag], value: int) -> str:
    value = int(value)  # plain int: ``~`` on an IntFlag would hide the undefined bits shown below
    if not value:
        return "0"
    names = [m.name for m in flag_cls if m.value & value and m.value == (m.value & -m.value)]
    known = 0
    for m in flag_cls:
        known |= m.value
    out = "|".join(dict.fromkeys(n for n in names if n))
    rest = value & ~known
    if rest:
        out = f"{out}|{rest:#x}" if out else f"{rest:#x}"
    return out


class Preview(bytes):
    """What a transcript keeps of a payload: its first ``_PREVIEW`` bytes and its length ``nbytes``.

    Recording an event must not keep its (possibly megabytes-long) buffer alive.
    """

    nbytes: int

    def __new__(cls, head: bytes, nbytes: int) -> Preview:
        self = super().__new__(cls, head)
        self.nbytes = nbytes
        return self

    def __repr__(self) -> str:
        return f"Preview({bytes(self)!r}, nbytes={self.nbytes})"


def _nbytes(b: Any) -> int:
    return b.nbytes if isinstance(b, Preview) else memoryview(b).nbytes


def _bytes(b: Any) -> str:
    if b is None:
        return "in-place"
    n = _nbytes(b)
    head = bytes(memoryview(b).cast("B")[:_PREVIEW]).hex()
    return f"<{n} bytes {head}{'...' if n > _PREVIEW else ''}>"


# Event types that can carry a large buffer, and the field holding it.
_BUFFER_FIELD: dict[type, str] = {
    ev.Request: "payload",
    ev.SimpleReply: "data",
    ev.OffsetData: "data",
    ev.UnknownChunk: "data",
    ev.OptUnknown: "data",
    ev.RepUnknown: "data",
    ev.RepInfoUnknown: "data",
}


def summarize(e: ev.Event) -> ev.Event:
    """``e`` with a payload longer than ``_PREVIEW`` bytes replaced by its `Preview`."""
    name = _BUFFER_FIELD.get(type(e))
    if name is None:
        return e
    b = getattr(e, name)
    if b is None or isinstance(b, Preview):
        return e
    mv = memoryview(b)
    if mv.nbytes <= _PREVIEW:
        return e
    preview = Preview(bytes(mv.cast("B")[:_PREVIEW]), mv.nbytes)
    if type(e) is ev.OffsetData and e.length < 0:  # type: ignore[attr-defined]
        return dataclasses.replace(e, data=preview, length=mv.nbytes)  # type: ignore[arg-type]
    return dataclasses.replace(e, **{name: preview})  # type: ignore[arg-type]


def describe(e: ev.Event) -> str:
    """One line for an event: the spec's message name, then decoded fields."""
    if isinstance(e, ev.Option):
        s = _name(Opt, "NBD_OPT_", e.option)
        if isinstance(e, ev.OptExportName):
            return f'{s} export="{e.name}"'
        if isinstance(e, ev.OptInfo | ev.OptGo):
            info = ",".join(_name(Info, "NBD_INFO_", i) for i in e.info)
            return f'{s} export="{e.name}" info=[{info}]'
        if isinstance(e, ev.OptListMetaContext | ev.OptSetMetaContext):
            return f'{s} export="{e.name}" queries={list(e.queries)}'
        data = e.data  # type: ignore[attr-defined]
        extra = f" reason={e.reason!r}" if isinstance(e, ev.OptUnknown) and e.reason else ""
        return f"{s} data={_bytes(data)}{extra}" if data else s + extra
    if isinstance(e, ev.OptionReply):
        rt = _name(Rep, "NBD_REP_", e.reply_type)
        to = _name(Opt, "NBD_OPT_", e.option)
        if isinstance(e, ev.RepInfoExport):
            fl = _flags(TxFlag, e.transmission_flags)
            return f"{rt} NBD_INFO_EXPORT size={e.export_size} flags={fl} (to {to})"
        if isinstance(e, ev.RepInfoName):
            return f'{rt} NBD_INFO_NAME name="{e.name}" (to {to})'
        if isinstance(e, ev.RepInfoDescription):
            return f'{rt} NBD_INFO_DESCRIPTION "{e.description}" (to {to})'
        if isinstance(e, ev.RepInfoBlockSize):
            return f"{rt} NBD_INFO_BLOCK_SIZE min={e.minimum} pref={e.preferred} max={e.maximum} (to {to})"
        if isinstance(e, ev.RepInfoUnknown):
            return f"{rt} info_type={e.info_type} data={_bytes(e.data)} (to {to})"
        if isinstance(e, ev.RepServer):
            return f'{rt} name="{e.name}"' + (f' details="{e.details}"' if e.details else "") + f" (to {to})"
        if isinstance(e, ev.RepMetaContext):
            return f'{rt} id={e.context_id} name="{e.name}" (to {to})'
        if isinstance(e, ev.RepError):
            return f"{rt} (to {to})" + (f' message="{e.message}"' if e.message else "")
        if isinstance(e, ev.RepUnknown):
            return f"{rt} data={_bytes(e.data)} (to {to})"
        return f"{rt} (to {to})"
    if isinstance(e, ev.Request):
        s = f"{_name(Cmd, 'NBD_CMD_', e.command)} cookie={e.cookie} offset={e.offset} length={e.length}"
        if e.flags:
            s += f" flags={_flags(CmdFlag, e.flags)}"
        if e.payload is not None:
            s += f" payload={_bytes(e.payload)}"
        return s
    if isinstance(e, ev.SimpleReply):
        s = f"simple reply cookie={e.cookie} error={e.error}"
        return s + (f" data={_bytes(e.data)}" if e.data is not None or e.in_place else "")
    if isinstance(e, ev.Chunk):
        rtype = ReplyType.ERROR_OFFSET if isinstance(e, ev.ErrorChunk) and e.offset is not None else e.reply_type
        rt = _name(ReplyType, "NBD_REPLY_TYPE_", rtype)
        s = f"{rt} cookie={e.cookie}{' DONE' if e.done else ''}"
        if isinstance(e, ev.OffsetData):
            # length=-1 on a sent event means "len(data)": show the number of bytes that went out.
            n = e.length if e.length >= 0 or e.data is None else _nbytes(e.data)
            return f"{s} offset={e.offset} length={n} data={_bytes(e.data)}"
        if isinstance(e, ev.OffsetHole):
            return f"{s} offset={e.offset} length={e.length}"
        if isinstance(e, ev.BlockStatus):
            shown = ", ".join(f"{n}:{f:#x}" for n, f in e.extents[:4])
            more = f", ... {len(e.extents)} extents" if len(e.extents) > 4 else ""
            ext = "_EXT" if e.extended else ""
            return f"{rt}{ext} cookie={e.cookie}{' DONE' if e.done else ''} id={e.context_id} [{shown}{more}]"
        if isinstance(e, ev.ErrorChunk):
            off = "" if e.offset is None else f" offset={e.offset}"
            return f'{s} error={_name(_Err, "NBD_", e.error)}{off} message="{e.message}"'
        if isinstance(e, ev.UnknownChunk):
            return f"{s} data={_bytes(e.data)}"
        return s
    if isinstance(e, ev.NewstyleGreeting):
        return f"NBDMAGIC IHAVEOPT handshake_flags={e.flags:#06x}"
    if isinstance(e, ev.OldstyleGreeting):
        fl = _flags(TxFlag, e.transmission_flags)
        return f"NBDMAGIC cliserv_magic (oldstyle) size={e.export_size} flags={fl}"
    if isinstance(e, ev.ClientFlags):
        return f"client_flags={e.flags:#010x}"
    if isinstance(e, ev.ExportNameReply):
        fl = _flags(TxFlag, e.transmission_flags)
        z = "" if e.zeroes is None else (" +124 zeroes" if e.zeroes else " (no zeroes)")
        return f"export size={e.export_size} flags={fl}{z}"
    return type(e).__name__





class Entry:
    """One transcript line: who sent it, what kind of message, how many bytes."""

    __slots__ = ("_event", "_text", "direction", "kind", "nbytes", "time_ns")

    def __init__(
        self,
        direction: str,
        kind: str,
        nbytes: int,
        event: ev.Event | None = None,
        text: str | None = None,
        time_ns: int | None = None,
    ) -> None:
        self.direction = direction
        self.kind = kind
        self.nbytes = nbytes
        self.time_ns = time_ns
        self._event = event
        self._text = text

    @property
    def event(self) -> ev.Event | None:
        return self._event

    @property
    def text(self) -> str:
        if self._text is None:
            self._text = describe(self._event) if self._event is not None else self.kind
        return self._text

    def __str__(self) -> str:
        return f"{self.direction}: {self.text}"

    def __repr__(self) -> str:
        return f"Entry({self.direction!r}, {self.kind!r}, {self.text!r}, nbytes={self.nbytes})"


class Transcript:
    """Ordered entries, optionally capped (head and tail kept) or switched off."""

    def __init__(self, max_entries: int | None = None, enabled: bool = True) -> None:
        self.enabled = enabled
        self.max_entries = max_entries
        self._head: list[Entry] = []
        self._tail: deque[Entry] | None = None
        self.omitted = 0
        if max_entries is not None:
            self._tail = deque(maxlen=max(1, max_entries - max_entries // 2))

    def add(self, entry: Entry) -> None:
        if not self.enabled:
            return
        if self.max_entries is None or len(self._head) < self.max_entries // 2:
            self._head.append(entry)
            return
        assert self._tail is not None
        if len(self._tail) == self._tail.maxlen:
            self.omitted += 1
        self._tail.append(entry)

    def record(self, direction: str, event: ev.Event, nbytes: int) -> None:
        """Add ``event``; a payload is kept as a `Preview` (length and first bytes), not the buffer."""
        if self.enabled:
            self.add(Entry(direction, type(event).__name__, nbytes, event=summarize(event)))

    def note(self, direction: str, kind: str, text: str, nbytes: int = 0) -> None:
        if self.enabled:
            self.add(Entry(direction, kind, nbytes, text=text))

    def __iter__(self) -> Iterator[Entry]:
        yield from self._head
        if self._tail:
            yield from self._tail

    def __len__(self) -> int:
        return len(self._head) + (len(self._tail) if self._tail else 0)

    def lines(self) -> list[str]:
        out = [str(e) for e in self._head]
        if self.omitted:
            out.append(f"... {self.omitted} omitted")
        if self._tail:
            out.extend(str(e) for e in self._tail)
        return out

    def __str__(self) -> str:
        return "\n".join(self.lines())
