"""Shared fixtures: real node processes on free loopback ports, and an in-process node."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI
from mongomock_motor import AsyncMongoMockClient

from app.clock import SystemClock
from app.main import create_app
from app.settings import Settings
from app.store.mongo import MongoStore

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_until(predicate: object, timeout: float, what: str, interval: float = 0.02) -> None:
    """Poll `predicate` until it is true or `timeout` seconds pass (then fail, naming `what`)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


class NodeProcess:
    """`python -m app` in a subprocess, as a user would run it."""

    def __init__(self, data_dir: Path, port: int | None = None, **env: str) -> None:
        self.data_dir = data_dir
        self.port = port or free_port()
        self.env = {
            **os.environ,
            "HOST": "127.0.0.1",
            "PORT": str(self.port),
            "NODE_ID": f"test-{self.port}",
            "STORE_URL": f"sqlite:///{data_dir}/lionmq.db",
            "LOG_LEVEL": "warning",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
            **env,
        }
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = data_dir / f"node-{self.port}.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 20) -> NodeProcess:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as log:
            # Run from the data dir, not ROOT: settings read `.env` from the working directory,
            # and a developer's .env must not change what a test starts.
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "app"],
                cwd=self.data_dir,
                env=self.env,
                stdout=log,
                stderr=log,
            )
        wait_until(self._healthy, timeout, f"node on port {self.port} (log: {self.log})")
        return self

    def _healthy(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"node exited with {self.proc.returncode}: {self.log.read_text()}")
        try:
            return httpx.get(self.url + "/ready", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def kill9(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill9()


@pytest.fixture
def node_factory(tmp_path: Path) -> Iterator[type[NodeProcess]]:
    started: list[NodeProcess] = []

    class Tracked(NodeProcess):
        def start(self, timeout: float = 20) -> NodeProcess:
            started.append(self)
            return super().start(timeout)

    yield Tracked
    for n in started:
        n.kill9()


@pytest.fixture
def node(node_factory: type[NodeProcess], tmp_path: Path) -> NodeProcess:
    return node_factory(tmp_path / "node").start()


def make_settings(tmp_path: Path, **overrides: object) -> Settings:
    """Settings for an in-process node: from the arguments only, never from a `.env`."""
    return Settings(
        _env_file=None,  # type: ignore[call-arg]
        store_url=f"sqlite:///{tmp_path}/inproc.db",
        node_id="inproc",
        **overrides,  # type: ignore[arg-type]
    )


@pytest.fixture(params=["sqlite", "mongomock"])
async def app_client(
    tmp_path: Path, request: pytest.FixtureRequest
) -> AsyncIterator[httpx.AsyncClient]:
    """An in-process node (lifespan running) behind an httpx client, on each store."""
    store = None
    if request.param == "mongomock":
        store = MongoStore(database="lionmq", client=AsyncMongoMockClient(), clock=SystemClock())
    app: FastAPI = create_app(make_settings(tmp_path), store=store)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app), base_url="http://localhost"
        ) as client,
    ):
        yield client
