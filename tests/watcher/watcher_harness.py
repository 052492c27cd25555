"""The watcher tests' harness: real processes on free loopback ports, and a feed reader."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
from websockets.asyncio.client import ClientConnection, connect

REPO = Path(__file__).resolve().parents[2]
TOKEN = "test-watcher-token-0123456789"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(predicate: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def child_env(extra: dict[str, str]) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("WATCHER_", "LIONMQ_")) and "proxy" not in k.lower()
    }
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path
    base_url: str

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
            try:
                self.popen.wait(5)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)


def _listens(pid: int, port: int) -> bool:
    try:
        process = psutil.Process(pid)
        # net_connections since psutil 6; connections before (pyproject allows 5.9).
        listing = getattr(process, "net_connections", None) or process.connections
        sockets = listing(kind="tcp")
    except psutil.NoSuchProcess:
        return False
    return any(c.status == psutil.CONN_LISTEN and c.laddr.port == port for c in sockets)


def _healthy(url: str) -> bool:
    try:
        return httpx.get(url, timeout=0.5).status_code == 200
    except httpx.HTTPError:
        return False


@dataclass
class Processes:
    tmp: Path
    started: list[Proc] = field(default_factory=list)

    def spawn(self, name: str, args: list[str], env: dict[str, str], base_url: str) -> Proc:
        log = self.tmp / f"{name}.log"
        with log.open("wb") as out:
            popen = subprocess.Popen(
                [sys.executable, *args],
                cwd=self.tmp,
                env=child_env(env),
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        proc = Proc(name, popen, log, base_url)
        self.started.append(proc)
        return proc

    def wait_healthy(self, proc: Proc, timeout: float = 30.0) -> Proc:
        port = int(proc.base_url.rsplit(":", 1)[1])

        def ready() -> bool:
            if not proc.alive():
                raise AssertionError(f"{proc.name} exited:\n{proc.output()}")
            # The port was free when picked, but another process (other tests share this
            # machine) may have taken it since: talk only to a server that is our child.
            return _listens(proc.popen.pid, port) and _healthy(proc.base_url + "/health")

        wait_until(ready, timeout, f"{proc.name} /health")
        return proc

    def watcher(self, name: str = "watcher", port: int | None = None, **settings: str) -> Proc:
        port = port or free_port()
        env = {
            "WATCHER_HOST": "127.0.0.1",
            "WATCHER_PORT": str(port),
            "WATCHER_TOKEN": TOKEN,
            "WATCHER_HISTORY_STEP_MS": "200",
            "WATCHER_LOG_LEVEL": "warning",
            **{f"WATCHER_{k.upper()}": v for k, v in settings.items()},
        }
        return self.wait_healthy(
            self.spawn(name, ["-m", "watcher"], env, f"http://127.0.0.1:{port}")
        )

    def node(
        self,
        watcher: Proc | None,
        node_id: str,
        interval_ms: int = 200,
        db: Path | None = None,
        timeout: float = 15.0,
    ) -> Proc:
        """A real LionMQ node (`python -m app`) pushing to `watcher` (if any), on store `db`."""
        port = free_port()
        env = {
            "HOST": "127.0.0.1",
            "PORT": str(port),
            "NODE_ID": node_id,
            "STORE_URL": f"sqlite:///{db or self.tmp / (str(port) + '.db')}",
            "METRICS_INTERVAL_MS": str(interval_ms),
            "LOG_LEVEL": "warning",
        }
        if watcher is not None:
            env["WATCHER_URL"] = watcher.base_url.replace("http://", "ws://") + "/ingest"
            env["WATCHER_TOKEN"] = TOKEN
        return self.wait_healthy(
            self.spawn(f"node-{port}", ["-m", "app"], env, f"http://127.0.0.1:{port}"), timeout
        )

    def fake_node(
        self,
        watcher_base_url: str,
        node_id: str,
        interval_ms: int = 200,
        server_host: str = "",
        cluster_view: Path | None = None,
    ) -> Proc:
        """The real pusher fed by a fake engine (tests/watcher/fake_node.py); with
        `cluster_view`, that JSON file is its GET /cluster document."""
        env = {
            "NODE_ID": node_id,
            "PORT": "9",
            "WATCHER_URL": watcher_base_url.replace("http://", "ws://") + "/ingest",
            "WATCHER_TOKEN": TOKEN,
            "METRICS_INTERVAL_MS": str(interval_ms),
        }
        if server_host:
            env["SERVER_HOST"] = server_host
        if cluster_view is not None:
            env["FAKE_CLUSTER_VIEW"] = str(cluster_view)
        script = str(Path(__file__).with_name("fake_node.py"))
        return self.spawn(f"fake-{len(self.started)}", [script], env, "")

    def close(self) -> None:
        for proc in reversed(self.started):
            proc.stop()


def node_available() -> bool:
    return (REPO / "app" / "main.py").exists() and (REPO / "app" / "__main__.py").exists()


class Feed:
    """A browser's view of `/feed`, kept up to date from the messages it receives."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.nodes: dict[str, dict[str, Any]] = {}
        self.history: dict[str, list[Any]] = {}
        self.messages: list[dict[str, Any]] = []
        self.cluster: dict[str, Any] = {}

    def apply(self, msg: dict[str, Any]) -> None:
        self.messages.append(msg)
        if msg["type"] == "hello":
            self.nodes = {n["id"]: n for n in msg["nodes"]}
            self.history = msg["history"]
            self.cluster = msg["cluster"]
        elif msg["type"] == "node":
            self.nodes[msg["node"]["id"]] = msg["node"]
            if msg["point"] is not None:
                self.history.setdefault(msg["node"]["id"], []).append(msg["point"])
        elif msg["type"] == "status":
            for node_id, st in msg["nodes"].items():
                if node_id in self.nodes:
                    self.nodes[node_id].update(st)
        elif msg["type"] == "cluster":
            self.cluster = msg["cluster"]

    async def until(self, predicate: Callable[[Feed], bool], within: float, what: str) -> None:
        async def pump() -> None:
            while not predicate(self):
                self.apply(json.loads(await self.ws.recv()))

        try:
            await asyncio.wait_for(pump(), within)
        except TimeoutError:
            raise AssertionError(f"timed out after {within}s waiting for {what}") from None


async def open_feed(base_url: str) -> Feed:
    ws = await connect(base_url.replace("http://", "ws://") + "/feed", proxy=None, max_size=None)
    feed = Feed(ws)
    feed.apply(json.loads(await asyncio.wait_for(ws.recv(), 5)))
    return feed
