"""Cluster endpoints of an in-process node: its view, routes, set-nodes, their credentials."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI
from lionmq.placement import shard_for

from app.cluster.heartbeat import HEARTBEAT_PATH
from app.cluster.mirror import snapshot_path
from app.main import create_app
from app.settings import CLUSTER_SECRET_HEADER
from tests.conftest import make_settings

ADMIN = {"Authorization": "Bearer admin-token"}
ME = "http://127.0.0.1:8000"


async def client_for(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app), base_url="http://localhost"
        ) as client,
    ):
        yield client


@pytest.fixture
async def cluster_client(tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    settings = make_settings(
        tmp_path, admin_token="admin-token", cluster_secret="shh", api_token="api-token"
    )
    async for client in client_for(create_app(settings)):
        client.headers["Authorization"] = "Bearer api-token"
        yield client


async def test_a_single_node_is_standalone_and_owns_the_implicit_shard(
    app_client: httpx.AsyncClient,
) -> None:
    view = (await app_client.get("/cluster")).json()
    assert view["version"] == 0
    assert view["node"] == {"id": "inproc", "url": ME, "role": "standalone"}
    (shard,) = view["shards"]
    assert shard["id"] == "s0" and shard["owner"] == ME and shard["owner_id"] == "inproc"
    assert shard["epoch"] == 1 and shard["lease_expires_in_ms"] > 0
    (me,) = view["nodes"]
    assert me["url"] == ME and me["status"] == "up" and me["role"] == "standalone"
    assert me["shards"] == ["s0"]
    route = (await app_client.get("/cluster/route/orders")).json()
    assert route == {"channel": "orders", "shard": "s0", "owner": ME}
    assert (await app_client.get("/cluster/route/bad%20name")).status_code == 422
    metrics = (await app_client.get("/metrics")).text
    assert 'lionmq_shard_owned{shard="s0"} 1.0' in metrics
    assert 'lionmq_shard_epoch{shard="s0"} 1.0' in metrics
    assert "lionmq_failovers_total 0.0" in metrics


async def test_set_nodes_needs_the_admin_token(cluster_client: httpx.AsyncClient) -> None:
    body = {"shards": [{"primary": ME}]}
    # The API token is not the admin token.
    assert (await cluster_client.put("/cluster/nodes", json=body)).status_code == 401
    wrong = {"Authorization": "Bearer nope"}
    assert (await cluster_client.put("/cluster/nodes", json=body, headers=wrong)).status_code == 401
    r = await cluster_client.put("/cluster/nodes", json={"shards": []}, headers=ADMIN)
    assert r.status_code == 422
    twice = {"shards": [{"primary": ME}, {"primary": "http://127.0.0.1:8001", "backups": [ME]}]}
    r = await cluster_client.put("/cluster/nodes", json=twice, headers=ADMIN)
    assert r.status_code == 422 and "twice" in r.text
    r = await cluster_client.put(
        "/cluster/nodes", json={"shards": [{"primary": "ftp://x"}]}, headers=ADMIN
    )
    assert r.status_code == 422
    r = await cluster_client.put("/cluster/nodes", json=body, headers=ADMIN)
    assert r.status_code == 200, r.text
    stored = r.json()
    assert stored["version"] == 1 and stored["shards"][0]["primary"] == ME
    # The same nodes again change nothing.
    again = await cluster_client.put("/cluster/nodes", json=body, headers=ADMIN)
    assert again.json()["version"] == 1


async def test_set_nodes_is_forbidden_without_an_admin_token(
    app_client: httpx.AsyncClient,
) -> None:
    r = await app_client.put("/cluster/nodes", json={"shards": [{"primary": ME}]}, headers=ADMIN)
    assert r.status_code == 403 and "ADMIN_TOKEN" in r.json()["detail"]


async def test_node_to_node_routes_need_the_cluster_secret(
    cluster_client: httpx.AsyncClient,
) -> None:
    poke = {"channel": "orders"}
    assert (await cluster_client.post("/cluster/internal/poke", json=poke)).status_code == 401
    bad = {"X-LionMQ-Cluster-Secret": "wrong"}
    r = await cluster_client.post("/cluster/internal/poke", json=poke, headers=bad)
    assert r.status_code == 401
    good = {"X-LionMQ-Cluster-Secret": "shh"}
    r = await cluster_client.post("/cluster/internal/poke", json=poke, headers=good)
    assert r.status_code == 200 and r.json() == {"served": True}


async def test_a_node_without_cluster_secret_refuses_the_internal_routes(
    app_client: httpx.AsyncClient,
) -> None:
    r = await app_client.post(
        "/cluster/internal/poke", json={"channel": "c"}, headers={"X-LionMQ-Cluster-Secret": ""}
    )
    assert r.status_code == 401


async def test_set_nodes_refuses_a_topology_that_leaves_out_the_node_asked(
    cluster_client: httpx.AsyncClient,
) -> None:
    # A topology naming none of the running nodes (a typo, another cluster's file) would leave
    # every shard without an owner for good: refused, and nothing is stored.
    elsewhere = {"shards": [{"primary": "http://127.0.0.1:1", "backups": []}]}
    r = await cluster_client.put("/cluster/nodes", json=elsewhere, headers=ADMIN)
    assert r.status_code == 422, r.text
    assert ME in r.json()["detail"] and "stays" in r.json()["detail"]
    assert (await cluster_client.get("/cluster")).json()["version"] == 0
    # This node among others, as a backup (in another spelling of its URL): accepted.
    kept = {"shards": [{"primary": "http://127.0.0.1:8001", "backups": ["HTTP://127.0.0.1:8000/"]}]}
    r = await cluster_client.put("/cluster/nodes", json=kept, headers=ADMIN)
    assert r.status_code == 200, r.text


async def test_every_node_to_node_route_refuses_alike(cluster_client: httpx.AsyncClient) -> None:
    # One check for every /cluster/internal/ route (poke, the mirror's heartbeat and snapshot):
    # the same refusal, in constant time, whether the secret is missing or wrong.
    calls = [
        ("POST", "/cluster/internal/poke", {"channel": "orders"}),
        ("POST", HEARTBEAT_PATH, {}),
        ("GET", snapshot_path("s1"), None),
    ]
    for given in (None, "wrong", ""):
        headers = {} if given is None else {CLUSTER_SECRET_HEADER: given}
        details = set()
        for method, path, body in calls:
            r = await cluster_client.request(method, path, json=body, headers=headers)
            assert r.status_code == 401, (path, r.text)
            details.add(r.json()["detail"])
        (detail,) = details
        assert "CLUSTER_SECRET" in detail and CLUSTER_SECRET_HEADER in detail


async def test_metrics_name_the_role_get_cluster_names(app_client: httpx.AsyncClient) -> None:
    # A node alone on its store is `standalone` in GET /cluster; /metrics said `primary`.
    role = (await app_client.get("/cluster")).json()["node"]["role"]
    assert role == "standalone"
    metrics = (await app_client.get("/metrics")).text
    assert f'lionmq_cluster_role{{role="{role}"}} 1.0' in metrics
    for other in ("primary", "backup", "unassigned"):
        assert f'lionmq_cluster_role{{role="{other}"}} 0.0' in metrics


async def test_a_heartbeat_pairing_ids_and_attempts_wrongly_is_refused_whole(
    cluster_client: httpx.AsyncClient,
) -> None:
    # A lease delta with more ids than attempts went half-way into a mirror's channel and then
    # answered 500 (zip(strict=True) raised): it is malformed, refused when decoded.
    secret = {CLUSTER_SECRET_HEADER: "shh"}
    for tag in ("l", "x"):
        beat = {
            "shard": "s1",
            "epoch": 1,
            "owner_id": "node-x",
            "owner_url": "http://127.0.0.1:8001",
            "base": 0,
            "seq": 1,
            "deltas": [[tag, "orders", [1, 2, 3], [1], 5]],
        }
        r = await cluster_client.post(HEARTBEAT_PATH, json=beat, headers=secret)
        assert r.status_code == 400, r.text
        assert "3 ids with 1 attempts" in r.json()["detail"]


async def _late_body(
    payload: bytes, asked: asyncio.Event, arrived: asyncio.Event
) -> AsyncIterator[bytes]:
    """A request body that comes once `arrived` is set; `asked` tells when the node reads it
    (it has routed the request by then)."""
    asked.set()
    await arrived.wait()
    yield payload


async def test_an_ack_let_in_before_a_hand_off_and_read_after_it_is_refused_not_stale(
    tmp_path: Path,
) -> None:
    """The router decides where a request goes before its body is read: an ack routed here
    (Local) whose body arrives after set_nodes handed its channel off must come back 503 (the
    client retries at the new owner), not 200 with every receipt stale (the consumer would drop
    the ack, and the handled message would stay in flight at the new owner)."""
    other = "http://127.0.0.1:8001"
    init = json.dumps({"shards": [{"primary": ME}]})
    settings = make_settings(
        tmp_path,
        admin_token="admin-token",
        cluster_secret="shh",
        api_token="api-token",
        cluster_init=init,
        heartbeat_ms=20,
        lease_ms=1000,
    )
    app = create_app(settings)
    name = next(f"c{i}" for i in range(100) if shard_for(f"c{i}", ("s1", "s2")) == "s2")
    async for client in client_for(app):
        client.headers["Authorization"] = "Bearer api-token"
        body = {"messages": [{"body": 1}]}
        assert (await client.post(f"/channels/{name}/enqueue", json=body)).status_code == 201
        (got,) = (await client.post(f"/channels/{name}/dequeue", json={"max": 1})).json()[
            "messages"
        ]
        keeper = app.state.node.cluster.keeper
        asked, arrived = asyncio.Event(), asyncio.Event()
        payload = json.dumps({"receipts": [got["receipt"]]}).encode()
        json_type = {"Content-Type": "application/json"}
        late = _late_body(payload, asked, arrived)
        ack = asyncio.ensure_future(
            client.post(f"/channels/{name}/ack", content=late, headers=json_type)
        )
        await asyncio.wait_for(asked.wait(), 5)
        shards = {"shards": [{"primary": ME}, {"primary": other}]}
        assert (await client.put("/cluster/nodes", json=shards, headers=ADMIN)).status_code == 200
        deadline = asyncio.get_running_loop().time() + 5
        while keeper.applied_version < 2:  # the ownership loop hands the channel off
            assert asyncio.get_running_loop().time() < deadline, "set_nodes never applied"
            await asyncio.sleep(0.01)
        assert name not in app.state.node.engine.channels
        arrived.set()
        r = await asyncio.wait_for(ack, 5)
        assert r.status_code == 503, r.text
        assert r.headers["retry-after"] == "1"
