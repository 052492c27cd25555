"""Runs a LionMQ node (`python -m app`) in its own process group on a free loopback port."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Self

import httpx
import psutil

from bench.ports import ServerProcess, terminate

# The durability the node ships with; the report prints it next to the figures.
DURABILITY = (
    "embedded SQLite store, WAL, synchronous=FULL; every enqueue committed (group commit) "
    "before 201, every ack committed before 200"
)


class Node(ServerProcess):
    """A node with an embedded store in a fresh temp dir, killed and removed on `stop()`."""

    NAME = "the node"
    OUTPUT = "node.log"

    def __init__(self, *, ready_timeout: float = 30.0, **env: str) -> None:
        super().__init__(prefix="lionmq-bench-", boot_timeout=ready_timeout)
        self.url = f"http://127.0.0.1:{self.port}"
        self.extra_env = env

    def start(self) -> Self:
        env = {
            **os.environ,
            "HOST": "127.0.0.1",
            "PORT": str(self.port),
            "NODE_ID": f"bench-{self.port}",
            "STORE_URL": f"sqlite:///{self.dir}/lionmq.db",
            "LOG_LEVEL": "warning",
            "API_TOKEN": "",
            "WATCHER_URL": "",
            **self.extra_env,
        }
        # cwd: the temp dir, which keeps the project's .env from changing the durable defaults.
        self.launch([sys.executable, "-m", "app"], env, f"the node's /ready on {self.url}")
        return self

    def answers(self) -> bool:
        try:
            return httpx.get(f"{self.url}/ready", timeout=1.0).status_code == 200
        except httpx.HTTPError:
            return False

    def cpu_seconds(self) -> float:
        times = psutil.Process(self.pid).cpu_times()
        return float(times.user + times.system)

    def end(self, proc: subprocess.Popen[bytes]) -> None:
        """Kills the node's process group (SIGKILL after a short grace)."""
        terminate(proc, 3.0)
