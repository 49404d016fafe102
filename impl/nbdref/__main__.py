"""`python -m nbdref COMMAND ...`: dispatch to the command modules in nbdref.cli."""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "info": "nbdref.cli.info",    # like nbdinfo: size, flags, block sizes, contexts, exports, map
    "serve": "nbdref.cli.serve",  # the reference server
    "proxy": "nbdref.cli.proxy",  # the validating proxy: checks both sides of a real pair
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(f"usage: python -m nbdref {{{'|'.join(COMMANDS)}}} ...", file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    module = importlib.import_module(COMMANDS[argv[0]])
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
