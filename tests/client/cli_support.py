"""Running the installed `lionmq` script as a user types it: in a pipe, or on a terminal."""

from __future__ import annotations

import io
import os
import pty
import select
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

LIONMQ = Path(sys.executable).parent / "lionmq"
"""The console script `pip install ./client` put next to this interpreter."""


def cli_env(**env: str) -> dict[str, str]:
    """The test process's environment without any LIONMQ_* setting of the developer's."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("LIONMQ_")}
    return {**base, **env}


@dataclass
class Ran:
    code: int
    out: str
    err: str


def lionmq(*args: str, env: dict[str, str], input: str | None = None, timeout: float = 30) -> Ran:
    """`lionmq ARGS` with stdin, stdout and stderr on pipes (no terminal)."""
    done = subprocess.run(
        [str(LIONMQ), *args],
        env=env,
        input=input if input is not None else "",
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return Ran(done.returncode, done.stdout, done.stderr)


def lionmq_on_tty(*args: str, env: dict[str, str], answer: str = "", timeout: float = 30) -> Ran:
    """`lionmq ARGS` with stdin and stderr on a pseudo-terminal (stdout on a pipe), typing
    `answer` at it; `err` is what the terminal showed (the typed answer echoed too)."""
    master, slave = pty.openpty()
    with tempfile.TemporaryFile() as out:
        proc = subprocess.Popen(
            [str(LIONMQ), *args], env=env, stdin=slave, stdout=out, stderr=slave
        )
        os.close(slave)
        if answer:
            os.write(master, answer.encode())
        shown = bytearray()
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                ready, _, _ = select.select([master], [], [], 0.1)
                if not ready:
                    continue
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO: the child closed the terminal (it exited)
                    break
                if not data:
                    break
                shown += data
            code = proc.wait(timeout=max(deadline - time.monotonic(), 1))
        finally:
            os.close(master)
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        out.seek(0)
        return Ran(code, out.read().decode(), shown.decode(errors="replace"))


def lionmq_here(*args: str, env: dict[str, str]) -> Ran:
    """`lionmq ARGS` run in this process (`lionmq.cli.main`, the entry point's function) with
    `env` as the whole environment: the same code as the script without a Python start-up,
    for the variants of a command one subprocess has shown working already."""
    from lionmq.cli.main import main

    out, err = io.StringIO(), io.StringIO()
    with mock.patch.dict(os.environ, env, clear=True):
        code = main(list(args), out, err)
    return Ran(code, out.getvalue(), err.getvalue())
