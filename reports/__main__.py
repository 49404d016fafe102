"""`python -m reports build [--results FILE] [--out DIR] [--matrix FILE]`: write index.json,
requirements.json and coverage.json from a run's results file.
`python -m reports coverage [--results FILE] [--side server|client] [-v]`: print the coverage listing.
`python -m reports merge A.json B.json ... --out FILE`: the results files of shards as one (reports/merge.py).
The build also writes the matrix page, index.html with a page per result under cases/ (reports/html.py).

Exit 0 when both were written, 2 when an input cannot be read (one line on stderr, no traceback: this
runs at the end of ./run matrix, where a traceback would bury pytest's summary).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from reports.coverage import CoverageError, coverage, listing_lines, summary_lines
from reports.differential import write as write_differential
from reports.html import write_html
from reports.index import (
    ReportError,
    index_from,
    load_run,
    rebase_evidence,
    requirements_from,
    write_documents,
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reports",
                                     description="Build index.json and requirements.json from results.json.")
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="write index.json and requirements.json")
    build.add_argument("--results", default="reports/out/results.json", help="the run's results file")
    build.add_argument("--out", default="reports/out", help="directory to write into")
    build.add_argument("--matrix", default=None, help="matrix file: adds how each peer is started")
    cover = sub.add_parser("coverage", help="print which requirement ids the run traced and observed")
    cover.add_argument("--results", default="reports/out/results.json", help="the run's results file")
    cover.add_argument("--side", choices=("server", "client"), default=None, help="only this side")
    cover.add_argument("-v", "--verbose", action="store_true", help="every test and third-party peer")
    merge = sub.add_parser("merge", help="combine the results files of shards into one results file")
    merge.add_argument("inputs", nargs="+", metavar="RESULTS", help="results files (one per shard)")
    merge.add_argument("--out", required=True, help="the merged results file to write")
    args = parser.parse_args(argv)

    if args.command == "merge":
        return _merge(args.inputs, args.out)
    if args.command == "coverage":
        try:
            listing = coverage(load_run(args.results)[1])
        except (ReportError, CoverageError) as e:
            print(f"reports: {e}", file=sys.stderr)
            return 2
        print("\n".join(listing_lines(listing, args.side, verbose=args.verbose)))
        return 0

    try:
        header, results = load_run(args.results)
        rebase_evidence(results, Path(args.results).parent, args.out)
        index = index_from(header, results, args.matrix)
        requirements = requirements_from(header, results)
        index_path, req_path = write_documents(args.out, index, requirements)
        html_path = write_html(args.out, index, requirements, results)
        listing = coverage(results)
        coverage_path = Path(args.out) / "coverage.json"
        coverage_path.write_text(json.dumps(listing, indent=1, sort_keys=True) + "\n", encoding="utf-8")
        differential_path = write_differential(Path(args.out) / "differential.json", index["results"])
    except (ReportError, CoverageError, OSError) as e:
        print(f"reports: {e}", file=sys.stderr)
        return 2
    if index["matrix"] and not index["matrix"]["same_as_run"]:
        print(f"reports: warning: {args.matrix} changed since the run (sha256 differs): the peers' "
              "matrix entries describe the file as it is now", file=sys.stderr)
    print(f"reports: wrote {index_path} ({len(results)} results, {len(index['peers'])} peers) and "
          f"{req_path} ({len(requirements['requirements'])} requirements), {coverage_path}, {differential_path}")
    for line in summary_lines(listing):
        print(f"reports: {line}")
    print(f"reports: the matrix page: {html_path.resolve()}")
    return 0


def _merge(inputs: list[str], out: str) -> int:
    from reports.merge import write_merged
    try:
        path = write_merged(inputs, out)
    except (ReportError, OSError) as e:
        print(f"reports: {e}", file=sys.stderr)
        return 2
    print(f"reports: merged {len(inputs)} results files into {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
