"""Free loopback ports, bounded waits and server processes, shared by the node and RabbitMQ
controllers."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from subprocess import STDOUT, Popen
from typing import IO


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
