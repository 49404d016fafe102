"""A run always ends and always cleans up: SIGTERM, SIGKILL of the whole run, SIGKILL of one xdist worker.

Each test runs an inner pytest (this project's plugin, its own small matrix and its own
``NBD_HARNESS_STATE``) as a subprocess in its own session, signals it, and counts what is left by
observation: containers of the inner run (by owner label), processes whose command line names the
inner state dir, socket files under it.  Every wait is bounded; an inner run that overstays is killed.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from fixtures.runs import OWNER_LABEL, RUN_ENV, RUN_LABEL, ProcId, sweep_stale

ROOT = Path(__file__).resolve().parents[2]
INNER_LIMIT = 45.0                   # seconds an inner run may take from start to end

INNER_TEST = r'''
"""Inner run: start every server of the matrix and hold; the outer test signals this run."""
import json, os, subprocess, time
from pathlib import Path

import pytest

from fixtures.exports import ExportRequest
from fixtures.launch import start_server
from fixtures.runs import ProcId

OUT = Path(os.environ["SIGNALS_OUT"])
MODE = os.environ["SIGNALS_MODE"]
WORKER = os.environ.get("PYTEST_XDIST_WORKER", "main")


def write(name, data):
    tmp = OUT / (name + ".tmp")
    tmp.write_text(json.dumps(data))
    tmp.replace(OUT / name)


def naming(path):
    """pids whose command line names path (the peers started under it)."""
    needle = path.encode()
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if needle in (entry / "cmdline").read_bytes():
                    out.append(int(entry.name))
            except OSError:
                pass
    return out


def containers_of(creator):
    if not os.environ.get("SIGNALS_DOCKER"):
        return []
    r = subprocess.run(["docker", "ps", "-aq", "--filter", f"label=nbd-harness.creator={creator}"],
                       capture_output=True, text=True, timeout=30)
    return r.stdout.split()


@pytest.fixture(scope="session")
def peers(matrix, harness_run):
    """Every server of the matrix, never stopped here: only the plugin's cleanup may remove them."""
    base = harness_run.workdir / WORKER
    started = [start_server(spec, ExportRequest(size=1 << 20), workdir=base / f"p{i}")
               for i, spec in enumerate(matrix.servers())]
    return {"worker": WORKER, "pid": os.getpid(), "proc": str(ProcId.me()), "run": harness_run.run_id,
            "dir": str(base), "peers": [s.spec.id for s in started]}


def observe(info):
    """The survivor: once the victim's worker is SIGKILLed, its peers go while this run goes on."""
    deadline = time.monotonic() + 40
    while not (OUT / "killed").exists():
        assert time.monotonic() < deadline, "the outer test never killed the victim"
        time.sleep(0.05)
    victim = json.loads((OUT / "victim.json").read_text())
    deadline = time.monotonic() + 15
    while naming(victim["dir"]) or containers_of(victim["proc"]):
        assert time.monotonic() < deadline, (
            f"the dead worker's peers are still up: pids {naming(victim['dir'])}, "
            f"containers {containers_of(victim['proc'])}")
        time.sleep(0.1)
    assert naming(info["dir"]), "the live worker's own peers must survive the sweep of the dead one"


def act(info):
    if MODE == "victim":
        try:
            os.close(os.open(OUT / "victim.lock", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return observe(info)
        write("victim.json", info)
    else:
        write(WORKER + ".json", info)
    time.sleep(60)


def test_one(peers):
    act(peers)


def test_two(peers):
    act(peers)
'''


def docker_ready() -> bool:
    """Docker peers only when the engine answers and the bookworm image is built (no build here)."""
    from fixtures.images import DebootstrapRecipe, DockerStore, docker_available, image_tag
    if not docker_available()[0]:
        return False
    return DockerStore().labels(image_tag("bookworm", DebootstrapRecipe().key("bookworm"))) is not None


def matrix_rows(*, nbd_server: bool = True) -> str:
    rows = ["- {implementation: nbdref, role: server, launcher: local, persona: nbdref}"]
    if docker_ready():
        rows.append("- {implementation: qemu-nbd, role: server, launcher: docker, suite: bookworm}")
    if nbd_server and shutil.which("nbd-server"):
        rows.append('- {implementation: nbd-server, role: server, launcher: local, version: "3.24"}')
    return "\n".join(rows)


@dataclass
class Inner:
    """One inner pytest run in its own session, and where to look for what it leaves."""

    proc: subprocess.Popen[bytes]
    owner: ProcId | None
    tmp: Path
    state: Path
    out: Path
    log: Path
    docker: bool
    run_ids: set[str] = field(default_factory=set)

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def note_runs(self) -> None:
        runs = self.state / "runs"
        if runs.is_dir():
            self.run_ids |= {d.name for d in runs.iterdir()}

    def wait_for(self, what: str, done: Callable[[], bool], timeout: float, poll: float = 0.05) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            self.note_runs()
            if self.proc.poll() is not None:
                pytest.fail(f"inner run ended (rc {self.proc.returncode}) before {what}:\n{self.output()}")
            if time.monotonic() > deadline:
                pytest.fail(f"no {what} within {timeout:.0f} s:\n{self.output()}")
            time.sleep(poll)
        self.note_runs()

    def wait_end(self, timeout: float = INNER_LIMIT) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"inner run did not end within {timeout:.0f} s of the signal:\n{self.output()}")

    def leftovers(self) -> dict[str, list[str]]:
        """What the inner run left, by observation (not from its own records)."""
        containers: list[str] = []
        if self.docker:
            filters = [f"label={RUN_LABEL}={r}" for r in sorted(self.run_ids)]
            if self.owner is not None:
                filters.append(f"label={OWNER_LABEL}={self.owner}")
            for f in filters:
                r = subprocess.run(["docker", "ps", "-aq", "--filter", f], capture_output=True, text=True,
                                   timeout=30)
                containers += [c for c in r.stdout.split() if c not in containers]
        sockets = [str(p) for p in self.state.rglob("*") if p.is_socket()] if self.state.exists() else []
        return {"containers": containers, "processes": [f"{pid} {cmd}" for pid, cmd in naming(self.state)],
                "sockets": sockets}

    def wait_clean(self, seconds: float = 10.0) -> dict[str, list[str]]:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            left = self.leftovers()
            if not any(left.values()):
                return left
            time.sleep(0.2)
        return self.leftovers()


NOTHING: dict[str, list[str]] = {"containers": [], "processes": [], "sockets": []}


def naming(state: Path) -> list[tuple[int, str]]:
    """(pid, command line) of every process whose command line names ``state`` or a path below it."""
    needle = str(state).encode()
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            raw = (entry / "cmdline").read_bytes()
            if any(arg == needle or arg.startswith(needle + b"/") or b"=" + needle in arg
                   for arg in raw.split(b"\0")):
                out.append((int(entry.name), raw.replace(b"\0", b" ").decode(errors="replace")[:200]))
    return out


@pytest.fixture
def inner(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., Inner]]:
    """Factory of inner runs; at the end any survivor is killed and swept, so nothing outlives a test."""
    started: list[Inner] = []

    def start(*, mode: str, args: list[str], rows: str) -> Inner:
        n = len(started)
        tmp = tmp_path / f"inner{n}"
        # the state dir holds the sockets: keep it short whatever pytest's tmp path is (-n adds popen-gwN)
        state = Path(tempfile.mkdtemp(prefix="nbdsig", dir="/tmp"))
        out, tests = tmp / "out", tmp / "t"
        for d in (out, tests):
            d.mkdir(parents=True)
        (tests / "conftest.py").write_text('pytest_plugins = ["fixtures.plugin"]\n')
        (tests / "pytest.ini").write_text("[pytest]\naddopts = -p no:cacheprovider\n")
        (tests / "test_inner.py").write_text(INNER_TEST)
        matrix = tmp / "matrix.yaml"
        matrix.write_text('version: 1\nsuites:\n  bookworm: {qemu: "7.2", nbdkit: "1.32", nbd: "3.24", '
                          'libnbd: "1.14"}\npeers:\n' + textwrap.indent(rows, "  ") + "\n")
        docker = "launcher: docker" in rows
        env = {k: v for k, v in os.environ.items() if k not in (RUN_ENV, "PYTEST_XDIST_WORKER",
                                                                 "PYTEST_CURRENT_TEST", "PYTEST_ADDOPTS")}
        env.update(NBD_HARNESS_STATE=str(state), PYTHONPATH=str(ROOT), SIGNALS_OUT=str(out),
                   SIGNALS_MODE=mode, SIGNALS_DOCKER="1" if docker else "")
        log = tmp / "inner.log"
        argv = [sys.executable, "-m", "pytest", "-q", "-s", f"--matrix={matrix}", "--rootdir", str(tests),
                f"--junitxml={tmp / 'junit.xml'}", *args, str(tests / "test_inner.py")]
        with open(log, "wb") as f:
            proc = subprocess.Popen(argv, cwd=tests, env=env, stdin=subprocess.DEVNULL, stdout=f,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        run = Inner(proc, ProcId.of(proc.pid), tmp, state, out, log, docker)
        started.append(run)
        return run

    yield start
    for run in started:
        if run.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(run.proc.pid, signal.SIGKILL)
            run.proc.wait(timeout=10)
        monkeypatch.setenv("NBD_HARNESS_STATE", str(run.state))
        with contextlib.suppress(Exception):
            sweep_stale()
        for pid, _ in naming(run.state):       # whatever the sweep missed must not outlive the test
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if run.docker and run.owner is not None:
            r = subprocess.run(["docker", "ps", "-aq", "--filter", f"label={OWNER_LABEL}={run.owner}"],
                               capture_output=True, text=True, timeout=30)
            if r.stdout.split():
                subprocess.run(["docker", "rm", "-f", "-v", *r.stdout.split()], capture_output=True, timeout=60)
        shutil.rmtree(run.state, ignore_errors=True)


def junit_outcomes(path: Path) -> dict[str, str]:
    """test name -> passed / failed / error / skipped, from the inner run's JUnit XML."""
    out = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        kinds = [child.tag for child in case if child.tag in ("failure", "error", "skipped")]
        out[case.get("name", "?")] = {"failure": "failed"}.get(kinds[0], kinds[0]) if kinds else "passed"
    return out


@pytest.mark.slow
@pytest.mark.parametrize(("xdist", "target"), [("-n0", "controller"), ("-n2", "controller"),
                                               ("-n2", "group")])
def test_sigterm_ends_the_run_and_cleans_up(inner: Callable[..., Inner], xdist: str, target: str) -> None:
    """SIGTERM is Ctrl-C: the inner run ends and its cleanup leaves no container, process or socket."""
    args = ["-n", "0"] if xdist == "-n0" else ["-n", "2", "--dist", "load"]
    run = inner(mode="hold", args=args, rows=matrix_rows())
    workers = ["main"] if xdist == "-n0" else ["gw0", "gw1"]
    run.wait_for("peers on every worker", lambda: all((run.out / f"{w}.json").exists() for w in workers),
                 timeout=INNER_LIMIT)
    assert naming(run.state), "the peers must be running before the signal"
    if target == "group":
        os.killpg(run.proc.pid, signal.SIGTERM)
    else:
        run.proc.send_signal(signal.SIGTERM)
    rc = run.wait_end()
    left = run.wait_clean()
    assert (rc, left) == (pytest.ExitCode.INTERRUPTED, NOTHING), run.output()
    assert not any((run.state / "runs" / r).exists() for r in run.run_ids), "the run dir must be removed"


@pytest.mark.slow
def test_sigkill_of_the_run_during_startup_then_sweep(inner: Callable[..., Inner],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """SIGKILL of the whole process group while nbd-server starts: the next sweep still finds all."""
    if not shutil.which("nbd-server"):
        pytest.skip("nbd-server is not installed on the host")
    run = inner(mode="hold", args=["-n", "0"], rows=matrix_rows())     # nbd-server is the last peer

    def nbd_server_starting() -> bool:
        return any(cmd.startswith("nbd-server ") for _, cmd in naming(run.state))

    run.wait_for("nbd-server start-up", nbd_server_starting, timeout=INNER_LIMIT, poll=0.002)
    os.killpg(run.proc.pid, signal.SIGKILL)
    run.proc.wait(timeout=10)
    time.sleep(0.5)                    # a daemon that was forking a moment ago has forked now
    before = run.leftovers()
    assert before["processes"], "peers outlive a SIGKILLed run: that is what the sweep is for"
    monkeypatch.setenv("NBD_HARNESS_STATE", str(run.state))
    sweep_stale()
    assert run.wait_clean(5) == NOTHING, f"before the sweep: {before}"


@pytest.mark.slow
def test_sigkill_of_one_worker(inner: Callable[..., Inner]) -> None:
    """A worker SIGKILLed mid-run: its peers go while the run goes on, and the run ends by itself."""
    run = inner(mode="victim", args=["-n", "2", "--dist", "load"], rows=matrix_rows())
    run.wait_for("the victim's peers", lambda: (run.out / "victim.json").exists(), timeout=INNER_LIMIT)
    victim = json.loads((run.out / "victim.json").read_text())
    os.kill(victim["pid"], signal.SIGKILL)
    (run.out / "killed").touch()
    rc = run.wait_end()
    outcomes = junit_outcomes(run.tmp / "junit.xml")
    # the victim's test is reported as crashed (JUnit: error), the survivor's observation passed
    assert sorted(outcomes.values()) in (["error", "passed"], ["failed", "passed"]), f"{outcomes}:\n{run.output()}"
    assert rc == pytest.ExitCode.TESTS_FAILED, run.output()
    assert run.wait_clean() == NOTHING, run.output()
