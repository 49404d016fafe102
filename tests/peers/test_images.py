"""Image cache: keyed by recipe, built once across processes; plus one real check of the suite images."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from fixtures.images import (
    HARNESS_LABEL,
    SUITE_LABEL,
    DebootstrapRecipe,
    ImageInfo,
    docker_available,
    ensure_image,
    read_package_list,
)


class FileStore:
    """A stand-in for the docker engine: one JSON file of labels per tag."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, tag: str) -> Path:
        return self.root / (tag.replace("/", "_").replace(":", "_") + ".json")

    def labels(self, tag: str) -> dict[str, str] | None:
        p = self.path(tag)
        return json.loads(p.read_text()) if p.exists() else None


@dataclass(frozen=True)
class FakeRecipe:
    """A recipe whose build takes `seconds`, records each build in `log` and 'imports' into the store."""

    text: str
    store_root: Path
    log: Path
    seconds: float = 0.0
    name: str = "fake"

    def key(self, suite: str) -> str:
        return hashlib.sha256(f"{suite}\0{self.text}".encode()).hexdigest()[:16]

    def build(self, suite: str, tag: str, labels: dict[str, str], progress) -> dict[str, str]:
        with open(self.log, "a") as f:
            f.write(tag + "\n")
        time.sleep(self.seconds)
        extra = {"nbd-harness.version.qemu-utils": "1:7.2", "nbd-harness.has.qemu-nbd": "1"}
        FileStore(self.store_root).path(tag).write_text(json.dumps({**labels, **extra}))
        return extra


def builds(log: Path) -> list[str]:
    return log.read_text().splitlines() if log.exists() else []


def test_cache_hit_does_not_rebuild(tmp_path: Path) -> None:
    recipe = FakeRecipe("pkgs: a b", tmp_path, tmp_path / "builds.log")
    store, lines = FileStore(tmp_path), []
    first = ensure_image("bookworm", recipe=recipe, store=store, lock_dir=tmp_path, progress=lines.append)
    second = ensure_image("bookworm", recipe=recipe, store=store, lock_dir=tmp_path, progress=lines.append)
    assert builds(tmp_path / "builds.log") == [first.tag]
    assert first == second
    assert first.versions == {"qemu-utils": "1:7.2"} and first.has == {"qemu-nbd": True}
    assert first.suite == "bookworm"
    assert any("building" in line for line in lines), "a build must show progress"


def test_recipe_change_gives_new_key_and_rebuild(tmp_path: Path) -> None:
    log = tmp_path / "builds.log"
    a = ensure_image("sid", recipe=FakeRecipe("pkgs: a", tmp_path, log), store=FileStore(tmp_path),
                     lock_dir=tmp_path, progress=lambda s: None)
    b = ensure_image("sid", recipe=FakeRecipe("pkgs: a b", tmp_path, log), store=FileStore(tmp_path),
                     lock_dir=tmp_path, progress=lambda s: None)
    assert a.tag != b.tag and a.recipe_key != b.recipe_key
    assert builds(log) == [a.tag, b.tag]


def test_suites_have_distinct_keys(tmp_path: Path) -> None:
    r = FakeRecipe("same", tmp_path, tmp_path / "log")
    assert r.key("bullseye") != r.key("bookworm")


def _ensure_in_child(recipe: FakeRecipe, lock_dir: Path, barrier, out) -> None:
    barrier.wait(timeout=10)
    info = ensure_image("trixie", recipe=recipe, store=FileStore(recipe.store_root), lock_dir=lock_dir,
                        progress=lambda s: None)
    out.put(info.tag)


def test_concurrent_ensure_builds_once(tmp_path: Path) -> None:
    """Two processes asking at once: the lock + re-check make exactly one build."""
    recipe = FakeRecipe("concurrent", tmp_path, tmp_path / "builds.log", seconds=0.5)
    ctx = multiprocessing.get_context("fork")
    barrier, out = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_ensure_in_child, args=(recipe, tmp_path, barrier, out)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=20)
    assert [p.exitcode for p in procs] == [0, 0]
    tags = {out.get(timeout=5), out.get(timeout=5)}
    assert len(tags) == 1
    assert builds(tmp_path / "builds.log") == list(tags)


def test_package_list_per_suite(tmp_path: Path) -> None:
    f = tmp_path / "pkgs.txt"
    f.write_text("# comment\nqemu-utils\n\nbullseye: only-old  # why\nnbdkit\n")
    assert read_package_list(f, "bookworm") == ["qemu-utils", "nbdkit"]
    assert read_package_list(f, "bullseye") == ["qemu-utils", "only-old", "nbdkit"]


def test_real_recipe_key_tracks_package_list(tmp_path: Path) -> None:
    real = DebootstrapRecipe()
    pkgs = tmp_path / "p.txt"
    pkgs.write_text(real.packages_file.read_text())
    same = DebootstrapRecipe(packages_file=pkgs)
    assert same.key("bookworm") == real.key("bookworm")
    pkgs.write_text(real.packages_file.read_text() + "nbd-client\n")
    assert DebootstrapRecipe(packages_file=pkgs).key("bookworm") != real.key("bookworm")


def test_image_info_from_labels() -> None:
    info = ImageInfo.from_labels("t", {HARNESS_LABEL: "1", SUITE_LABEL: "sid",
                                       "nbd-harness.version.nbdkit": "1.48.1-1",
                                       "nbd-harness.has.qemu-storage-daemon": "0"})
    assert info.suite == "sid" and info.versions == {"nbdkit": "1.48.1-1"}
    assert info.has == {"qemu-storage-daemon": False}


@pytest.mark.docker
def test_real_suite_image_is_cached_with_version_labels() -> None:
    ok, why = docker_available()
    if not ok:
        pytest.skip(why)
    built: list[str] = []
    t0 = time.monotonic()
    info = ensure_image("bookworm", progress=built.append)
    if built:
        pytest.skip("bookworm image was not cached yet; it has been built now (run again)")
    assert time.monotonic() - t0 < 5, "a cache hit must not rebuild"
    assert info.tag.startswith("nbd-harness/peers:bookworm-")
    assert info.versions["qemu-utils"].startswith("1:7.2")
    assert info.versions["nbdkit"].startswith("1.32")
    assert info.has["qemu-nbd"] and info.has["nbd-server"] and info.has["nbdinfo"]


def test_build_step_failure_carries_the_log_tail() -> None:
    from fixtures.images import ImageBuildError, _run_streamed

    shown: list[str] = []
    with pytest.raises(ImageBuildError, match="exit code 4") as err:
        _run_streamed(["sh", "-c", "for i in $(seq 1 50); do echo line $i; done; exit 4"], shown.append,
                      prefix="[t] ", timeout=10)
    assert "line 50" in str(err.value)
    assert shown[:2] == ["[t] line 1", "[t] line 21"], "progress is shown while it runs"


def test_silent_hanging_build_step_is_killed(tmp_path: Path) -> None:
    from fixtures.images import ImageBuildError, _run_streamed
    from fixtures.runs import proc_start_time

    pidfile = tmp_path / "pid"
    t0 = time.monotonic()
    with pytest.raises(ImageBuildError, match="timed out"):
        _run_streamed(["sh", "-c", f"sleep 30 & echo $! > {pidfile}; echo started; wait"], lambda s: None,
                      prefix="", timeout=2.0)
    assert time.monotonic() - t0 < 6
    pid = int(pidfile.read_text())
    deadline = time.monotonic() + 3                # SIGKILL is delivered asynchronously
    while proc_start_time(pid) is not None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert proc_start_time(pid) is None, "the whole process group is killed"


def test_docker_available_asks_the_engine_once_per_process(monkeypatch: pytest.MonkeyPatch) -> None:
    import fixtures.images as images
    calls: list[int] = []

    def ask() -> tuple[bool, str]:
        calls.append(1)
        return False, "no engine here"

    monkeypatch.setattr(images, "_ask_docker", ask)
    monkeypatch.setattr(images, "_DOCKER_STATUS", None)
    assert docker_available() == docker_available() == (False, "no engine here")
    assert len(calls) == 1


def test_a_timed_out_engine_call_makes_later_docker_peers_not_run_here(monkeypatch: pytest.MonkeyPatch,
                                                                       tmp_path: Any) -> None:
    """A hung engine (a `docker run` that times out) is said once: the next Docker peer of the process is
    skipped at once with the reason, not left to wait out its own 60 s timeout."""
    import requests

    from fixtures import images, plugin
    from fixtures.launchers import docker as docker_launcher
    from fixtures.peerspec import PeerSpec

    class HungContainers:
        def run(self, *args: Any, **kwargs: Any) -> Any:
            raise requests.exceptions.ReadTimeout("UnixHTTPConnectionPool: Read timed out. (read timeout=60)")

    class HungEngine:
        containers = HungContainers()

    monkeypatch.setattr(images, "_DOCKER_STATUS", (True, ""))
    monkeypatch.setattr(docker_launcher, "docker_client", lambda: HungEngine())
    monkeypatch.setattr(docker_launcher, "image_for", lambda spec: ("nbd-harness/peers:none", {}))
    monkeypatch.setattr(docker_launcher, "current_run",
                        lambda: type("R", (), {"labels": lambda self: {}, "run_id": "r-test",
                                                     "workdir": tmp_path})())
    spec = PeerSpec(id="qemu-io-7.2@bookworm", implementation="qemu-io", role="client", version="7.2",
                    launcher="docker", suite="bookworm")
    with pytest.raises(requests.exceptions.ReadTimeout):
        docker_launcher.DockerClientRunner(spec, mounts=(tmp_path,))
    ok, why = images.docker_available()
    assert not ok and "stopped answering" in why and "Read timed out" in why
    assert "stopped answering" in (plugin.skip_reason(None, spec) or "")   # type: ignore[arg-type]


def test_a_docker_rm_that_never_returns_marks_the_engine_and_does_not_raise(monkeypatch: pytest.MonkeyPatch) -> None:
    """The sweep's `docker rm -f` against a hung engine: said, marked, and the run goes on (it used to
    raise TimeoutExpired into every test's set-up)."""
    import subprocess

    from fixtures import images, runs

    def hung(argv: list[str], **kwargs: Any) -> Any:
        raise subprocess.TimeoutExpired(argv, kwargs.get("timeout", 0))

    monkeypatch.setattr(images, "_DOCKER_STATUS", (True, ""))
    monkeypatch.setattr(runs.subprocess, "run", hung)
    runs.remove_containers(["a" * 64, "b" * 64])
    ok, why = images.docker_available()
    assert not ok and "docker rm -f of 2 container(s) did not return within 32 s" in why


def test_missing_images_are_built_side_by_side_and_one_failure_is_said(monkeypatch: pytest.MonkeyPatch,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """`python -m fixtures.images` (./run setup) builds the suites at once; a suite that fails is named and
    makes the exit code 1, and the others are still made."""
    import threading
    import time as _time

    from fixtures import images

    spans: dict[str, tuple[float, float]] = {}
    lock = threading.Lock()

    def fake(suite: str, **_: Any) -> Any:
        t0 = _time.monotonic()
        _time.sleep(0.4)
        with lock:
            spans[suite] = (t0, _time.monotonic())
        if suite == "trixie":
            raise images.ImageBuildError("debootstrap failed: E: no mirror")
        return images.ImageInfo(tag=f"t:{suite}", suite=suite, versions={}, has={}, recipe_key="k")

    monkeypatch.setattr(images, "ensure_image", fake)
    rc = images.main(["bullseye", "bookworm", "trixie", "sid"])
    out, err = capsys.readouterr()
    assert rc == 1 and "trixie: the image could not be made: ImageBuildError: debootstrap failed" in err
    assert [line.split(":")[0] for line in out.splitlines()] == ["bullseye", "bookworm", "sid"]
    starts, ends = [a for a, _ in spans.values()], [b for _, b in spans.values()]
    assert max(starts) < min(ends), f"the builds did not overlap: {spans}"
