"""The warm client containers' command agent (fixtures/launchers/exec_agent.py), run on the host's python3:
what it answers for a command, its input, its exit code, its timeout, and for a request it cannot take."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fixtures.launchers.exec_agent import AGENT_SOURCE, AgentClient, AgentError


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[AgentClient]:
    sock = tmp_path / "agent.sock"
    proc = subprocess.Popen([sys.executable, "-c", AGENT_SOURCE, str(sock)])
    client = AgentClient(sock)
    deadline = time.monotonic() + 10
    while not client.ready():
        assert proc.poll() is None and time.monotonic() < deadline, "the agent did not come up"
        time.sleep(0.02)
    yield client
    proc.terminate()
    assert proc.wait(5) == 0, "SIGTERM ends the agent"


def test_output_and_exit_code(agent: AgentClient) -> None:
    r = agent.run(["sh", "-c", "echo out; echo err >&2; exit 3"], 10)
    assert (r.rc, r.stdout, r.stderr, r.timed_out) == (3, "out\n", "err\n", False)


def test_input_reaches_the_command(agent: AgentClient) -> None:
    data = bytes(range(256)) * 1024
    r = agent.run(["sha256sum"], 10, input=data)
    import hashlib
    assert r.ok and r.stdout.split()[0] == hashlib.sha256(data).hexdigest()


def test_without_input_stdin_is_empty(agent: AgentClient) -> None:
    r = agent.run(["wc", "-c"], 10)
    assert r.ok and r.stdout.strip() == "0"


def test_large_output_arrives_whole(agent: AgentClient) -> None:
    r = agent.run(["head", "-c", str(5 << 20), "/dev/zero"], 20)
    assert r.ok and len(r.stdout) == 5 << 20


def test_missing_binary_is_127(agent: AgentClient) -> None:
    r = agent.run(["/nonexistent/tool"], 10)
    assert r.rc == 127 and "nonexistent" in r.stderr


def test_late_command_and_its_children_are_killed(agent: AgentClient, tmp_path: Path) -> None:
    """The agent kills the command's whole process group at its timeout, a child of it too."""
    pidfile = tmp_path / "child.pid"
    t0 = time.monotonic()
    r = agent.run(["sh", "-c", f"sleep 60 & echo $! > {pidfile}; wait"], 1)
    assert r.timed_out and r.rc is None and time.monotonic() - t0 < 8
    child = Path(f"/proc/{pidfile.read_text().strip()}/status")
    deadline = time.monotonic() + 5
    while child.exists() and "State:\tZ" not in _read(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not child.exists() or "State:\tZ" in _read(child), "the command's child outlived its timeout"


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except FileNotFoundError:
        return ""


def test_commands_run_side_by_side(agent: AgentClient) -> None:
    import threading
    results: list[float] = []

    def one() -> None:
        t0 = time.monotonic()
        assert agent.run(["sleep", "1"], 10).ok
        results.append(time.monotonic() - t0)
    threads = [threading.Thread(target=one) for _ in range(3)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 3 and time.monotonic() - t0 < 2.5, "one slow command must not hold the others"


@pytest.mark.parametrize("request_line", [b'{"argv": ["true"]\n', b'{"argv": "true", "timeout": 5}\n'],
                         ids=["not-json", "argv-a-string"])
def test_a_bad_request_gets_an_error(agent: AgentClient, request_line: bytes) -> None:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(5)
        s.connect(str(agent.socket_path))
        s.sendall(request_line)
        answer = json.loads(s.makefile("rb").readline())
    assert "bad request" in answer["error"]


def test_an_agent_lost_during_a_command_says_the_request_was_sent(tmp_path: Path) -> None:
    """Connecting failed (sent False: the command can go elsewhere) versus lost after the request went out
    (sent True: it may have run)."""
    sock = tmp_path / "agent.sock"
    proc = subprocess.Popen([sys.executable, "-c", AGENT_SOURCE, str(sock)])
    client = AgentClient(sock)
    deadline = time.monotonic() + 10
    while not client.ready():
        assert time.monotonic() < deadline
        time.sleep(0.02)
    with pytest.raises(AgentError) as lost:
        client.run(["sh", "-c", f"kill -9 {proc.pid}; sleep 2"], 10)
    assert lost.value.sent
    proc.wait(5)
    with pytest.raises(AgentError) as refused:
        client.run(["true"], 5)
    assert not refused.value.sent


def test_an_agent_that_is_gone_is_an_agent_error(tmp_path: Path) -> None:
    with pytest.raises(AgentError, match="agent at") as gone:
        AgentClient(tmp_path / "none.sock").run(["true"], 5)
    assert not gone.value.sent
