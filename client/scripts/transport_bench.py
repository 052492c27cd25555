"""Requests per second and client CPU per request of the AsyncClient's senders: the default
(straight over aiohttp) against httpx's own async transport.

Starts a bare ASGI app under uvicorn (a child process, on a free loopback port), then sends
small JSON POSTs through each sender at concurrency 1 and 32. Each run stops after --requests
requests or --seconds seconds, whichever comes first.

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
from lionmq._senders import AiohttpSender, AsyncSender, HttpxSender
from lionmq.protocol import Call, Reply

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


HEADERS = {"content-type": "application/json", "user-agent": "transport-bench"}
CALL: Call[Reply] = Call("POST", "/", lambda reply: reply, b'{"messages":[{"body":1}]}')


async def run(
    url: str, make: Callable[[str], AsyncSender], concurrency: int, total: int, secs: float
) -> tuple[float, float]:
    """Requests per second, and client CPU microseconds per request."""
    sender = make(url)
    try:
        await sender.send(CALL)  # connect outside the measurement
        done = 0
        deadline = time.perf_counter() + secs

        async def worker() -> None:
            nonlocal done
            while done < total and time.perf_counter() < deadline:
                done += 1
                assert (await sender.send(CALL)).status == 200

        cpu, start = time.process_time(), time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        cpu, wall = time.process_time() - cpu, time.perf_counter() - start
        return done / wall, cpu / done * 1e6
    finally:
        await sender.aclose()


async def main(url: str, requests: int, seconds: float) -> None:
    senders: dict[str, Callable[[str], AsyncSender]] = {
        "httpx (AsyncHTTPTransport)": lambda url: HttpxSender(
            url, HEADERS, 10.0, httpx.AsyncHTTPTransport()
        ),
        "lionmq default (aiohttp)": lambda url: AiohttpSender(url, HEADERS, 10.0, 100),
    }
    print(f"{'sender':28} {'c=1 req/s':>10} {'us/req':>7} {'c=32 req/s':>11} {'us/req':>7}")
    for name, make in senders.items():
        figures = [await run(url, make, c, requests, seconds) for c in (1, 32)]
        shown = " ".join(f"{rate:10.0f} {cpu:7.0f}" for rate, cpu in figures)
        print(f"{name:28} {shown}")


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
