"""Runs a LionMQ node (`python -m app`) in its own process group on a free loopback port."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from types import TracebackType
from typing import IO

import httpx
import psutil

from bench.ports import free_port, spawn, wait_ready

# The durability the node ships with; the report prints it next to the figures.
DURABILITY = (
    "embedded SQLite store, WAL, synchronous=FULL; every enqueue committed (group commit) "
    "before 201, every ack committed before 200"
)


class Node:
    """A node with an embedded store in a fresh temp dir, killed and removed on `stop()`."""

    def __init__(self, *, ready_timeout: float = 30.0, **env: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.ready_timeout = ready_timeout
        self.extra_env = env
        self.dir = Path(tempfile.mkdtemp(prefix="lionmq-bench-"))
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> Node:
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
        self._log = (self.dir / "node.log").open("wb")
        # cwd: the temp dir, which keeps the project's .env from changing the durable defaults.
        self.proc = spawn([sys.executable, "-m", "app"], env, self.dir, self._log)
        wait_ready(self._ready, self.ready_timeout, f"the node's /ready on {self.url}", self.stop)
        return self

    def _ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"the node exited with {self.proc.returncode}: {self.log_tail()}")
        try:
            return httpx.get(f"{self.url}/ready", timeout=1.0).status_code == 200
        except httpx.HTTPError:
            return False

    def log_tail(self, size: int = 2000) -> str:
        try:
            return (self.dir / "node.log").read_text(errors="replace")[-size:]
        except OSError:
            return ""

    def rss_bytes(self) -> int:
        return int(psutil.Process(self.pid).memory_info().rss)

    def cpu_seconds(self) -> float:
        times = psutil.Process(self.pid).cpu_times()
        return float(times.user + times.system)

    def stop(self) -> None:
        """Kills the node's process group (SIGKILL after a short grace) and removes its dir."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            kill_group(proc)
        if self._log is not None:
            self._log.close()
            self._log = None
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Node:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def kill_group(proc: subprocess.Popen[bytes], grace: float = 3.0) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass
