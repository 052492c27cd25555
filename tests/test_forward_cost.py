"""What forwarding costs: the same requests sent straight to the owner and through another node.

Two node processes on loopback ports with separate stores; node A forwards channel `bench` to
node B (a fixed router, tests/forward_node.py). One client, one request at a time, kept-alive
connections: the difference of the latencies is the hop. The figures (README):

    .venv/bin/python -m pytest -q -s -m slow tests/test_forward_cost.py

The default suite runs a short version that checks the figures come out, not their values.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil
import pytest

from tests.conftest import ROOT, free_port, wait_until


class Proc:
    def __init__(self, tmp: Path, node_id: str, **env: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tmp / f"{node_id}.log"
        full_env = {
            **os.environ,
            "HOST": "127.0.0.1",
            "PORT": str(self.port),
            "NODE_ID": node_id,
            "STORE_URL": f"sqlite:///{tmp}/{node_id}.db",
            "LOG_LEVEL": "warning",
            "PYTHONPATH": str(ROOT),
            **env,
        }
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tests.forward_node"],
                cwd=tmp,  # not ROOT: a developer's .env must not change the nodes
                env=full_env,
                stdout=log,
                stderr=log,
            )
        wait_until(self._ready, 20, f"{node_id} (log: {self.log})")

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"node exited: {self.log.read_text()}")
        try:
            return httpx.get(self.url + "/ready", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


@pytest.fixture
def nodes(tmp_path: Path) -> Iterator[tuple[Proc, Proc]]:
    started: list[Proc] = []
    try:
        b = Proc(tmp_path, "node-b")
        started.append(b)
        a = Proc(tmp_path, "node-a", FORWARD_ROUTES=f"bench={b.url}=node-b")
        started.append(a)
        yield a, b
    finally:
        for p in started:
            p.kill()


def latencies(client: httpx.Client, url: str, body: bytes, n: int) -> list[float]:
    """Microseconds per request, `n` requests one after another."""
    out = []
    for _ in range(n):
        start = time.perf_counter()
        r = client.post(url, content=body, headers={"content-type": "application/json"})
        out.append((time.perf_counter() - start) * 1e6)
        assert r.status_code in (200, 201), r.text
    return out


def cpu_us(proc: Proc) -> float:
    times = psutil.Process(proc.proc.pid).cpu_times()
    return (times.user + times.system) * 1e6


@dataclass
class Figures:
    """Microseconds: latency median and p90 seen by the client, CPU per request of each node."""

    direct: list[float] = field(default_factory=list)
    forwarded: list[float] = field(default_factory=list)
    cpu_owner_direct: float = 0.0  # the owner's CPU per direct request
    cpu_edge: float = 0.0  # the forwarding node's CPU per forwarded request (the hop's cost)
    cpu_owner_forwarded: float = 0.0  # the owner's CPU per forwarded request


def figures(a: Proc, b: Proc, n: int) -> dict[str, Figures]:
    operations = {
        "enqueue 1 message": ("enqueue", b'{"messages": [{"body": 1}]}'),
        "dequeue, empty channel": ("dequeue", b'{"max": 1}'),
    }
    out = {}
    with httpx.Client(timeout=10) as client:
        client.put(f"{b.url}/channels/bench").raise_for_status()
        for name, (verb, body) in operations.items():
            path = f"/channels/bench/{verb}"
            if verb == "dequeue":
                client.post(f"{b.url}/channels/bench/purge").raise_for_status()
            latencies(client, a.url + path, body, max(5, n // 10))  # warm both connections
            f = out[name] = Figures()
            for _ in range(5):  # interleaved, so that load from the other sessions hits both
                before_b = cpu_us(b)
                f.direct += latencies(client, b.url + path, body, n // 5)
                f.cpu_owner_direct += cpu_us(b) - before_b
                before_a, before_b = cpu_us(a), cpu_us(b)
                f.forwarded += latencies(client, a.url + path, body, n // 5)
                f.cpu_edge += cpu_us(a) - before_a
                f.cpu_owner_forwarded += cpu_us(b) - before_b
            f.cpu_owner_direct /= len(f.direct)
            f.cpu_edge /= len(f.forwarded)
            f.cpu_owner_forwarded /= len(f.forwarded)
            r = client.post(
                a.url + path, content=body, headers={"content-type": "application/json"}
            )
            assert r.headers["x-lionmq-forwarded-by"] == "node-a"
            assert r.headers["x-lionmq-node"] == "node-b"
    return out


def report(result: dict[str, Figures], n: int) -> None:
    print(f"\nforward cost, {n} sequential requests each way (µs):")
    for name, f in result.items():
        d, fw = statistics.median(f.direct), statistics.median(f.forwarded)
        d90, f90 = (statistics.quantiles(x, n=10)[-1] for x in (f.direct, f.forwarded))
        print(
            f"  {name}: latency median/p90 direct {d:.0f}/{d90:.0f}, forwarded {fw:.0f}/{f90:.0f}"
            f" (+{fw - d:.0f}); CPU per request: owner {f.cpu_owner_direct:.0f} direct,"
            f" {f.cpu_owner_forwarded:.0f} forwarded; forwarding node {f.cpu_edge:.0f}"
        )


def test_forward_cost_short(nodes: tuple[Proc, Proc]) -> None:
    result = figures(*nodes, n=20)
    assert set(result) == {"enqueue 1 message", "dequeue, empty channel"}
    assert all(len(f.direct) == len(f.forwarded) == 20 for f in result.values())


@pytest.mark.slow
def test_forward_cost(nodes: tuple[Proc, Proc]) -> None:
    n = 1000
    report(figures(*nodes, n=n), n)
