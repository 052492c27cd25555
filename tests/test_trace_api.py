"""The trace setting over HTTP, and the consumer address a traced delivery records: the client's
own, also through a forwarding node, and never one a client made up."""

from __future__ import annotations

import asyncio
import http.client
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.api import forward
from app.api.consumer import CLIENT_HEADER, consumer_of, forwarded_client, tag
from app.cluster.route import Remote
from app.main import NodeApp, create_app
from app.models import Event
from app.settings import Settings
from tests.conftest import free_port
from tests.forward_support import FakeRouter, Served

TOKEN = "trace-token"
SECRET = "trace-cluster-secret"
AUTH = {"authorization": f"Bearer {TOKEN}"}


def node_app(tmp_path: Path, node_id: str, port: int) -> NodeApp:
    settings = Settings(
        _env_file=None,  # type: ignore[call-arg]
        node_id=node_id,
        host="127.0.0.1",
        port=port,
        api_token=TOKEN,
        cluster_secret=SECRET,
        store_url=f"sqlite:///{tmp_path}/{node_id}.db",
    )
    app = create_app(settings)
    assert isinstance(app, NodeApp)
    return app


@dataclass
class Pair:
    """Node A, asked by the client, forwards channel `far` to its owner, node B."""

    a: Served
    b: Served
    app_b: NodeApp

    async def history(self, channel: str, msg_id: int) -> list[Event]:
        """As GET /channels/{channel}/messages/{id} shows it, asked of A (forwarded to B)."""
        async with httpx.AsyncClient(base_url=self.a.url, headers=AUTH, timeout=10) as c:
            r = await c.get(f"/channels/{channel}/messages/{msg_id}")
        assert r.status_code == 200 and r.headers["x-lionmq-forwarded-by"] == "node-a", r.text
        history: list[Event] = r.json()["history"]
        return history


@pytest.fixture
async def pair(tmp_path: Path) -> AsyncIterator[Pair]:
    port_a, port_b = free_port(), free_port()
    app_a, app_b = node_app(tmp_path, "node-a", port_a), node_app(tmp_path, "node-b", port_b)
    router_a = FakeRouter("node-a")
    async with (
        forward.forward_session() as fwd_a,
        forward.forward_session() as fwd_b,
        Served(app_a, port_a) as a,
        Served(app_b, port_b) as b,
    ):
        forward.install(app_a, router_a, fwd_a, SECRET)
        forward.install(app_b, FakeRouter("node-b"), fwd_b, SECRET)
        router_a.routes["far"] = Remote("s1", b.url, "node-b")
        yield Pair(a, b, app_b)


def call(port: int, path: str, body: object, **headers: str) -> tuple[int, Any, str]:
    """POST over a connection of our own: (status, JSON answer, our "ip:port" as peers see it)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.connect()
        assert conn.sock is not None
        host, local_port = conn.sock.getsockname()[:2]
        payload = json.dumps(body)
        all_headers = {**AUTH, "content-type": "application/json", **headers}
        conn.request("POST", path, body=payload, headers=all_headers)
        response = conn.getresponse()
        return response.status, json.loads(response.read()), f"{host}:{local_port}"
    finally:
        conn.close()


async def delivered_to(pair: Pair, port: int, **headers: str) -> tuple[str, str]:
    """Enqueue one message to `far` and dequeue it through `port`: (recorded consumer, ours)."""
    status, answer, _ = await asyncio.to_thread(
        call, pair.a.port, "/channels/far/enqueue", {"messages": [{"body": 1}]}
    )
    assert status == 201, answer
    msg_id = int(answer["ids"][0])
    status, answer, us = await asyncio.to_thread(
        call, port, "/channels/far/dequeue", {"max": 1}, **headers
    )
    assert status == 200 and len(answer["messages"]) == 1, answer
    history = await pair.history("far", msg_id)
    assert history[-1]["event"] == "delivered"
    consumer = history[-1]["consumer"]
    assert isinstance(consumer, str)
    return consumer, us


async def test_the_trace_setting(pair: Pair) -> None:
    async with httpx.AsyncClient(base_url=pair.a.url, headers=AUTH, timeout=10) as c:
        r = await c.put("/channels/far", json={"trace": True})  # forwarded to the owner
        assert r.status_code == 200 and r.json()["settings"]["trace"] is True, r.text
        assert (await c.get("/channels/far")).json()["settings"]["trace"] is True
        r = await c.put("/channels/far", json={"max_attempts": 4})  # left as it was
        assert r.json()["settings"]["trace"] is True
        r = await c.put("/channels/far", json={"trace": "yes"})
        assert r.status_code == 422 and "trace" in r.text, r.text
        r = await c.put("/channels/far", json={"trace": False})
        assert r.json()["settings"]["trace"] is False
        plain = (await c.put("/channels/plain", json={})).json()["settings"]
        assert plain["trace"] is False


async def test_the_consumer_is_the_client_directly_and_through_a_forwarding_node(
    pair: Pair,
) -> None:
    async with httpx.AsyncClient(base_url=pair.b.url, headers=AUTH, timeout=10) as c:
        assert (await c.put("/channels/far", json={"trace": True})).status_code == 200
    consumer, us = await delivered_to(pair, pair.b.port)  # straight to the owner
    assert consumer == us
    consumer, us = await delivered_to(pair, pair.a.port)  # forwarded by A
    assert consumer == us
    # A made-up address is not believed: neither sent to the owner (no valid tag) nor through
    # A (which drops the client's header and sends its own).
    forged = {CLIENT_HEADER: f"6.6.6.6:6 {tag('guess', '6.6.6.6:6')}"}
    consumer, us = await delivered_to(pair, pair.b.port, **forged)
    assert consumer == us
    consumer, us = await delivered_to(pair, pair.a.port, **forged)
    assert consumer == us


def scope_of(client: tuple[str, int] | None, *headers: tuple[bytes, bytes]) -> dict[str, Any]:
    return {"type": "http", "client": client, "headers": list(headers)}


def test_consumer_of_believes_a_valid_tag_only() -> None:
    peer = ("10.0.0.5", 5555)
    header = CLIENT_HEADER.encode()
    from_peer = forwarded_client(scope_of(("192.0.2.7", 4242)), SECRET)
    assert consumer_of(scope_of(peer, (header, from_peer)), SECRET) == "192.0.2.7:4242"
    # Without a secret nothing tells a peer from a client: the connection's peer.
    assert consumer_of(scope_of(peer, (header, from_peer)), "") == "10.0.0.5:5555"
    assert consumer_of(scope_of(peer, (header, from_peer)), "another") == "10.0.0.5:5555"
    bad = [b"192.0.2.7:4242", b"192.0.2.7:4242 " + b"0" * 32, b" ", b""]
    for value in bad:
        assert consumer_of(scope_of(peer, (header, value)), SECRET) == "10.0.0.5:5555"
    # The tag is bound to the address: another address with it is refused.
    tagged = from_peer.decode().split(" ")[1]
    swapped = f"192.0.2.8:4242 {tagged}".encode()
    assert consumer_of(scope_of(peer, (header, swapped)), SECRET) == "10.0.0.5:5555"
    assert consumer_of(scope_of(("::1", 80)), SECRET) == "[::1]:80"
    assert consumer_of(scope_of(None), SECRET) == "unknown"


async def test_a_messages_history_over_http(app_client: httpx.AsyncClient) -> None:
    c = app_client
    r = await c.put("/channels/jobs", json={"trace": True, "max_attempts": 1})
    assert r.status_code == 200, r.text
    [msg_id] = (await c.post("/channels/jobs/enqueue", json={"messages": [{"body": 1}]})).json()[
        "ids"
    ]
    r = await c.get(f"/channels/jobs/messages/{msg_id}")
    assert r.status_code == 200, r.text
    [enqueued] = r.json()["history"]
    assert enqueued["event"] == "enqueued" and isinstance(enqueued["at"], int)

    [got] = (await c.post("/channels/jobs/dequeue", json={"max": 1})).json()["messages"]
    [_, delivered] = (await c.get(f"/channels/jobs/messages/{msg_id}")).json()["history"]
    assert delivered["event"] == "delivered" and delivered["attempt"] == 1
    assert delivered["consumer"] == "127.0.0.1:123"  # httpx's ASGI transport's client
    assert delivered["lease_deadline"] == delivered["at"] + 30_000

    # The last attempt nacked: dead-lettered, the copy carrying its history on.
    r = await c.post("/channels/jobs/nack", json={"receipts": [got["receipt"]]})
    assert r.json()["nacked"] == 1
    assert (await c.get(f"/channels/jobs/messages/{msg_id}")).status_code == 404
    [dead] = (await c.get("/channels/jobs.dlq/messages")).json()["messages"]
    history = (await c.get(f"/channels/jobs.dlq/messages/{dead['id']}")).json()["history"]
    assert history[:2] == [enqueued, delivered]
    assert {k: v for k, v in history[2].items() if k != "at"} == {
        "event": "dead_lettered",
        "reason": "max_attempts",
        "to": "jobs.dlq",
        "after": "nacked",
        "attempt": 1,
    }
    # Redriven back: carried on again.
    r = await c.post("/channels/jobs.dlq/redrive", json={})
    assert r.json()["moved"] == 1, r.text
    [back] = (await c.get("/channels/jobs/messages")).json()["messages"]
    again = (await c.get(f"/channels/jobs/messages/{back['id']}")).json()["history"]
    assert again[:3] == history
    assert {k: v for k, v in again[3].items() if k != "at"} == {
        "event": "redriven",
        "from": "jobs.dlq",
        "to": "jobs",
    }

    # An untraced channel shows no history.
    ids = (await c.post("/channels/plain/enqueue", json={"messages": [{"body": 2}]})).json()["ids"]
    assert (await c.get(f"/channels/plain/messages/{ids[0]}")).json()["history"] is None
