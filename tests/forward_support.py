"""Real nodes on loopback ports for the router's tests: uvicorn in-process, a fake router."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from starlette.types import ASGIApp

from app.cluster.route import Local, Route


@dataclass
class FakeRouter:
    """The runtime's answer, set by the test: `routes` per channel, Local for the rest."""

    node_id: str
    routes: dict[str, Route] = field(default_factory=dict)

    def route(self, channel: str) -> Route:
        return self.routes.get(channel, Local("s0"))


class Served:
    """An ASGI app served by uvicorn on a loopback port, in the test's own event loop."""

    def __init__(self, app: ASGIApp, port: int) -> None:
        config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.port = port
        self.task: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def __aenter__(self) -> Served:
        self.task = asyncio.ensure_future(self.server.serve())
        await eventually(lambda: self.server.started, 10, f"uvicorn on port {self.port}")
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.server.should_exit = True
        assert self.task is not None
        await asyncio.wait_for(self.task, 10)


async def eventually(predicate: Callable[[], object], within_s: float, what: str) -> None:
    """Poll `predicate` in the event loop until true, for at most `within_s` seconds."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out after {within_s}s waiting for {what}")


@dataclass
class Echo:
    """An owner that answers every request with what it received (to check what is sent on)."""

    seen: list[Mapping[str, Any]] = field(default_factory=list)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        self.seen.append(
            {
                "method": scope["method"],
                "raw_path": scope["raw_path"],
                "query": scope["query_string"],
                "headers": list(scope["headers"]),
                "body": body,
            }
        )
        headers = [
            (b"content-type", b"application/problem+json"),
            (b"x-echo", b"yes"),
            (b"cache-control", b"no-store"),
            (b"content-length", b"14"),
        ]
        await send({"type": "http.response.start", "status": 418, "headers": headers})
        await send({"type": "http.response.body", "body": b'{"echo": true}'})
