"""An in-memory imitation of the node's HTTP API, served through httpx.MockTransport.

It keeps just enough state (ready messages, leases, dedup ids, settings) to check what the
client sends, records every request, and injects faults on demand.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

import httpx

Fault = int | type[httpx.TransportError] | str
"""A status to answer with, a transport error to raise, or "lost": store, then drop the reply."""


@dataclass
class Stored:
    id: str
    body: Any
    headers: dict[str, str]
    attempt: int = 0


@dataclass
class Channel:
    ready: deque[Stored] = field(default_factory=deque)
    leased: dict[str, Stored] = field(default_factory=dict)
    dedup: dict[str, str] = field(default_factory=dict)
    settings: dict[str, Any] = field(
        default_factory=lambda: {
            "visibility_ms": 30000,
            "max_attempts": 5,
            "dead_letter": None,
            "max_length": None,
            "ttl_ms": None,
        }
    )
    acked: list[str] = field(default_factory=list)
    nacked: list[str] = field(default_factory=list)
    extended: list[str] = field(default_factory=list)


def problem(status: int, title: str, detail: str = "") -> httpx.Response:
    body = {"type": "about:blank", "title": title, "status": status, "detail": detail}
    return httpx.Response(
        status, content=json.dumps(body), headers={"content-type": "application/problem+json"}
    )


class FakeNode:
    def __init__(self, token: str | None = None) -> None:
        self.token = token
        self.channels: dict[str, Channel] = {}
        self.requests: list[httpx.Request] = []
        self.faults: deque[Fault] = deque()
        self.ready_status = 200
        self.on_request: Callable[[httpx.Request], None] | None = None
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self.changed = threading.Condition(self._lock)
        self._async_changed = asyncio.Event()  # for asyncio tests: set on every request

    # -- the two transports -----------------------------------------------------------------

    def transport(self) -> httpx.MockTransport:
        def handle(request: httpx.Request) -> httpx.Response:
            response, wait = self.respond(request)
            if wait:
                time.sleep(wait)
            return response

        return httpx.MockTransport(handle)

    def async_transport(self) -> httpx.MockTransport:
        async def handle(request: httpx.Request) -> httpx.Response:
            try:
                response, wait = self.respond(request)
            finally:
                self._async_changed.set()
            if wait:
                await asyncio.sleep(wait)
            return response

        return httpx.MockTransport(handle)

    # -- helpers for tests ------------------------------------------------------------------

    def channel(self, name: str) -> Channel:
        return self.channels.setdefault(name, Channel())

    def seed(self, name: str, count: int) -> list[str]:
        with self._lock:
            ids = [str(next(self._ids)) for _ in range(count)]
            self.channel(name).ready.extend(Stored(i, {"n": i}, {}) for i in ids)
            return ids

    def bodies(self, path_suffix: str) -> list[Any]:
        return [json.loads(r.content) for r in self.requests if r.url.path.endswith(path_suffix)]

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 5.0) -> None:
        """Blocks until `predicate()` (checked whenever a request came) holds."""
        deadline = time.monotonic() + timeout
        with self.changed:
            while not predicate():
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError("timed out waiting on the fake node")
                self.changed.wait(min(left, 0.05))

    async def await_for(self, predicate: Callable[[], bool], seconds: float = 5.0) -> None:
        """Waits until `predicate()` (checked whenever a request came) holds."""
        async with asyncio.timeout(seconds):
            while True:
                self._async_changed.clear()
                if predicate():
                    return
                await self._async_changed.wait()

    # -- the API ----------------------------------------------------------------------------

    def respond(self, request: httpx.Request) -> tuple[httpx.Response, float]:
        with self.changed:
            try:
                return self._respond(request)
            finally:
                self.changed.notify_all()

    def _respond(self, request: httpx.Request) -> tuple[httpx.Response, float]:
        self.requests.append(request)
        if self.on_request is not None:
            self.on_request(request)
        fault = self.faults.popleft() if self.faults else None
        if isinstance(fault, type):
            raise fault("injected", request=request)
        if isinstance(fault, int):
            return problem(fault, "Injected"), 0.0
        if self.token and request.headers.get("authorization") != f"Bearer {self.token}":
            return problem(401, "Unauthorized", "missing or wrong token"), 0.0
        response, wait = self._route(request)
        if fault == "lost":
            raise httpx.ReadError("reply lost", request=request)
        return response, wait

    def _route(self, request: httpx.Request) -> tuple[httpx.Response, float]:
        path = [unquote(part) for part in request.url.raw_path.decode().split("/")[1:]]
        body = json.loads(request.content) if request.content else {}
        if path == ["health"]:
            return httpx.Response(200, json={"status": "ok", "node": "fake"}), 0.0
        if path == ["ready"]:
            return httpx.Response(self.ready_status, json={"ready": self.ready_status == 200}), 0
        if path == ["channels"]:
            infos = [self._info(name) for name in self.channels]
            return httpx.Response(200, json={"channels": infos}), 0.0
        name, verb = path[1], (path[2] if len(path) > 2 else request.method)
        if verb in ("GET", "DELETE", "purge") and name not in self.channels:
            return problem(404, "Channel not found", name), 0.0
        channel = self.channel(name)
        if verb == "PUT":
            channel.settings.update(body)
            return httpx.Response(200, json=self._info(name)), 0.0
        if verb == "GET":
            return httpx.Response(200, json=self._info(name)), 0.0
        if verb == "DELETE":
            del self.channels[name]
            return httpx.Response(204), 0.0
        if verb == "purge":
            purged = len(channel.ready)
            channel.ready.clear()
            return httpx.Response(200, json={"purged": purged}), 0.0
        if verb == "enqueue":
            return httpx.Response(201, json={"ids": self._enqueue(channel, body)}), 0.0
        if verb == "dequeue":
            messages = self._dequeue(channel, body["max"])
            # Imitate the long poll, briefly, so idle consumers do not spin.
            wait = 0.0 if messages else min(body["wait_ms"], 20) / 1000
            return httpx.Response(200, json={"messages": messages}), wait
        return self._settle(channel, verb, body), 0.0

    def _enqueue(self, channel: Channel, body: dict[str, Any]) -> list[str]:
        ids = []
        for item in body["messages"]:
            dedup = item.get("dedup_id")
            if dedup is not None and dedup in channel.dedup:
                ids.append(channel.dedup[dedup])
                continue
            stored = Stored(str(next(self._ids)), item["body"], item.get("headers") or {})
            channel.ready.append(stored)
            if dedup is not None:
                channel.dedup[dedup] = stored.id
            ids.append(stored.id)
        return ids

    def _dequeue(self, channel: Channel, count: int) -> list[dict[str, Any]]:
        out = []
        while channel.ready and len(out) < count:
            stored = channel.ready.popleft()
            stored.attempt += 1
            receipt = f"{stored.id}:{stored.attempt}"
            channel.leased[receipt] = stored
            out.append(
                {
                    "id": stored.id,
                    "body": stored.body,
                    "headers": stored.headers,
                    "receipt": receipt,
                    "attempt": stored.attempt,
                    "enqueued_at": 1_700_000_000_000,
                }
            )
        return out

    def _settle(self, channel: Channel, verb: str, body: dict[str, Any]) -> httpx.Response:
        held = [r for r in body["receipts"] if r in channel.leased]
        stale = [r for r in body["receipts"] if r not in channel.leased]
        if verb == "ack":
            for receipt in held:
                del channel.leased[receipt]
            channel.acked += held
            return httpx.Response(200, json={"acked": len(held), "stale": stale})
        if verb == "nack":
            for receipt in held:
                stored = channel.leased.pop(receipt)
                if not body.get("dead_letter"):
                    channel.ready.append(stored)
            channel.nacked += held
            return httpx.Response(200, json={"nacked": len(held), "stale": stale})
        channel.extended += held
        return httpx.Response(200, json={"extended": len(held), "stale": stale})

    def _info(self, name: str) -> dict[str, Any]:
        channel = self.channels[name]
        return {
            "name": name,
            "settings": channel.settings,
            "counts": {"ready": len(channel.ready), "delayed": 0, "in_flight": len(channel.leased)},
            "totals": {
                "enqueued": 0,
                "dequeued": 0,
                "acked": len(channel.acked),
                "nacked": len(channel.nacked),
                "dead_lettered": 0,
                "redelivered": 0,
            },
            "oldest_ready_age_ms": None,
        }
