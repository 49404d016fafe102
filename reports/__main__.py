"""`python -m reports build [--results FILE] [--out DIR] [--matrix FILE]`: write index.json and
requirements.json from a run's results file.

Exit 0 when both were written, 2 when an input cannot be read (one line on stderr, no traceback: this
runs at the end of ./run matrix, where a traceback would bury pytest's summary).
"""

from __future__ import annotations

import argparse
import sys

from reports.index import ReportError, index_from, load_run, requirements_from, write_documents


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reports",
                                     description="Build index.json and requirements.json from results.json.")
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="write index.json and requirements.json")
    build.add_argument("--results", default="reports/out/results.json", help="the run's results file")
    build.add_argument("--out", default="reports/out", help="directory to write into")
    build.add_argument("--matrix", default=None, help="matrix file: adds how each peer is started")
    args = parser.parse_args(argv)

    try:
        header, results = load_run(args.results)
        index = index_from(header, results, args.matrix)
        requirements = requirements_from(header, results)
        index_path, req_path = write_documents(args.out, index, requirements)
    except (ReportError, OSError) as e:
        print(f"reports: {e}", file=sys.stderr)
        return 2
    if index["matrix"] and not index["matrix"]["same_as_run"]:
        print(f"reports: warning: {args.matrix} changed since the run (sha256 differs): the peers' "
              "matrix entries describe the file as it is now", file=sys.stderr)
    print(f"reports: wrote {index_path} ({len(results)} results, {len(index['peers'])} peers) and "
          f"{req_path} ({len(requirements['requirements'])} requirements)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
