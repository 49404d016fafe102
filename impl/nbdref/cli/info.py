"""`python -m nbdref info [--json] [--list] [--map[=CONTEXT]] [--size] URI`: like nbdinfo, with nbdref.

The text and JSON shapes follow nbdinfo 1.14 (keys "protocol", "TLS", "structured", "exports" with
"export-name", "export-size", "contexts", "can_*", "is_*", "block_size_*"), plus "extended" and the
reference client's "violations", so the output of both tools can be compared side by side.
Exit status: 0 on success, 1 when connecting or a command fails (message on stderr), 2 on bad usage.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import replace
from typing import Any, TextIO

from .._constants import CONTEXT_BASE_ALLOCATION
from ..client import Client, ClientError
from ..uri import UriError, parse_uri

_FLAGS = ("is_rotational", "is_read_only", "can_cache", "can_df", "can_fast_zero", "can_flush", "can_fua",
          "can_multi_conn", "can_trim", "can_zero")  # fmt: skip
_MAP_STEP = 1 << 30  # block status request length per round trip
_BASE_ALLOCATION = {0: "data", 1: "hole", 2: "zero", 3: "hole,zero"}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m nbdref info", description="Show an NBD server's exports.")
    p.add_argument("--json", action="store_true", help="JSON output (nbdinfo's shape)")
    p.add_argument("-L", "--list", action="store_true", help="list all exports (NBD_OPT_LIST)")
    p.add_argument("--map", metavar="CONTEXT", help="print the extent map (--map alone: base:allocation)")
    p.add_argument("--size", action="store_true", help="print only the size in bytes")
    p.add_argument("--timeout", type=float, default=30.0, help="socket timeout in seconds (default 30)")
    p.add_argument("uri", help="NBD URI, e.g. nbd+unix:///exp?socket=/tmp/sock")
    return p


def human_size(size: int) -> str:
    """nbdinfo's export-size-str: the largest exact binary unit (1M, 64K), else the byte count."""
    for shift, suffix in ((60, "E"), (50, "P"), (40, "T"), (30, "G"), (20, "M"), (10, "K")):
        if size and size % (1 << shift) == 0:
            return f"{size >> shift}{suffix}"
    return str(size)


def _export_info(client: Client, name: str, uri: str, go: bool) -> dict[str, Any]:
    """What one export advertises: from NBD_OPT_INFO (or NBD_OPT_GO when `go`), plus its contexts."""
    client.set_export_name(name)
    contexts: list[str] = []
    if client.get_structured_replies_negotiated():
        try:
            contexts = client.opt_list_meta_context([])  # an empty query list asks for every context
        except ClientError:
            contexts = []
    if go:
        client.opt_go()
    else:
        client.opt_info()
    info: dict[str, Any] = {"export-name": name}
    try:
        info["description"] = client.get_export_description()
    except ClientError:
        pass
    info["uri"] = uri
    info["contexts"] = contexts
    for flag in _FLAGS:
        info[flag] = getattr(client, flag)()
    for which in ("minimum", "preferred", "maximum"):
        value = client.get_block_size(which)
        if value:
            info[f"block_size_{which}"] = value
    size = client.get_size()
    info["export-size"] = size
    info["export-size-str"] = human_size(size)
    return info


def _protocol_line(client: Client) -> str:
    tls = "with TLS" if client.get_tls_negotiated() else "without TLS"
    packets = (
        "extended" if client.get_extended_headers_negotiated()
        else "structured" if client.get_structured_replies_negotiated() else "simple"
    )  # fmt: skip
    return f"protocol: {client.get_protocol()} {tls}, using {packets} packets"


def _print_export(info: dict[str, Any], out: TextIO) -> None:
    print(f'export="{info["export-name"]}":', file=out)
    print(f"\texport-size: {info['export-size']} ({info['export-size-str']})", file=out)
    if "description" in info:
        print(f"\tdescription: {info['description']}", file=out)
    print(f"\turi: {info['uri']}", file=out)
    if info["contexts"]:
        print("\tcontexts:", file=out)
        for context in info["contexts"]:
            print(f"\t\t{context}", file=out)
    for key, value in info.items():
        if key in _FLAGS or key.startswith("block_size_"):
            print(f"\t{key}: {str(value).lower()}", file=out)


def _export_uri(uri: str, name: str) -> str:
    parsed = parse_uri(uri)
    return replace(parsed, export_name=name).to_string()


def _extent_map(client: Client, context: str) -> list[dict[str, Any]]:
    """Walk the whole export with NBD_CMD_BLOCK_STATUS and merge adjacent extents of the same type."""
    size = client.get_size()
    extents: list[dict[str, Any]] = []
    offset = 0
    got: list[tuple[int, int]] = []

    def callback(name: str, _offset: int, entries: list[int], _error: int) -> None:
        if name == context:
            got.extend(zip(entries[0::2], entries[1::2], strict=True))

    while offset < size:
        got.clear()
        client.block_status(min(_MAP_STEP, size - offset), offset, callback)
        if not got:
            raise ClientError(f"block status at offset {offset} returned no extent for {context}")
        for length, flags in got:
            length = min(length, size - offset)
            if length <= 0:
                break
            description = _BASE_ALLOCATION.get(flags, "") if context == CONTEXT_BASE_ALLOCATION else ""
            if extents and extents[-1]["type"] == flags:
                extents[-1]["length"] += length
            else:
                extents.append({"offset": offset, "length": length, "type": flags, "description": description})
            offset += length
    return extents


def run(args: argparse.Namespace, out: TextIO) -> int:
    client = Client(timeout=args.timeout)
    client.set_full_info(True)
    client.set_opt_mode(True)
    if args.map:
        client.add_meta_context(args.map)
    with client:
        client.connect_uri(args.uri)
        fixed = client.get_protocol() == "newstyle-fixed"
        if args.size or args.map:
            if fixed:
                client.opt_go()
            if args.size:
                size = client.get_size()
                print(json.dumps({"export-size": size}) if args.json else size, file=out)
                return 0
            if not client.can_meta_context(args.map):
                raise ClientError(f"the server did not select meta context {args.map!r}")
            extents = _extent_map(client, args.map)
            if args.json:
                print(json.dumps(extents, indent=1), file=out)
            else:
                for e in extents:
                    print(f"{e['offset']:>10} {e['length']:>11} {e['type']:>4}  {e['description']}".rstrip(), file=out)
            return 0
        if args.list and fixed:
            names = [name for name, _ in client.opt_list()]
            exports = [_export_info(client, name, _export_uri(args.uri, name), go=False) for name in names]
        elif fixed:
            name = client.get_export_name()
            exports = [_export_info(client, name, args.uri, go=True)]
        else:  # oldstyle / plain newstyle: the handshake already entered transmission
            exports = [_transmission_info(client, args.uri)]
        document = {
            "protocol": client.get_protocol(),
            "TLS": client.get_tls_negotiated(),
            "structured": client.get_structured_replies_negotiated(),
            "extended": client.get_extended_headers_negotiated(),
            "exports": exports,
            "violations": [str(v) for v in client.violations],
        }
        if args.json:
            print(json.dumps(document, indent=1), file=out)
        else:
            print(_protocol_line(client), file=out)
            for info in exports:
                _print_export(info, out)
            for violation in document["violations"]:
                print(f"violation: {violation}", file=out)
    return 0


def _transmission_info(client: Client, uri: str) -> dict[str, Any]:
    info: dict[str, Any] = {"export-name": client.get_export_name(), "uri": uri, "contexts": []}
    for flag in _FLAGS:
        info[flag] = getattr(client, flag)()
    info["export-size"] = client.get_size()
    info["export-size-str"] = human_size(info["export-size"])
    return info


def main(argv: Sequence[str] | None = None, *, out: TextIO | None = None) -> int:
    """Entry point; returns the exit status (see the module docstring)."""
    try:
        # Like nbdinfo, a context is given only as --map=CONTEXT: a bare --map never eats the URI.
        words = [f"--map={CONTEXT_BASE_ALLOCATION}" if a == "--map" else a
                 for a in (sys.argv[1:] if argv is None else argv)]
        args = _parser().parse_args(words)
    except SystemExit as exc:
        return int(exc.code or 0)
    try:
        return run(args, out or sys.stdout)
    except UriError as exc:
        print(f"nbdref info: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # a CLI reports, it does not trace back
        print(f"nbdref info: {args.uri}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
