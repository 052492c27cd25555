"""The AsyncClient's default path (straight over aiohttp), against a real server on loopback:
headers, URLs, the pool, status and error mapping, retries, timeouts and a clean close."""

from __future__ import annotations

import asyncio
import gc
import json
import socket
import warnings
from collections import deque
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import httpx
import lionmq
import pytest
from aiohttp import web
from lionmq import AsyncClient, RetryPolicy
from lionmq._senders import AiohttpSender, HttpxSender

FAST = RetryPolicy(attempts=3, base_delay=0.001, max_delay=0.01)


@dataclass
class Seen:
    method: str
    raw_path: str
    headers: Mapping[str, str]
    body: Any
    peer: int


@dataclass
class Server:
    """Answers like the node, records what it got, and misbehaves on demand: a fault is a
    status to answer with, "drop" (close the connection unanswered) or "slow" (stall)."""

    url: str = ""
    seen: list[Seen] = field(default_factory=list)
    faults: deque[int | str] = field(default_factory=deque)
    stall: float = 1.0

    async def handle(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        body = json.loads(raw) if raw else None
        peer = request.transport.get_extra_info("peername")[1] if request.transport else 0
        self.seen.append(Seen(request.method, request.raw_path, request.headers.copy(), body, peer))
        fault = self.faults.popleft() if self.faults else None
        if fault == "drop":
            assert request.transport is not None
            request.transport.close()
            return web.Response()
        if fault == "slow":
            await asyncio.sleep(self.stall)
        elif isinstance(fault, int):
            problem = {"title": "Injected", "status": fault}
            return web.json_response(problem, status=fault, headers={"retry-after": "0"})
        return await self.route(request, body)

    async def route(self, request: web.Request, body: Any) -> web.Response:
        path = request.path.removeprefix("/prefix")
        if path == "/health":
            return web.json_response({"status": "ok"}, headers={"set-cookie": "session=1"})
        if path == "/ready":
            return web.json_response({"ready": False}, status=503)
        if path == "/channels/missing":
            problem = {"type": "about:blank", "title": "Channel not found", "detail": "missing"}
            return web.json_response(problem, status=404, content_type="application/problem+json")
        if path.endswith("/enqueue"):
            ids = [m["dedup_id"] for m in body["messages"]]
            return web.json_response({"ids": ids}, status=201)
        if path.endswith("/dequeue"):
            await asyncio.sleep(body["wait_ms"] / 1000)
            return web.json_response({"messages": []})
        if request.method == "DELETE":
            return web.Response(status=204)
        if path == "/cluster/nodes":
            shards = [{"id": f"s{i}", **shard} for i, shard in enumerate(body["shards"], 1)]
            return web.json_response({"version": 2, "shards": shards})
        return web.Response(status=200, text="not json")


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    state = Server()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", state.handle)
    runner = web.AppRunner(app, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    state.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    yield state
    await runner.cleanup()


@pytest.fixture(autouse=True)
def no_unclosed_sessions() -> Iterator[None]:
    """Every test must leave no aiohttp session or connector open."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
        gc.collect()
    assert not [w for w in caught if "nclosed" in str(w.message)]


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def test_default_path_round_trip(server: Server) -> None:
    async with AsyncClient(server.url, token="t", headers={"x-extra": "1"}, retry=FAST) as client:
        assert isinstance(client._sender, AiohttpSender)
        ids = await client.enqueue_many("jobs", [1, 2])
        assert await client.enqueue("a/b c", "x", dedup_id="mine") == "mine"
        assert (await client.health())["status"] == "ok"
        assert (await client.health())["status"] == "ok"
        assert await client.ready() is False  # 503 is an answer here
        await client.delete_channel("jobs")
    first, second, health, again = server.seen[:4]
    assert ids == [m["dedup_id"] for m in first.body["messages"]]
    assert (first.method, first.raw_path) == ("POST", "/channels/jobs/enqueue")
    assert first.headers["Authorization"] == "Bearer t"
    assert first.headers["Content-Type"] == "application/json"
    assert first.headers["User-Agent"] == "lionmq-python/0.1"
    assert first.headers["X-Extra"] == "1"
    assert "Accept-Encoding" not in first.headers
    assert second.raw_path == "/channels/a%2Fb%20c/enqueue"  # quoted once, not twice
    assert (health.method, health.body) == ("GET", None)
    assert "Cookie" not in again.headers  # no cookie jar
    assert server.seen[-1].method == "DELETE"


async def test_a_base_url_with_a_path_prefix(server: Server) -> None:
    async with AsyncClient(server.url + "/prefix/") as client:
        assert (await client.health())["status"] == "ok"
    assert server.seen[0].raw_path == "/prefix/health"


async def test_the_pool_is_bounded_and_reused(server: Server) -> None:
    async with AsyncClient(server.url, max_connections=4) as client:
        await asyncio.gather(*(client.enqueue("jobs", n) for n in range(100)))
        await client.enqueue("jobs", "last")
    assert len(server.seen) == 101
    assert len({seen.peer for seen in server.seen}) <= 4


async def test_errors_are_typed_and_only_5xx_retried(server: Server) -> None:
    async with AsyncClient(server.url, retry=FAST) as client:
        with pytest.raises(lionmq.ChannelNotFound) as caught:
            await client.get_channel("missing")
        assert (caught.value.status, caught.value.detail) == (404, "missing")
        server.faults.extend([429, 429])
        with pytest.raises(lionmq.ChannelFull):
            await client.enqueue("jobs", 1)
        assert server.faults == deque([429])
        server.faults.clear()
        server.faults.extend([503, 502])
        assert (await client.health())["status"] == "ok"
        server.faults.extend([503] * 3)
        with pytest.raises(lionmq.ServiceUnavailable):
            await client.health()
        with pytest.raises(lionmq.UnexpectedResponse) as unreadable:
            await client.purge("jobs")
        assert "/channels/jobs/purge" in str(unreadable.value)


async def test_a_dropped_connection_is_retried_with_the_same_dedup_ids(server: Server) -> None:
    async with AsyncClient(server.url, retry=FAST) as client:
        await client.health()  # a pooled connection, which the server then drops
        server.faults.append("drop")
        ids = await client.enqueue_many("jobs", ["a", "b"])
    first, second = (s.body for s in server.seen[1:])
    assert first == second
    assert ids == [m["dedup_id"] for m in first["messages"]]


async def test_connection_errors_become_connection_failed() -> None:
    retry = RetryPolicy(attempts=2, base_delay=0.001, max_delay=0.001)
    url = f"http://127.0.0.1:{closed_port()}"
    async with AsyncClient(url, retry=retry) as client:
        with pytest.raises(lionmq.ConnectionFailed) as caught:
            await client.health()
    assert caught.value.title == "ConnectError"
    assert url in str(caught.value)  # with several seeds, which node it could not reach
    assert caught.value.status is None
    assert isinstance(caught.value.__cause__, aiohttp.ClientConnectorError)


async def test_read_timeouts_are_retried_then_raised(server: Server) -> None:
    server.stall = 0.5
    async with AsyncClient(server.url, timeout=0.1, retry=FAST) as client:
        server.faults.append("slow")
        assert (await client.health())["status"] == "ok"  # the retry got through
        server.faults.extend(["slow"] * 3)
        with pytest.raises(lionmq.ConnectionFailed) as caught:
            await client.health()
    assert caught.value.title == "ReadTimeout"
    assert isinstance(caught.value.__cause__, TimeoutError)
    assert len(server.seen) == 5


async def test_a_long_poll_extends_the_read_timeout(server: Server) -> None:
    async with AsyncClient(server.url, timeout=0.2, retry=RetryPolicy(attempts=1)) as client:
        assert await client.dequeue("jobs", wait_ms=400) == []
        with pytest.raises(lionmq.ConnectionFailed):
            # Without a long poll the same stall is a timeout.
            server.faults.append("slow")
            server.stall = 0.4
            await client.dequeue("jobs")


async def test_a_closed_client_refuses_requests(server: Server) -> None:
    client = AsyncClient(server.url)
    await client.health()
    await client.aclose()
    with pytest.raises(RuntimeError):
        await client.health()
    await client.aclose()  # twice is fine


async def test_closing_an_unused_client_is_fine() -> None:
    async with AsyncClient():
        pass


async def test_an_injected_transport_goes_through_httpx() -> None:
    def handle(request: httpx.Request) -> httpx.Response:
        if len(seen) == 0:
            seen.append(request)
            raise httpx.ConnectError("refused", request=request)
        seen.append(request)
        return httpx.Response(200, json={"status": "ok"})

    seen: list[httpx.Request] = []
    transport = httpx.MockTransport(handle)
    async with AsyncClient("http://node", transport=transport, token="t", retry=FAST) as client:
        assert isinstance(client._sender, HttpxSender)
        assert (await client.health())["status"] == "ok"
    assert len(seen) == 2
    assert seen[1].headers["authorization"] == "Bearer t"


async def test_default_path_tries_the_next_seed_and_sends_per_call_headers(
    server: Server,
) -> None:
    """Over aiohttp too: a seed that refuses connections is passed over, and set_nodes sends
    the admin token in place of the API token."""
    dead = f"http://127.0.0.1:{closed_port()}"
    async with AsyncClient([dead, server.url], token="api", admin_token="adm", retry=FAST) as c:
        assert (await c.health())["status"] == "ok"
        assert (await c.health())["status"] == "ok"
        stored = await c.set_nodes([{"primary": "http://10.0.0.1:8000"}])
    assert [s.raw_path for s in server.seen] == ["/health", "/health", "/cluster/nodes"]
    assert [s.headers["authorization"] for s in server.seen] == [
        "Bearer api",
        "Bearer api",
        "Bearer adm",
    ]
    assert server.seen[-1].body == {"shards": [{"primary": "http://10.0.0.1:8000", "backups": []}]}
    assert stored.shards[0].primary == "http://10.0.0.1:8000"
