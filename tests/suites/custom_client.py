"""A user's own NBD client, as a command template would run it: one action per invocation, following
the conventions of fixtures/drivers.py (size, read, write, list, map, zero, trim, flush, cache, copy).
Built on nbdref's client so the custom-row tests exercise the template machinery, not a second client.
`--broken=ACTION` makes that action exit 0 without doing anything (a client that lies), so the tests
can show such a template is judged `fail`.

Usage: custom_client.py [--broken=ACTION] ACTION URI OFFSET LENGTH FILE
"""

from __future__ import annotations

import sys
from pathlib import Path

from nbdref.client import Client


def main(argv: list[str]) -> int:
    broken = {a.split("=", 1)[1] for a in argv if a.startswith("--broken=")}
    args = [a for a in argv if not a.startswith("--broken=")]
    action, uri, offset, length, file = (args + [""] * 5)[:5]
    if action in broken:
        return 0
    c = Client(timeout=15)
    if action == "map":
        c.add_meta_context("base:allocation")
    if action == "list":
        c.set_opt_mode(True)
    c.connect_uri(uri)
    try:
        if action == "size":
            print(c.get_size())
        elif action == "read":
            Path(file).write_bytes(c.pread(int(length), int(offset)))
        elif action == "write":
            c.pwrite(Path(file).read_bytes(), int(offset))
        elif action == "zero":
            c.zero(int(length), int(offset))
        elif action == "trim":
            c.trim(int(length), int(offset))
        elif action == "cache":
            c.cache(int(length), int(offset))
        elif action == "flush":
            c.flush()
        elif action == "copy":
            size, out = c.get_size(), bytearray()
            for off in range(0, size, 1 << 20):
                out += c.pread(min(1 << 20, size - off), off)
            Path(file).write_bytes(bytes(out))
        elif action == "list":
            for name, _ in c.opt_list():
                print(name)
            c.opt_abort()
        elif action == "map":
            size, off = c.get_size(), 0
            while off < size:
                rows: list[tuple[int, int]] = []

                def cb(_ctx: str, start: int, entries: list[int], _err: int, rows: list = rows) -> None:
                    pos = start
                    for n, flags in zip(entries[0::2], entries[1::2], strict=True):
                        rows.append((pos, n))
                        print(pos, n, flags)
                        pos += n
                c.block_status(size - off, off, cb)
                if not rows:
                    break
                off = rows[-1][0] + rows[-1][1]
        else:
            print(f"unknown action {action!r}", file=sys.stderr)
            return 2
    finally:
        c.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
