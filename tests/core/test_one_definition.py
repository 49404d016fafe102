"""One home for each fact: every protocol fact the package uses is defined once in ``impl/nbdref`` and
imported everywhere else, and the values did not move when the copies went.

The scans read the sources (AST, docstrings excluded), so a copy that comes back fails here.
"""

from __future__ import annotations

import ast
import itertools
import re
import struct
from pathlib import Path

import pytest
from nbdref import Cmd, CmdFlag, Strictness
from nbdref import _constants as k
from nbdref import _wire as w
from nbdref import events as ev

PACKAGE = Path(k.__file__).parent
SOURCES = sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def rel(path: Path) -> str:
    return path.relative_to(PACKAGE).as_posix()


def _docstrings(tree: ast.AST) -> set[int]:
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                out.add(id(body[0].value))
    # Attribute docstrings: a string statement right after an assignment.
    for node in ast.walk(tree):
        for field in ("body", "orelse"):
            stmts = getattr(node, field, None)
            if isinstance(stmts, list):
                for a, b in itertools.pairwise(stmts):
                    if isinstance(a, ast.Assign | ast.AnnAssign) and isinstance(b, ast.Expr) \
                            and isinstance(b.value, ast.Constant) and isinstance(b.value.value, str):
                        out.add(id(b.value))
    return out


def _int_value(node: ast.AST) -> int | None:
    """The value of an integer constant expression (``1 << 25``, ``32 * 1024 * 1024``), else None."""
    if isinstance(node, ast.Constant) and type(node.value) is int:
        return node.value
    if isinstance(node, ast.BinOp):
        a, b = _int_value(node.left), _int_value(node.right)
        if a is None or b is None:
            return None
        ops = {ast.LShift: lambda x, y: x << y, ast.Mult: lambda x, y: x * y, ast.Pow: lambda x, y: x**y,
               ast.Add: lambda x, y: x + y, ast.Sub: lambda x, y: x - y}
        op = ops.get(type(node.op))
        return op(a, b) if op is not None and not (isinstance(node.op, ast.Pow) and b > 64) else None
    return None


def _assigned_name(tree: ast.AST, target: ast.AST) -> str:
    """The name a module-level assignment gives ``target`` (``""`` if it is not such a value)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and node.value is target and isinstance(node.targets[0], ast.Name):
            return node.targets[0].id
        if isinstance(node, ast.AnnAssign) and node.value is target and isinstance(node.target, ast.Name):
            return node.target.id
    return ""


def int_spellings(value: int) -> list[tuple[str, int, str]]:
    """(module, line, name it is assigned to) of every constant expression equal to ``value``."""
    found = []
    for path in SOURCES:
        tree = ast.parse(path.read_text())
        inner = {id(n) for node in ast.walk(tree) if isinstance(node, ast.BinOp) and _int_value(node) is not None
                 for n in (node.left, node.right)}
        for node in ast.walk(tree):
            if id(node) not in inner and _int_value(node) == value:
                found.append((rel(path), node.lineno, _assigned_name(tree, node)))
    return found


def string_spellings(match) -> list[tuple[str, int]]:
    """(module, line) of every string constant (docstrings excluded) for which ``match(s)`` holds."""
    found = []
    for path in SOURCES:
        tree = ast.parse(path.read_text())
        docs = _docstrings(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs \
                    and match(node.value):
                found.append((rel(path), node.lineno))
    return found


# ---------------------------------------------------------------- the default maximum payload, 2^25


def test_default_max_payload_is_defined_once():
    # "Absent advertised constraints ... payloads of at most 2^25 bytes" (BSZ-008); qemu-nbd advertises the
    # same number as its own maximum: a second fact, under a name that says so.
    assert k.DEFAULT_MAX_PAYLOAD == 1 << 25
    assert sorted((m, name) for m, _, name in int_spellings(1 << 25)) == [
        ("_constants.py", "DEFAULT_MAX_PAYLOAD"), ("personas.py", "_QEMU_MAX_PAYLOAD")]


def test_default_max_payload_users_import_it():
    from nbdref import client, personas
    from nbdref.server import _commands

    assert not hasattr(_commands, "MAX_EXTENTS") and _commands.DEFAULT_MAX_PAYLOAD is k.DEFAULT_MAX_PAYLOAD
    assert not hasattr(client, "_DEFAULT_MAX_PAYLOAD") and client.DEFAULT_MAX_PAYLOAD is k.DEFAULT_MAX_PAYLOAD
    assert ev.RepInfoBlockSize(option=7) == ev.RepInfoBlockSize(option=7, minimum=1, preferred=4096, maximum=1 << 25)
    assert personas.get(None).info_block_size == (1, 4096, 1 << 25)
    assert personas.get("qemu-7.2").info_block_size == (1, 4096, 32 << 20)
    assert personas.get("qemu-2.10").info_block_size == (512, 4096, 32 << 20)


# ---------------------------------------------------------------- which transmission flag a command needs


def _tables_of_tx_flags(path: Path) -> list[int]:
    """Lines of dict entries / pairs that map a Cmd or CmdFlag member to a TxFlag member."""
    def member(node: ast.AST | None, cls: str) -> bool:
        return isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == cls

    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Dict):
            out += [v.lineno for key, v in zip(node.keys, node.values, strict=True)
                    if (member(key, "Cmd") or member(key, "CmdFlag")) and member(v, "TxFlag")]
        elif isinstance(node, ast.Tuple) and len(node.elts) == 2 and member(node.elts[1], "TxFlag") \
                and (member(node.elts[0], "Cmd") or member(node.elts[0], "CmdFlag")):
            out.append(node.lineno)
    return out


def test_transmission_flag_tables_live_in_constants():
    where = {rel(p): lines for p in SOURCES if (lines := _tables_of_tx_flags(p))}
    assert list(where) == ["_constants.py"], where


def test_server_uses_the_core_tables():
    from nbdref.server import _commands

    assert not hasattr(_commands, "_NEEDS_TXFLAG") and not hasattr(_commands, "_FLAG_NEEDS_TXFLAG")
    assert _commands.COMMAND_NEEDS_TXFLAG is k.COMMAND_NEEDS_TXFLAG
    assert _commands.FLAG_NEEDS_TXFLAG is k.FLAG_NEEDS_TXFLAG
    # The values the server's old copy held.
    assert k.COMMAND_NEEDS_TXFLAG == {
        Cmd.FLUSH: k.TxFlag.SEND_FLUSH, Cmd.TRIM: k.TxFlag.SEND_TRIM, Cmd.CACHE: k.TxFlag.SEND_CACHE,
        Cmd.WRITE_ZEROES: k.TxFlag.SEND_WRITE_ZEROES, Cmd.RESIZE: k.TxFlag.SEND_RESIZE}
    assert k.FLAG_NEEDS_TXFLAG == {CmdFlag.FUA: k.TxFlag.SEND_FUA, CmdFlag.DF: k.TxFlag.SEND_DF,
                                   CmdFlag.FAST_ZERO: k.TxFlag.SEND_FAST_ZERO}


# ---------------------------------------------------------------- BLOCK_STATUS payload decoding


def test_server_decodes_the_block_status_payload_with_the_codec(monkeypatch):
    from nbdref.server import _commands

    assert not hasattr(_commands.Executor, "_payload_effect_length")
    calls = []
    real = w.decode_block_status_payload

    def spy(data):
        calls.append(bytes(data))
        return real(data)

    monkeypatch.setattr(w, "decode_block_status_payload", spy)
    payload = w.encode_block_status_payload(4096, (1, 3))
    req = ev.Request(cookie=1, command=Cmd.BLOCK_STATUS, flags=CmdFlag.PAYLOAD_LEN, length=len(payload),
                     payload=payload)
    assert _commands.Executor._payload_form(req) == (4096, (1, 3)) and calls == [payload]
    bad = ev.Request(cookie=1, command=Cmd.BLOCK_STATUS, flags=CmdFlag.PAYLOAD_LEN, length=10, payload=bytes(10))
    with pytest.raises(_commands.RequestError) as info:
        _commands.Executor._payload_form(bad)
    assert info.value.error == k.Err.EINVAL and "8 + 4n" in info.value.message


# ---------------------------------------------------------------- struct layouts


def _format_strings(path: Path) -> list[int]:
    """Lines where a struct format string is packed, unpacked or compiled."""
    names = {"pack", "unpack", "unpack_from", "pack_into", "iter_unpack", "calcsize", "Struct"}
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str) and re.fullmatch(r"[<>!=@]?[\dxcbB?hHiIlLqQnNefdspP]+",
                                                                         node.args[0].value):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name in names:
                out.append(node.lineno)
    return out


def test_struct_layouts_live_in_wire():
    where = {rel(p): lines for p in SOURCES if (lines := _format_strings(p))}
    assert list(where) == ["_wire.py"], where
    for path in SOURCES:
        if rel(path) not in ("_wire.py", "_buffer.py"):  # _buffer: the Struct type, for annotations
            assert not re.search(r"^\s*(import struct|from struct import)", path.read_text(), re.M), rel(path)


def test_fault_bytes_did_not_move():
    # The fault builders now use _wire's layouts; the bytes are those the hand-packed formats gave.
    from nbdref import faults
    from nbdref._constants import Err, Magic, ReplyType

    ctx = faults.ReplyContext(cookie=9, command=Cmd.READ, offset=4096, length=4, structured=True, extended=False,
                              data=b"abcd")
    ext = faults.ReplyContext(cookie=9, command=Cmd.READ, offset=4096, length=4, structured=True, extended=True,
                              data=b"abcd")
    assert faults._simple(ctx, error=5, data=b"xy") == struct.pack(">IIQ", Magic.SIMPLE_REPLY, 5, 9) + b"xy"
    assert faults._chunk(ctx, ReplyType.NONE, b"") == struct.pack(">IHHQI", Magic.STRUCTURED_REPLY, 1, 0, 9, 0)
    assert faults._chunk(ext, ReplyType.NONE, b"", flags=0, length=7) == struct.pack(
        ">IHHQQQ", Magic.EXTENDED_REPLY, 0, 0, 9, 4096, 7)
    assert faults.FAULTS["chunk-outside-range"].reply_bytes(ctx) == struct.pack(
        ">IHHQI", Magic.STRUCTURED_REPLY, 1, ReplyType.OFFSET_DATA, 9, 12) + struct.pack(">Q", 4100) + b"abcd"
    assert faults.FAULTS["error-chunk-bad-message-length"].reply_bytes(ctx) == struct.pack(
        ">IHHQI", Magic.STRUCTURED_REPLY, 1, ReplyType.ERROR, 9, 20) + struct.pack(">IH", Err.EIO, 200) + \
        b"injected error"
    assert faults.FAULTS["error-chunk-zero-error"].reply_bytes(ctx)[-6:] == struct.pack(">IH", 0, 0)
    assert faults.FAULTS["wrong-reply-magic"].reply_bytes(replace_ctx(ctx, structured=False)) == struct.pack(
        ">IIQ", 0xDEADBEEF, 0, 9) + b"abcd"


def replace_ctx(ctx, **kw):
    import dataclasses

    return dataclasses.replace(ctx, **kw)


# ---------------------------------------------------------------- meta-context names


def test_meta_context_names_are_spelled_once():
    names = (k.CONTEXT_BASE_ALLOCATION, k.CONTEXT_QEMU_ALLOCATION_DEPTH)
    found = string_spellings(lambda s: s in names or s.startswith(k.CONTEXT_QEMU_DIRTY_BITMAP_PREFIX)
                             or f"={k.CONTEXT_BASE_ALLOCATION}" in s)
    assert sorted({m for m, _ in found}) == ["_constants.py"], found
    assert len(found) == 3


def test_personas_names_are_the_constants():
    from nbdref import personas
    from nbdref.backends.bitmap import DirtyBitmap

    assert personas.BASE_ALLOCATION is k.CONTEXT_BASE_ALLOCATION == "base:allocation"
    assert personas.DIRTY_BITMAP is k.CONTEXT_QEMU_DIRTY_BITMAP_PREFIX == "qemu:dirty-bitmap:"
    assert personas.ALLOCATION_DEPTH is k.CONTEXT_QEMU_ALLOCATION_DEPTH == "qemu:allocation-depth"
    assert DirtyBitmap("b0", 1 << 20).context == "qemu:dirty-bitmap:b0"


# ---------------------------------------------------------------- MUST / SHOULD


def test_fatal_levels_are_spelled_once():
    from nbdref import _checker, _strict, requirements

    found = string_spellings(lambda s: s in ("MUST", "MUST NOT"))
    assert sorted({m for m, _ in found}) == ["requirements.py"], found
    mandatory = requirements.MANDATORY_LEVELS
    assert mandatory == frozenset({"MUST", "MUST NOT"})
    assert _strict.DEFAULT_FATAL is mandatory
    assert Strictness().fatal_levels == frozenset({"MUST", "MUST NOT"})
    assert _checker.MANDATORY_LEVELS is requirements.MANDATORY_LEVELS and not hasattr(_checker, "_MANDATORY")


# ---------------------------------------------------------------- the reference persona's name


def test_reference_persona_name_is_defined_once():
    from nbdref import personas
    from nbdref.server import Export, Server

    assert personas.DEFAULT == "nbdref"
    assert personas.get(None).name == personas.DEFAULT and personas.PERSONAS[personas.DEFAULT] is personas.get(None)
    server = Server([Export.memory("e", 4096)], host="127.0.0.1", port=0)
    try:
        assert server.persona.name == personas.DEFAULT
    finally:
        server.stop()
    # "nbdref" is also the implementation's name (a timeline key, the TLS library label): another fact.
    found = string_spellings(lambda s: s == "nbdref")
    assert {m for m, _ in found} <= {"personas.py", "tls.py"}, found
    assert len([m for m, _ in found if m == "personas.py"]) == 2  # DEFAULT and implementation="nbdref"


# ---------------------------------------------------------------- comments cite the spec, not notes


def test_no_comment_cites_research_notes_outside_the_repository():
    pattern = re.compile(r"spike|research/|\.\./shared|shared/spec|docker-spike|older-servers", re.I)
    hits = [f"{rel(p)}:{n}" for p in SOURCES for n, line in enumerate(p.read_text().splitlines(), 1)
            if pattern.search(line)]
    assert hits == []


# ---------------------------------------------------------------- one encoder signature, one command-name helper
def test_encode_request_header_takes_no_payload_length():
    import inspect

    assert list(inspect.signature(w.encode_request_header).parameters) == ["e", "extended"]
    r = ev.Request(cookie=3, command=Cmd.WRITE, flags=CmdFlag.PAYLOAD_LEN, offset=8, length=4, payload=b"abcd")
    assert w.encode_request(r, extended=True) == w.encode_request_header(r, True) + b"abcd"


def test_one_command_name_helper():
    from nbdref import _checker, _outcome, _transmission, client
    from nbdref._constants import cmd_name

    assert cmd_name(Cmd.READ) == "NBD_CMD_READ" and cmd_name(0x77) == "command 119"
    assert not hasattr(_checker, "_cmd") and not hasattr(_outcome, "_name")
    assert not hasattr(client, "_cmd_name")
    assert _transmission._cmd is cmd_name and client.cmd_name is cmd_name
