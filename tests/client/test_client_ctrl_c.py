"""Ctrl-C stops a consumer the way a person expects: one line, the message in hand finished and
acked, the rest left ready, exit status 0. A real consumer process against a real node."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from tests.conftest import NodeProcess, wait_until

SYNC = """
import sys, time
from lionmq import Client

def handle(message):
    print("handling", message.body, flush=True)
    time.sleep(0.5)

with Client(sys.argv[1]) as client:
    client.consume("jobs", handle, wait_ms=300)
"""

ASYNC = """
import asyncio, sys
from lionmq import AsyncClient

async def handle(message):
    print("handling", message.body, flush=True)
    await asyncio.sleep(0.5)

async def main():
    async with AsyncClient(sys.argv[1]) as client:
        await client.consume("jobs", handle, wait_ms=300)

asyncio.run(main())
"""


def as_from_a_terminal() -> None:
    # A shell starts background jobs with SIGINT ignored; a terminal's foreground job has it.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize("source", [SYNC, ASYNC], ids=["sync", "async"])
def test_ctrl_c_ends_a_consumer_with_one_line(
    node_factory: Callable[..., NodeProcess], tmp_path: Path, source: str
) -> None:
    node = node_factory(tmp_path / "node").start()
    with httpx.Client(base_url=node.url, timeout=5) as http:
        batch = {"messages": [{"body": n} for n in range(5)]}
        assert http.post("/channels/jobs/enqueue", json=batch).status_code == 201
        script = tmp_path / "consumer.py"
        script.write_text(source)
        out, err = tmp_path / "out.txt", tmp_path / "err.txt"
        with out.open("w") as stdout, err.open("w") as stderr:
            consumer = subprocess.Popen(
                [sys.executable, str(script), node.url],
                stdout=stdout,
                stderr=stderr,
                preexec_fn=as_from_a_terminal,
            )
        try:
            wait_until(lambda: out.read_text(), 15, "the consumer's first message")
            consumer.send_signal(signal.SIGINT)
            consumer.wait(timeout=15)
        finally:
            consumer.kill()
        assert err.read_text().splitlines() == [
            "Ctrl-C: consumer of 'jobs' stopping (press it again to quit now)"
        ]
        assert consumer.returncode == 0
        assert out.read_text().splitlines() == ["handling 0"]  # nothing taken after Ctrl-C
        counts = http.get("/channels/jobs").json()["counts"]
        totals = http.get("/channels/jobs").json()["totals"]
    # The message in hand was finished and acked; nothing is left leased to nobody.
    assert counts == {"ready": 4, "delayed": 0, "in_flight": 0}
    assert totals["acked"] == 1
