"""`./run matrix` over the default matrix, timed: warm (images built) or cold (the suite images removed
first, so debootstrap builds them again).  Goals (#11): warm <= 5 min, cold <= 10 min on 2 cores.

What it prints: the wall time of the whole command, pytest's own duration (index.json's
`harness.duration`), the time before and after pytest (setup, images, report building, Allure), the
result counts, and with `--acct` (needs the `acct` package: accton and sa) the processes that used the
most CPU -- how a peer burning CPU in the background was found (nbd-server's TLS spin, see
suites/server/test_disconnect.py) -- plus dockerd's and containerd's CPU over the run.

    .venv/bin/python benchmarks/bench_matrix.py [--cold] [--acct] [-- extra pytest args]

Exit status 1 when the goal of the kind run is missed, 2 when `./run matrix` itself failed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GOALS = {"warm": 5 * 60.0, "cold": 10 * 60.0}


def remove_images() -> int:
    sys.path.insert(0, str(ROOT))
    from fixtures.images import IMAGE_REPO
    out = subprocess.run(["docker", "images", "-q", IMAGE_REPO], capture_output=True, text=True,
                         timeout=60).stdout.split()
    if out:
        subprocess.run(["docker", "rmi", "-f", *sorted(set(out))], capture_output=True, timeout=300)
    return len(set(out))


def daemon_cpu() -> dict[str, float]:
    """CPU seconds used so far by dockerd and containerd (they outlive the run, so accounting misses them)."""
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[str, float] = {}
    for name in ("dockerd", "containerd"):
        pids = subprocess.run(["pgrep", "-x", name], capture_output=True, text=True).stdout.split()
        for pid in pids:
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cold", action="store_true", help="remove the suite images first")
    ap.add_argument("--acct", action="store_true", help="process accounting: the top CPU users")
    ap.add_argument("pytest_args", nargs="*")
    args = ap.parse_args()
    kind = "cold" if args.cold else "warm"
    if args.cold:
        print(f"removed {remove_images()} suite image(s)")
    acct = None
    if args.acct:
        if not (shutil.which("accton") and shutil.which("sa")):
            print("--acct needs accton and sa (apt-get install acct)", file=sys.stderr)
            return 2
        acct = Path(tempfile.mkdtemp(prefix="bench-matrix-")) / "pacct"
        acct.touch()
        subprocess.run(["accton", str(acct)], check=True, capture_output=True)
    daemons0 = daemon_cpu()
    t0 = time.monotonic()
    try:
        rc = subprocess.run([str(ROOT / "run"), "matrix", *args.pytest_args], cwd=ROOT).returncode
    finally:
        wall = time.monotonic() - t0
        if acct is not None:
            subprocess.run(["accton", "off"], capture_output=True)
    daemons1 = daemon_cpu()
    index = ROOT / "reports" / "out" / "index.json"
    print(f"\n{kind} ./run matrix: {wall:.0f} s wall, exit {rc}; goal {GOALS[kind]:.0f} s")
    if index.exists():
        doc = json.loads(index.read_text())
        duration = float(doc.get("harness", {}).get("duration") or 0)
        print(f"  pytest {duration:.0f} s; before and after it {wall - duration:.0f} s "
              f"(setup{', images' if args.cold else ''}, report building, Allure)")
        print(f"  {len(doc.get('results', []))} results: {doc.get('counts')}")
    for name, cpu in sorted(daemons1.items()):
        print(f"  {name}: {cpu - daemons0.get(name, 0.0):.0f} CPU s over the run")
    if acct is not None:
        top = subprocess.run(["sa", "-a", "--separate-times", str(acct)],
                             capture_output=True, text=True).stdout.splitlines()
        print("  CPU by command (sa: calls, real minutes, user and system CPU minutes):")
        for line in top[:15]:
            print("   ", line)
    if rc not in (0, 1):
        return 2
    return 0 if wall <= GOALS[kind] else 1


if __name__ == "__main__":
    sys.exit(main())
