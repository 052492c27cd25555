"""The AsyncClient's default aiohttp transport, against a real server on loopback."""

from __future__ import annotations

import gc
import socket
import warnings
from collections.abc import AsyncIterator

import httpx
import lionmq
import pytest
from aiohttp import web
from lionmq import AsyncClient, RetryPolicy
from lionmq.transport import AiohttpTransport


@pytest.fixture
async def server() -> AsyncIterator[str]:
    async def enqueue(request: web.Request) -> web.Response:
        body = await request.json()
        auth = request.headers.get("authorization", "")
        return web.json_response({"ids": [auth] * len(body["messages"])}, status=201)

    async def missing(request: web.Request) -> web.Response:
        problem = {"type": "about:blank", "title": "Channel not found", "status": 404}
        return web.json_response(problem, status=404, content_type="application/problem+json")

    app = web.Application()
    app.router.add_post("/channels/jobs/enqueue", enqueue)
    app.router.add_get("/channels/missing", missing)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    yield f"http://127.0.0.1:{port}"
    await runner.cleanup()


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def test_default_transport_round_trip_and_close(server: str) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        client = AsyncClient(server, token="t")
        assert isinstance(client._http._transport, AiohttpTransport)  # the default
        assert await client.enqueue_many("jobs", [1, 2]) == ["Bearer t", "Bearer t"]
        with pytest.raises(lionmq.ChannelNotFound):
            await client.get_channel("missing")
        await client.aclose()
        del client
        gc.collect()
    assert not [w for w in caught if "nclosed" in str(w.message)]


async def test_default_transport_maps_connection_errors() -> None:
    retry = RetryPolicy(attempts=2, base_delay=0.001, max_delay=0.001)
    async with AsyncClient(f"http://127.0.0.1:{closed_port()}", retry=retry) as client:
        with pytest.raises(lionmq.ConnectionFailed) as caught:
            await client.health()
    assert isinstance(caught.value.__context__, httpx.ConnectError)


async def test_closing_an_unused_client_is_fine() -> None:
    async with AsyncClient():
        pass
