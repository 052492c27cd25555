"""`make cluster` as a newcomer runs it: the real Makefile target on free loopback ports, its
printed URLs and secrets used as printed, a primary killed with -9 and its backup taking over,
the death reported, then SIGINT: every process it started is gone and it exits 0."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import ROOT, free_port, wait_until

MAKE = shutil.which("make")
START_S = 60.0  # 5 processes on a loaded 2-core machine
TAKEOVER_S = 10.0  # LEASE_MS (2 s) plus a keeper tick, with room for the load
STOP_S = 30.0
NODE_LINE = re.compile(r"^\s+(node\d|watcher)\s+(http://\S+?)/?\s+pid (\d+)\s+(.*)$")


class Launcher:
    """`make cluster` in a session of its own, its output collected line by line."""

    def __init__(self, *args: str) -> None:
        # -o: never reinstall the venv from here, whatever the stamps say.
        argv = [MAKE or "make", "--no-print-directory", "-o", ".venv/.installed", "cluster", *args]
        self.proc = subprocess.Popen(
            argv,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def saw(self, pattern: str) -> bool:
        if self.proc.poll() is not None and not self._reader.is_alive():
            raise AssertionError(f"make cluster exited with {self.proc.returncode}:\n{self.output}")
        return re.search(pattern, self.output, re.MULTILINE) is not None

    def processes(self) -> dict[str, tuple[str, int, str]]:
        """name -> (url, pid, role) as the banner printed them."""
        found = (NODE_LINE.match(line) for line in self.lines)
        return {m[1]: (m[2], int(m[3]), m[4]) for m in found if m}

    def kill(self) -> None:
        """The safety net: the whole session, whatever state the test left it in."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


@pytest.fixture
def launcher() -> Iterator[Launcher]:
    if MAKE is None:
        pytest.fail("make is missing (apt-get install make)")
    ports = [free_port() for _ in range(5)]
    run = Launcher(
        f"CLUSTER_PORTS={','.join(map(str, ports[:4]))}", f"CLUSTER_WATCHER_PORT={ports[4]}"
    )
    yield run
    run.kill()


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def cluster_view(url: str, token: str) -> dict[str, Any]:
    answer = httpx.get(url + "/cluster", headers={"Authorization": f"Bearer {token}"}, timeout=2)
    answer.raise_for_status()
    view: dict[str, Any] = answer.json()
    return view


def watcher_nodes(url: str) -> dict[str, int]:
    counts: dict[str, int] = httpx.get(url + "/health", timeout=2).json()["nodes"]
    return counts


def owners(url: str, token: str) -> dict[str, str | None]:
    try:
        return {s["id"]: s["owner"] for s in cluster_view(url, token)["shards"]}
    except httpx.HTTPError:
        return {}


def test_make_cluster_shows_a_failover_and_stops_everything(launcher: Launcher) -> None:
    wait_until(lambda: launcher.saw(r"^Stop everything: Ctrl-C"), START_S, "the banner")
    procs = launcher.processes()
    assert sorted(procs) == ["node1", "node2", "node3", "node4", "watcher"], launcher.output
    token_match = re.search(r"LIONMQ_TOKEN=(\w+)", launcher.output)
    assert token_match, launcher.output
    token = token_match[1]
    launcher_match = re.search(r"Ctrl-C \(or kill (\d+)\)", launcher.output)
    assert launcher_match, launcher.output
    launcher_pid = int(launcher_match[1])

    # As printed: GET /cluster with the generated token shows 2 shards, each owned by its primary.
    view = cluster_view(procs["node1"][0], token)
    shards = {s["id"]: s for s in view["shards"]}
    assert sorted(shards) == ["s1", "s2"]
    for shard in shards.values():
        assert shard["owner"] == shard["primary"] and len(shard["backups"]) == 1
    assert procs["node1"][2] == "primary of s1" and procs["node2"][2] == "backup of s1"
    assert shards["s1"]["primary"] == procs["node1"][0]
    # Every node reports to the watcher (its WATCHER_URL and WATCHER_TOKEN are right).
    wait_until(lambda: watcher_nodes(procs["watcher"][0]).get("up") == 4, 10, "4 nodes up")
    # The failover it tells you to try: kill -9 the primary of s1, as printed.
    assert re.search(rf"kill -9 {procs['node1'][1]}\b", launcher.output)
    os.kill(procs["node1"][1], signal.SIGKILL)
    backup = procs["node2"][0]
    wait_until(
        lambda: owners(backup, token).get("s1") == backup, TAKEOVER_S, "node2 owning s1", 0.1
    )
    wait_until(lambda: launcher.saw(r"^!! node1 .* killed by SIGKILL; not restarted"), 5, "report")
    wait_until(lambda: launcher.saw(r"^-- s1: owner node2 "), 5, "the owner change reported")

    # Ctrl-C: SIGINT to the launcher; make then exits with its status, 0.
    os.kill(launcher_pid, signal.SIGINT)
    assert launcher.proc.wait(STOP_S) == 0, launcher.output
    assert launcher.lines[-1] == "stopped.", launcher.output
    for name, (_, pid, _) in procs.items():
        assert not alive(pid), f"{name} (pid {pid}) outlived the launcher"
    assert not alive(launcher_pid)


def test_a_busy_port_is_refused_before_anything_starts(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        ports = f"{free_port()},{port},{free_port()},{free_port()}"
        run = subprocess.run(
            [sys.executable, "scripts/local_cluster.py", "--ports", ports, "--data", str(tmp_path)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert run.returncode == 2, run.stdout + run.stderr
    assert f"port {port} on 127.0.0.1 is in use" in run.stdout
    assert "CLUSTER_PORTS=" in run.stdout  # how to choose others
    assert not list(tmp_path.iterdir()), "nothing was started"
