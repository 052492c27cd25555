"""Free loopback ports, bounded waits and server processes, shared by the node, RabbitMQ and
NATS controllers."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import tempfile
import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from subprocess import STDOUT, Popen, TimeoutExpired
from types import TracebackType
from typing import IO, Self

import psutil


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def accepts(port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    """Polls `predicate` until true; raises TimeoutError naming `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")


async def until_answers(attempt: Callable[[], Awaitable[None]], within_s: float) -> None:
    """Retries `attempt` (a client's handshake: a port accepts before its server answers)
    every 0.2 s until it succeeds; its last error once `within_s` have passed."""
    deadline = time.monotonic() + within_s
    while True:
        try:
            await attempt()
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


def spawn(command: list[str], env: Mapping[str, str], cwd: Path, out: IO[bytes]) -> Popen[bytes]:
    """A server process in a session of its own, so that it can be killed as a group."""
    return Popen(command, env=dict(env), cwd=cwd, stdout=out, stderr=STDOUT, start_new_session=True)


def wait_ready(
    ready: Callable[[], bool], timeout: float, what: str, stop: Callable[[], None]
) -> None:
    """`wait_for`, stopping the server when it never gets ready."""
    try:
        wait_for(ready, timeout, what)
    except BaseException:
        stop()
        raise


def terminate(proc: Popen[bytes], grace: float, *, group: bool = True) -> None:
    """SIGTERM, SIGKILL after `grace` s, and reaped: to the process group of a server spawned
    in a session of its own, or (group=False) to its PID alone."""
    kill = os.killpg if group else os.kill
    with contextlib.suppress(ProcessLookupError):
        kill(proc.pid, signal.SIGTERM)
    try:
        proc.wait(grace)
    except TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            kill(proc.pid, signal.SIGKILL)
        proc.wait()


class ServerProcess(ABC):
    """A server we run on a free loopback port from a temp dir of its own (its output in
    OUTPUT there), stopped by PID and the dir removed on `stop()`, error or not."""

    NAME = "the server"
    OUTPUT = "server.out"

    def __init__(self, *, prefix: str, boot_timeout: float) -> None:
        self.port = free_port()
        self.boot_timeout = boot_timeout
        self.dir = Path(tempfile.mkdtemp(prefix=prefix))
        self.proc: Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @abstractmethod
    def start(self) -> Self: ...

    @abstractmethod
    def end(self, proc: Popen[bytes]) -> None:
        """Ends the running server `proc`."""

    def launch(self, command: list[str], env: Mapping[str, str], what: str) -> None:
        """Spawns the server and waits until `answers()` (stopping it if it never does)."""
        with (self.dir / self.OUTPUT).open("wb") as out:
            self.proc = spawn(command, env, self.dir, out)
        wait_ready(self._ready, self.boot_timeout, what, self.stop)

    def answers(self) -> bool:
        return accepts(self.port)

    def _ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"{self.NAME} exited with {self.proc.returncode}: {self.tail()}")
        return self.answers()

    def tail(self, size: int = 2000) -> str:
        try:
            return (self.dir / self.OUTPUT).read_text(errors="replace")[-size:]
        except OSError:
            return ""

    def rss_bytes(self) -> int:
        return int(psutil.Process(self.pid).memory_info().rss)

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            self.end(proc)
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
