"""Enqueue throughput, latency and client CPU per request of `AsyncClient` against a real node.

Starts `python -m app` (embedded SQLite store in a temp dir, free loopback port), then runs for
--seconds each: 32 tasks enqueueing one 16-byte message at a time, and 4 tasks enqueueing
batches of 100. Client CPU is this process's `time.process_time()` over the run; node CPU is
the node process's, both per request.

    .venv/bin/python client/scripts/enqueue_load.py [--seconds 5] [--asyncio]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager

import httpx
import psutil
from lionmq import AsyncClient


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextmanager
def node() -> Iterator[tuple[str, psutil.Process]]:
    tmp = tempfile.mkdtemp(prefix="lionmq-load-")
    port = free_port()
    env = {
        **os.environ,
        "HOST": "127.0.0.1",
        "PORT": str(port),
        "STORE_URL": f"sqlite:///{tmp}/x.db",
        "LOG_LEVEL": "warning",
        "API_TOKEN": "",
        "WATCHER_URL": "",
    }
    proc = subprocess.Popen([sys.executable, "-m", "app"], env=env, cwd=tmp)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{url}/ready", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("the node did not start")
            time.sleep(0.1)
        yield url, psutil.Process(proc.pid)
    finally:
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)


async def measure(
    name: str,
    tasks: int,
    per_request: int,
    op: Callable[[], Awaitable[object]],
    seconds: float,
    server: psutil.Process,
) -> None:
    for _ in range(20):  # warm up: connections, caches
        await op()
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds

    async def worker() -> None:
        while time.perf_counter() < deadline:
            t0 = time.perf_counter()
            await op()
            latencies.append(time.perf_counter() - t0)

    server_cpu0 = sum(server.cpu_times()[:2])
    cpu0, start = time.process_time(), time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(tasks)))
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - start
    server_cpu = sum(server.cpu_times()[:2]) - server_cpu0
    latencies.sort()
    n = len(latencies)
    p50, p99 = latencies[n // 2] * 1000, latencies[min(n - 1, int(n * 0.99))] * 1000
    print(
        f"{name:24} {n * per_request / wall:9.0f} msg/s  {n / wall:7.0f} req/s  "
        f"p50 {p50:6.2f} ms  p99 {p99:6.2f} ms  "
        f"client {cpu / n * 1e6:5.0f} us/req ({cpu / wall:4.0%})  "
        f"node {server_cpu / n * 1e6:5.0f} us/req ({server_cpu / wall:4.0%})",
        flush=True,
    )


async def main(url: str, server: psutil.Process, seconds: float) -> None:
    async with AsyncClient(url) as client:
        one, batch = "x" * 16, ["x" * 16] * 100
        await measure("enqueue x32", 32, 1, lambda: client.enqueue("c", one), seconds, server)
        await measure(
            "enqueue_many(100) x4", 4, 100, lambda: client.enqueue_many("c", batch), seconds, server
        )
        await client.purge("c")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--asyncio", action="store_true", help="plain asyncio, not uvloop")
    args = parser.parse_args()
    with node() as (url, server):
        if args.asyncio:
            asyncio.run(main(url, server, args.seconds))
        else:
            import uvloop

            uvloop.run(main(url, server, args.seconds))
