"""Run identity and cleanup: Ctrl-C, SIGKILL of the owner, SIGKILL of a worker, live runs untouched."""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from fixtures.images import docker_available
from fixtures.runs import (
    CREATOR_LABEL,
    RUN_ENV,
    RUN_LABEL,
    ProcId,
    _docker_ps,
    cleanup_run,
    current_run,
    proc_start_time,
    sweep_stale,
)

ROOT = Path(__file__).resolve().parents[2]

CHILD = r"""
import json, os, sys, time
sys.path.insert(0, sys.argv[1])
from fixtures.runs import current_run, cleanup_on_exit
from fixtures.launch import start_server, export_workdir
from fixtures.peerspec import PeerSpec
from fixtures.exports import ExportRequest
run = current_run()
cleanup_on_exit(run, mine_only=os.environ.get("MINE_ONLY") == "1")
pids, containers = [], []
for launcher in sys.argv[2:]:
    spec = PeerSpec(id="qemu-nbd-" + launcher, implementation="qemu-nbd", role="server", version="",
                    launcher=launcher, suite="bookworm")
    s = start_server(spec, ExportRequest(size=1 << 20), workdir=export_workdir(launcher))
    (pids if launcher == "local" else containers).append(s.handle.pid if launcher == "local" else s.handle)
print(json.dumps({"run": run.run_id, "workdir": str(run.workdir), "pids": pids, "containers": containers}),
      flush=True)
time.sleep(120)
"""


def ctrl_c_as_at_a_terminal() -> None:
    """In a child about to get SIGINT: the default disposition, as a terminal's Ctrl-C finds it.  A run
    started in the background (a CI runner's `cmd &`, nohup) inherits SIGINT ignored, and Python then
    never raises KeyboardInterrupt: the child would sleep through the signal these tests send."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def launchers() -> list[str]:
    return ["local", "docker"] if docker_available()[0] else ["local"]


_CHILDREN: list[subprocess.Popen[str]] = []       # children of the running test (spawn, the pytest child)


@pytest.fixture
def state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Isolate run dirs from other runs on this machine (containers are found by label anyway).  At the end,
    also when the test failed: its children are killed and the sweep removes what their runs left (a
    child killed after a failed check used to leave its qemu-nbd running)."""
    monkeypatch.setenv("NBD_HARNESS_STATE", str(tmp_path / "state"))
    yield tmp_path / "state"
    while _CHILDREN:
        child = _CHILDREN.pop()
        if child.poll() is None:
            child.kill()
            child.wait()
    sweep_stale()


def spawn(script_dir: Path, *, join_run: str | None = None, mine_only: bool = False,
          which: list[str] | None = None) -> tuple[subprocess.Popen[str], dict]:
    script = script_dir / "child.py"
    script.write_text(CHILD)
    env = dict(os.environ)
    env.pop(RUN_ENV, None)
    if join_run:
        env[RUN_ENV] = join_run
    env["MINE_ONLY"] = "1" if mine_only else "0"
    proc = subprocess.Popen([sys.executable, str(script), str(ROOT), *(which or launchers())],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=ctrl_c_as_at_a_terminal)
    _CHILDREN.append(proc)
    ready, _, _ = select.select([proc.stdout], [], [], 60)
    if not ready:
        proc.kill()
        pytest.fail("child did not start its peers within 60 s")
    line = proc.stdout.readline()
    if not line:
        proc.wait(timeout=10)
        pytest.fail(f"child failed: {proc.stderr.read()[-2000:]}")
    return proc, json.loads(line)


def leftovers(info: dict) -> dict[str, list]:
    procs = [p for p in info["pids"] if proc_start_time(p) is not None]
    containers = [c["id"] for c in _docker_ps([f"label={RUN_LABEL}={info['run']}"])]
    return {"processes": procs, "containers": containers}


def wait_clean(info: dict, seconds: float = 15.0) -> dict[str, list]:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        left = leftovers(info)
        if not any(left.values()):
            return left
        time.sleep(0.1)
    return leftovers(info)


def test_proc_id_detects_reuse() -> None:
    me = ProcId.me()
    assert me.alive()
    assert not ProcId(me.pid, me.start + 1).alive(), "same pid, other start time: not the same process"
    assert ProcId.parse(str(me)) == me and ProcId.parse("garbage") is None


def test_current_run_is_shared_through_env(state: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(RUN_ENV, raising=False)
    run = current_run()
    assert os.environ[RUN_ENV] == run.run_id and run.owner == ProcId.me() and run.workdir.is_dir()
    out = subprocess.run([sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv[1]);"
                          "from fixtures.runs import current_run; r = current_run(); print(r.run_id, r.owner)",
                          str(ROOT)], capture_output=True, text=True, timeout=30, env=dict(os.environ))
    assert out.stdout.split() == [run.run_id, str(run.owner)], out.stderr


def test_sigint_cleans_up(state: Path, tmp_path: Path) -> None:
    proc, info = spawn(tmp_path)
    assert all(proc_start_time(p) for p in info["pids"]), "peers must be running before the signal"
    assert len(leftovers(info)["containers"]) == len(info["containers"])
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=30)
    assert wait_clean(info) == {"processes": [], "containers": []}
    assert not Path(info["workdir"]).exists()


def test_sigkill_then_sweep_cleans_up(state: Path, tmp_path: Path) -> None:
    proc, info = spawn(tmp_path)
    proc.kill()
    proc.wait(timeout=10)
    time.sleep(0.3)
    before = leftovers(info)
    assert before["processes"], "qemu-nbd outlives a SIGKILLed parent: that is what the sweep is for"
    report = sweep_stale()
    assert info["run"] in report.runs
    assert wait_clean(info, 5) == {"processes": [], "containers": []}
    assert not Path(info["workdir"]).exists()


def test_sweep_spares_live_runs_and_removes_dead_workers(state: Path, tmp_path: Path) -> None:
    """A live owner's peers survive a sweep; a SIGKILLed worker's peers in that live run do not."""
    live, live_info = spawn(tmp_path)
    try:
        worker, worker_info = spawn(tmp_path, join_run=live_info["run"], mine_only=True)
        assert worker_info["run"] == live_info["run"]
        worker.kill()
        worker.wait(timeout=10)
        sweep_stale()
        assert wait_clean(worker_info | {"run": "none"}, 5)["processes"] == []
        left = leftovers(live_info)
        assert sorted(left["processes"]) == sorted(live_info["pids"])
        if live_info["containers"]:
            mine = _docker_ps([f"label={RUN_LABEL}={live_info['run']}"])
            assert {c["id"] for c in mine} == set(live_info["containers"]), "only the dead worker's go"
            assert all(c.get(CREATOR_LABEL) for c in mine)
    finally:
        live.send_signal(signal.SIGINT)
        live.wait(timeout=30)
    assert wait_clean(live_info) == {"processes": [], "containers": []}


PYTEST_CHILD = r"""
import json, os, sys, time
sys.path.insert(0, os.environ["HARNESS_ROOT"])
import pytest
from fixtures.runs import ProcId, cleanup_run, current_run
from fixtures.launch import start_server, export_workdir
from fixtures.peerspec import PeerSpec
from fixtures.exports import ExportRequest

@pytest.fixture(scope="session")
def peers():
    run = current_run()
    started = []
    for launcher in os.environ["LAUNCHERS"].split(","):
        spec = PeerSpec(id="qemu-nbd-" + launcher, implementation="qemu-nbd", role="server", version="",
                        launcher=launcher, suite="bookworm")
        started.append(start_server(spec, ExportRequest(size=1 << 20), workdir=export_workdir(launcher)))
    yield started
    cleanup_run(run)

def test_waits(peers):
    info = {"run": current_run().run_id, "workdir": str(current_run().workdir),
            "pids": [s.handle.pid for s in peers if s.spec.launcher == "local"],
            "containers": [s.handle for s in peers if s.spec.launcher == "docker"]}
    print("INFO " + json.dumps(info), file=sys.__stdout__, flush=True)
    time.sleep(120)
"""


def test_ctrl_c_of_pytest_runs_session_cleanup(state: Path, tmp_path: Path) -> None:
    """Ctrl-C during a test: pytest tears session fixtures down, and their cleanup removes the peers."""
    (tmp_path / "test_child.py").write_text(PYTEST_CHILD)
    env = {k: v for k, v in os.environ.items() if k != RUN_ENV}
    env.update(HARNESS_ROOT=str(ROOT), LAUNCHERS=",".join(launchers()))
    proc = subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", "--rootdir",
                             str(tmp_path), str(tmp_path / "test_child.py")], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=ctrl_c_as_at_a_terminal)
    _CHILDREN.append(proc)
    try:
        deadline = time.monotonic() + 60
        info = None
        while time.monotonic() < deadline and info is None:
            ready, _, _ = select.select([proc.stdout], [], [], 1)
            if ready:
                line = proc.stdout.readline()
                if line.startswith("INFO "):
                    info = json.loads(line[5:])
                elif not line and proc.poll() is not None:
                    break
        assert info is not None, "child pytest did not start its peers"
        assert len(leftovers(info)["containers"]) == len(info["containers"])
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
        assert "KeyboardInterrupt" in out
        assert wait_clean(info) == {"processes": [], "containers": []}
        assert not Path(info["workdir"]).exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_short_socket_dirs_are_removed_with_their_run(state: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A work dir too deep for a unix socket gets one under <state>/s/: it goes with the run's
    cleanup, and sweeps remove those of dead runs and unrecorded leftovers."""
    from fixtures.exports import ExportRequest
    from fixtures.launch import start_server
    from fixtures.launchers.inprocess import reference_spec
    from fixtures.runs import SHORT_DIR_RECORDS, cleanup_run, runs_root, short_root, short_socket_dir

    pytest.importorskip("nbdref.server")
    monkeypatch.delenv(RUN_ENV, raising=False)
    run = current_run()
    deep = run.workdir / ("d" * 60) / ("e" * 60)
    with start_server(reference_spec(), ExportRequest(size=4096), workdir=deep) as s:
        assert s.socket is not None and s.socket.parent.parent == short_root()
        short = s.socket.parent
    assert short.is_dir() and (run.workdir / SHORT_DIR_RECORDS / short.name).exists()
    cleanup_run(run)
    assert not short.exists() and not run.workdir.exists()

    # a dead owner's run: its short dirs go with it in the sweep
    me = ProcId.me()
    dead = runs_root() / "dead-run"
    (dead / "procs").mkdir(parents=True)
    (dead / "owner.json").write_text(json.dumps({"pid": me.pid, "start": me.start + 1}))
    from fixtures.runs import RunInfo
    orphan_of_dead = short_socket_dir(RunInfo("dead-run", ProcId(me.pid, me.start + 1), dead))
    # left by a run dir removed some other way: swept once it is old
    stray = short_root() / "0123456789ab"
    stray.mkdir()
    os.utime(stray, (time.time() - 3600, time.time() - 3600))
    # a live run's short dir stays
    monkeypatch.delenv(RUN_ENV)
    live_run = current_run()
    assert live_run.run_id != run.run_id and (live_run.workdir / "owner.json").exists()
    live = short_socket_dir(live_run)
    sweep_stale()
    assert not orphan_of_dead.exists() and not dead.exists() and not stray.exists()
    assert live.is_dir()
    cleanup_run(live_run)
    assert not live.exists()


# ----------------------------------------------------------------------------------------------------
# Hardening: SIGTERM as Ctrl-C, processes found by their command line, dead workers, daemons


SIGTERM_CHILD = r"""
import json, os, signal, sys, time
sys.path.insert(0, sys.argv[1])
from fixtures.runs import interrupts_deferred, restore_sigterm, sigterm_as_interrupt

def term_then_wait():
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(2)

seen = []
previous = signal.getsignal(signal.SIGTERM)
seen.append(sigterm_as_interrupt() and sigterm_as_interrupt())       # idempotent
try:
    term_then_wait()
    seen.append("not raised")
except KeyboardInterrupt:
    seen.append("raised")
try:
    with interrupts_deferred():
        term_then_wait()
        seen.append("block finished")
except KeyboardInterrupt:
    seen.append("raised after the block")
with interrupts_deferred(then_raise=False):
    term_then_wait()
seen.append("dropped")
restore_sigterm()
seen.append(signal.getsignal(signal.SIGTERM) is previous)
signal.signal(signal.SIGTERM, signal.SIG_IGN)
seen.append(sigterm_as_interrupt())                                 # an ignored SIGTERM stays ignored
print(json.dumps(seen))
"""


def test_sigterm_as_interrupt_is_ctrl_c_deferrable_and_restored(tmp_path: Path) -> None:
    script = tmp_path / "term.py"
    script.write_text(SIGTERM_CHILD)
    r = subprocess.run([sys.executable, str(script), str(ROOT)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == [True, "raised", "block finished", "raised after the block", "dropped", True,
                                    False]


def _sleeper(*args: str) -> subprocess.Popen[bytes]:
    """A process in its own session (like a daemon) whose command line holds ``args``."""
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", *args],
                            start_new_session=True)


def _gone(proc: subprocess.Popen[bytes], seconds: float = 10.0) -> bool:
    try:
        proc.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        return False
    return True


def test_sweep_kills_what_names_a_dead_run_and_keeps_the_dir_until_it_is_gone(
        state: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An unrecorded process naming a dead run's dir is killed before the dir goes; while it cannot be
    killed the dir stays (so the next sweep can find it); a live run's processes are never touched."""
    import fixtures.runs as runs
    from fixtures.runs import processes_naming, runs_root

    me = ProcId.me()
    dead = runs_root() / "dead-run"
    (dead / "procs").mkdir(parents=True)
    (dead / "owner.json").write_text(json.dumps({"pid": me.pid, "start": me.start + 1}))
    monkeypatch.delenv(RUN_ENV, raising=False)
    live = current_run()
    stray = _sleeper(f"--config={dead / 'p0' / 'server.conf'}")
    neighbour = _sleeper(str(dead) + "-not-this-run")          # a prefix of the path is not the path
    keep = _sleeper(str(live.workdir / "p0" / "disk.raw"))
    try:
        assert wait_until(lambda: {p.pid for p in processes_naming([dead])} == {stray.pid})
        with monkeypatch.context() as m:
            m.setattr(runs, "kill_process", lambda proc, grace=2.0: False)
            m.setattr(runs, "kill_group", lambda pgid, start, grace=2.0: 0)
            report = sweep_stale()
        assert report.kept == ["dead-run"] and dead.is_dir() and stray.poll() is None
        report = sweep_stale()
        assert "dead-run" in report.runs and report.processes >= 1
        assert _gone(stray) and not dead.exists()
        assert neighbour.poll() is None and keep.poll() is None
    finally:
        for p in (stray, neighbour, keep):
            p.kill()
            p.wait(timeout=10)
    cleanup_run(live)


def wait_until(done: Callable[[], bool], seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while not done():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


WORKER_CHILD = r"""
import json, subprocess, sys, time
sys.path.insert(0, sys.argv[1])
from fixtures.exports import ExportRequest
from fixtures.launch import start_server
from nbdref.personas import DEFAULT
from fixtures.peerspec import PeerSpec
from fixtures.runs import current_run, register_worker
run = current_run()
name = sys.argv[2]
wd = run.workdir / name
register_worker(run, name, wd)
spec = PeerSpec(id="nbdref-local", implementation="nbdref", role="server", version="0", launcher="local",
                persona=DEFAULT)
server = start_server(spec, ExportRequest(size=1 << 20), workdir=wd / "p0")
# what nobody recorded: only its command line ties it to this worker
stray = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", str(wd / "stray")],
                         start_new_session=True)
print(json.dumps({"peer": server.handle.pid, "stray": stray.pid}), flush=True)
time.sleep(60)
"""


def _start_worker(script: Path, run_id: str, name: str) -> tuple[subprocess.Popen[str], dict]:
    env = {**os.environ, RUN_ENV: run_id}
    proc = subprocess.Popen([sys.executable, str(script), str(ROOT), name], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    ready, _, _ = select.select([proc.stdout], [], [], 60)
    line = proc.stdout.readline() if ready else ""
    if not line:
        proc.kill()
        pytest.fail(f"worker {name} did not start its peer: {proc.stderr.read()[-2000:] if ready else 'timeout'}")
    return proc, json.loads(line)


def test_sweep_worker_removes_a_dead_workers_peers_while_the_run_goes_on(
        state: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fixtures.runs import sweep_worker

    monkeypatch.delenv(RUN_ENV, raising=False)
    run = current_run()                      # this test is the controller: the owner, alive throughout
    script = tmp_path / "worker.py"
    script.write_text(WORKER_CHILD)
    victim, v = _start_worker(script, run.run_id, "gw9")
    survivor, s = _start_worker(script, run.run_id, "gw8")
    try:
        assert not sweep_worker(run, "gw9"), "a live worker is left alone"
        assert all(proc_start_time(p) for p in (v["peer"], v["stray"]))
        victim.kill()
        victim.wait(timeout=10)
        report = sweep_worker(run, "gw9", wait=5.0)
        assert report.processes >= 2, report
        assert wait_until(lambda: not any(proc_start_time(p) for p in (v["peer"], v["stray"])), 5)
        assert all(proc_start_time(p) for p in (s["peer"], s["stray"])), "the live worker's peers stay"
        assert run.workdir.is_dir()
        sweep_stale()                        # any later sweep agrees: the live run and worker stay
        assert all(proc_start_time(p) for p in (s["peer"], s["stray"])) and run.workdir.is_dir()
    finally:
        for proc in (victim, survivor):
            proc.kill()
            proc.wait(timeout=10)
    cleanup_run(run)
    assert not any(proc_start_time(p) for p in (s["peer"], s["stray"]))
    assert not run.workdir.exists()


def test_a_daemon_is_recorded_while_it_starts(state: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A forking server is recorded as soon as its pid file names it, before it is ready (here: never),
    so a SIGKILL during start-up leaves nothing a sweep cannot find; a failed start stops it."""
    import threading

    from fixtures.exports import ExportRequest
    from fixtures.launchers.base import PeerStartError
    from fixtures.launchers.local import start_local
    from fixtures.peers.base import ServerContext, ServerPlan
    from fixtures.peerspec import PeerSpec

    monkeypatch.delenv(RUN_ENV, raising=False)
    run = current_run()
    wd = run.workdir / "d"
    wd.mkdir()
    pidfile = wd / "fake.pid"
    # like nbd-server: the foreground process exits, the daemon (own session) writes its pid file
    script = f"setsid sh -c 'echo $$ > {pidfile}; exec sleep 30' </dev/null >/dev/null 2>&1 &"
    plan = ServerPlan(argv=["sh", "-c", script], daemonizes=True, pidfile=pidfile)
    spec = PeerSpec(id="fake-daemon", implementation="custom", role="server", version="0", launcher="local")
    ctx = ServerContext(spec=spec, export=ExportRequest(size=4096), disk=wd / "disk", workdir=wd,
                        transport="unix", socket=wd / "nbd.sock", port=None)
    seen: list[dict] = []
    done = threading.Event()

    def watch() -> None:
        while not done.is_set() and not seen:
            for rec in run.procs_dir.glob("*.json"):
                with contextlib.suppress(OSError, ValueError):
                    data = json.loads(rec.read_text())
                    if data["name"].endswith("(daemon)"):
                        seen.append(data)
            time.sleep(0.01)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with pytest.raises(PeerStartError, match="no NBDMAGIC"):
            start_local(ctx, plan, uri="nbd+unix:///", log_path=wd / "log", versions={}, timeout=1.5)
    finally:
        done.set()
        watcher.join(timeout=5)
    assert seen, "the daemon was not recorded during start-up"
    assert seen[0]["pid"] == int(pidfile.read_text())
    assert not ProcId(seen[0]["pid"], seen[0]["start"]).alive(), "the failed start stops the daemon"
    assert not list(run.procs_dir.glob("*.json")), "and forgets it"
    cleanup_run(run)
