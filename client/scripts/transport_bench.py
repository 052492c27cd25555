"""Requests per second of httpx's own async transport against the AsyncClient's default.

Starts a bare ASGI app under uvicorn (a child process, on a free loopback port), then sends
small JSON POSTs through an httpx.AsyncClient at concurrency 1 and 32 with each transport.
Each run stops after --requests requests or --seconds seconds, whichever comes first.

    .venv/bin/python client/scripts/transport_bench.py [--requests 3000] [--seconds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import socket
import subprocess
import sys
import time
import warnings
from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from typing import Any

import httpx
from lionmq.transport import AiohttpTransport

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

REPLY = b'{"ids":["1"]}'


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    """Reads the body and answers a fixed JSON document: the cost is all transport."""
    if scope["type"] != "http":
        return
    more = True
    while more:
        more = (await receive()).get("more_body", False)
    headers = [(b"content-type", b"application/json"), (b"content-length", b"13")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": REPLY})


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextlib.contextmanager
def server(port: int) -> Iterator[str]:
    cmd = [sys.executable, __file__, "--serve", str(port)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                httpx.post(url, content=b"{}", timeout=1).raise_for_status()
                break
            except httpx.TransportError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("the bench server did not start") from None
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


async def run(
    url: str, transport: httpx.AsyncBaseTransport | None, concurrency: int, total: int, secs: float
) -> float:
    async with httpx.AsyncClient(base_url=url, transport=transport) as client:
        await client.post("/", content=b"{}")  # connect outside the measurement
        done = 0
        deadline = time.perf_counter() + secs

        async def worker() -> None:
            nonlocal done
            while done < total and time.perf_counter() < deadline:
                done += 1
                response = await client.post("/", content=b'{"messages":[{"body":1}]}')
                response.raise_for_status()

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return done / (time.perf_counter() - start)


async def main(url: str, requests: int, seconds: float) -> None:
    transports: dict[str, Callable[[], httpx.AsyncBaseTransport | None]] = {
        "httpx (AsyncHTTPTransport)": lambda: None,
        "lionmq AiohttpTransport": AiohttpTransport,
    }
    try:
        import httpx_aiohttp  # optional, for comparison only

        transports["httpx_aiohttp.AiohttpTransport"] = httpx_aiohttp.AiohttpTransport
    except ImportError:
        pass
    print(f"{'transport':32} {'c=1 req/s':>10} {'c=32 req/s':>11}")
    for name, make in transports.items():
        rates = [await run(url, make(), c, requests, seconds) for c in (1, 32)]
        print(f"{name:32} {rates[0]:10.0f} {rates[1]:11.0f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=3000, help="per run (default 3000)")
    parser.add_argument("--seconds", type=float, default=5.0, help="per run (default 5)")
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        import uvicorn

        uvicorn.run(app, host="127.0.0.1", port=args.serve, log_level="warning")
    else:
        # An unclosed aiohttp session warns with a ResourceWarning: make that an error here.
        warnings.simplefilter("error", ResourceWarning)
        with server(free_port()) as url:
            asyncio.run(main(url, args.requests, args.seconds))
