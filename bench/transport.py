"""`python -m bench transport`: requests per second and client CPU per request of the client's
async senders (`lionmq._senders`), the default (straight over aiohttp) against httpx's own
async transport, so that the choice in `AsyncClient` stays measured.

A bare ASGI app that reads the body and answers a fixed JSON document runs under uvicorn in a
child process (its own process group, a free loopback port): the cost is all transport. Each
sender sends small JSON POSTs at concurrency 1 and 32; a run stops after --requests requests
or --seconds seconds, whichever comes first.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from pathlib import Path
from typing import Any

import httpx
from lionmq._senders import AiohttpSender, AsyncSender, HttpxSender
from lionmq.protocol import Call, Reply

from bench.ports import free_port, spawn, terminate, wait_ready

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

REPLY = b'{"ids":["1"]}'
HEADERS = {"content-type": "application/json", "user-agent": "lionmq-bench-transport"}
CALL: Call[Reply] = Call("POST", "/", lambda reply: reply, b'{"messages":[{"body":1}]}')
SENDERS: dict[str, Callable[[], AsyncSender]] = {
    "httpx (AsyncHTTPTransport)": lambda: HttpxSender(HEADERS, 10.0, httpx.AsyncHTTPTransport()),
    "lionmq default (aiohttp)": lambda: AiohttpSender(HEADERS, 10.0, 100),
}
CONCURRENCY = (1, 32)
ROOT = Path(__file__).resolve().parent.parent


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    """Reads the body and answers a fixed JSON document."""
    if scope["type"] != "http":
        return
    more = True
    while more:
        more = (await receive()).get("more_body", False)
    headers = [(b"content-type", b"application/json"), (b"content-length", b"13")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": REPLY})


@contextlib.contextmanager
def server() -> Iterator[str]:
    """The ASGI app under uvicorn in a child process; killed (its group) on exit."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    workdir = Path(tempfile.mkdtemp(prefix="lionmq-transport-"))
    command = [sys.executable, "-m", "bench", "transport", "--serve", str(port)]
    with (workdir / "server.out").open("wb") as out:
        # From the project's root, where `bench` can be imported (it is not installed).
        proc = spawn(command, dict(os.environ), ROOT, out)

    def ready() -> bool:
        if proc.poll() is not None:
            tail = (workdir / "server.out").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"the transport bench server exited: {tail}")
        try:
            return httpx.post(url, content=b"{}", timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    def stop() -> None:
        if proc.poll() is None:
            terminate(proc, 3.0)
        shutil.rmtree(workdir, ignore_errors=True)

    wait_ready(ready, 15, f"the transport bench server on {url}", stop)
    try:
        yield url
    finally:
        stop()


async def measure(
    url: str, make: Callable[[], AsyncSender], concurrency: int, total: int, seconds: float
) -> tuple[float, float]:
    """Requests per second, and client CPU microseconds per request."""
    sender = make()
    try:
        await sender.send(url, CALL)  # connect outside the measurement
        done = 0
        deadline = time.perf_counter() + seconds

        async def worker() -> None:
            nonlocal done
            while done < total and time.perf_counter() < deadline:
                done += 1
                reply = await sender.send(url, CALL)
                if reply.status != 200:
                    raise RuntimeError(f"the bench server answered {reply.status}")

        cpu, start = time.process_time(), time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        cpu, wall = time.process_time() - cpu, time.perf_counter() - start
        return done / wall, cpu / max(done, 1) * 1e6
    finally:
        await sender.aclose()


async def run(url: str, requests: int, seconds: float) -> dict[str, dict[str, float]]:
    results: dict[str, dict[str, float]] = {}
    for name, make in SENDERS.items():
        for concurrency in CONCURRENCY:
            rate, cpu = await measure(url, make, concurrency, requests, seconds)
            results.setdefault(name, {}).update(
                {f"c{concurrency}_req_s": rate, f"c{concurrency}_client_us_per_req": cpu}
            )
    return results


def table(results: dict[str, dict[str, float]]) -> str:
    head = f"{'sender':28}" + "".join(f" {f'c={c} req/s':>11} {'us/req':>7}" for c in CONCURRENCY)
    lines = [head]
    for name, figures in results.items():
        cells = "".join(
            f" {figures[f'c{c}_req_s']:11.0f} {figures[f'c{c}_client_us_per_req']:7.0f}"
            for c in CONCURRENCY
        )
        lines.append(f"{name:28}{cells}")
    return "\n".join(lines)


def cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench transport", description=__doc__)
    parser.add_argument("--requests", type=int, default=3000, help="per run (default 3000)")
    parser.add_argument("--seconds", type=float, default=5.0, help="per run (default 5)")
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        import uvicorn

        uvicorn.run(app, host="127.0.0.1", port=args.serve, log_level="warning")
        return 0
    # An unclosed aiohttp session warns with a ResourceWarning: make that an error here.
    warnings.simplefilter("error", ResourceWarning)
    with server() as url:
        results = asyncio.run(run(url, args.requests, args.seconds))
    print(table(results))
    return 0
