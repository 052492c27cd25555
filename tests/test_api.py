"""The HTTP surface in-process: shapes, status codes and problem details for every bad input."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI

from app.main import create_app
from tests.conftest import make_settings

PROBLEM = "application/problem+json"
JSON_TYPE = {"content-type": "application/json"}


def assert_problem(r: httpx.Response, status: int, *words: str) -> None:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == PROBLEM
    body = r.json()
    assert body["status"] == status and body["title"] and body["detail"]
    for w in words:
        assert w in body["detail"], body["detail"]


async def test_enqueue_dequeue_ack_round_trip(app_client: httpx.AsyncClient) -> None:
    r = await app_client.post(
        "/channels/orders/enqueue",
        json={"messages": [{"body": {"n": 1}, "headers": {"k": "v"}}, {"body": [1, "two"]}]},
    )
    assert r.status_code == 201
    ids = r.json()["ids"]
    assert len(ids) == 2 and all(isinstance(i, str) for i in ids)
    r = await app_client.post("/channels/orders/dequeue", json={"max": 10})
    msgs = r.json()["messages"]
    assert [m["body"] for m in msgs] == [{"n": 1}, [1, "two"]]
    assert msgs[0]["headers"] == {"k": "v"} and msgs[1]["headers"] == {}
    assert [m["id"] for m in msgs] == ids
    assert all(m["attempt"] == 1 and m["enqueued_at"] > 0 for m in msgs)
    r = await app_client.post(
        "/channels/orders/ack", json={"receipts": [m["receipt"] for m in msgs]}
    )
    assert r.json() == {"acked": 2, "stale": []}
    info = (await app_client.get("/channels/orders")).json()
    assert info["counts"] == {"ready": 0, "delayed": 0, "in_flight": 0}
    assert info["totals"]["acked"] == 2
    assert info["settings"]["dead_letter"] == "orders.dlq"


async def test_dequeue_without_body_and_empty_channel(app_client: httpx.AsyncClient) -> None:
    r = await app_client.post("/channels/empty/dequeue")
    assert r.status_code == 200 and r.json() == {"messages": []}


async def test_channel_settings_and_listing(app_client: httpx.AsyncClient) -> None:
    r = await app_client.put("/channels/c1", json={"max_attempts": 2, "max_length": 10})
    assert r.status_code == 200
    assert r.json()["settings"]["max_attempts"] == 2
    r = await app_client.put("/channels/c1", json={"ttl_ms": 5000})
    assert r.json()["settings"] == {
        "visibility_ms": 30000,
        "max_attempts": 2,
        "dead_letter": "c1.dlq",
        "max_length": 10,
        "ttl_ms": 5000,
        "trace": False,
    }
    names = [c["name"] for c in (await app_client.get("/channels")).json()["channels"]]
    assert "c1" in names
    await app_client.post("/channels/c1/enqueue", json={"messages": [{"body": 1}] * 3})
    assert (await app_client.post("/channels/c1/purge")).json() == {"purged": 3}
    assert (await app_client.delete("/channels/c1")).status_code == 204
    assert_problem(await app_client.get("/channels/c1"), 404, "c1")
    assert_problem(await app_client.delete("/channels/c1"), 404)
    assert_problem(await app_client.post("/channels/c1/purge"), 404)


@pytest.mark.parametrize(
    ("path", "body", "status", "word"),
    [
        ("/channels/x/enqueue", b'{"messages": [', 400, "JSON"),
        ("/channels/x/enqueue", b"", 400, "JSON"),
        ("/channels/x/enqueue", b'{"messages": []}', 422, "messages"),
        ("/channels/x/enqueue", b'{"messages": [{"headers": {}}]}', 422, "body"),
        ("/channels/x/enqueue", b'{"messages": [{"body": 1, "delay_ms": "soon"}]}', 422, "int"),
        ("/channels/x/enqueue", b'{"messages": [{"body": 1, "delay_ms": -1}]}', 422, "delay_ms"),
        ("/channels/x/enqueue", b'{"messages": [{"body": 1, "headers": {"a": 1}}]}', 422, "str"),
        ("/channels/x/enqueue", b'{"messages": [{"body": 1, "extra": 1}]}', 422, "extra"),
        ("/channels/x/enqueue", b'{"messages": [{"body": 1, "ttl_ms": 0}]}', 422, "ttl_ms"),
        ("/channels/x/enqueue", b"[1, 2]", 422, "object"),
        ("/channels/x/dequeue", b'{"max": 0}', 422, "max"),
        ("/channels/x/dequeue", b'{"max": 1001}', 422, "max"),
        ("/channels/x/dequeue", b'{"wait_ms": 30001}', 422, "wait_ms"),
        ("/channels/x/dequeue", b'{"visibility_ms": 10}', 422, "visibility_ms"),
        ("/channels/x/ack", b'{"receipts": []}', 422, "receipts"),
        ("/channels/x/ack", b'{"receipts": ["nope"]}', 400, "receipt"),
        ("/channels/x/ack", b'{"receipts": [5]}', 422, "str"),
        ("/channels/x/nack", b'{"receipts": ["1-1"], "delay_ms": -5}', 422, "delay_ms"),
        ("/channels/x/extend", b'{"receipts": ["1-1"]}', 422, "visibility_ms"),
        ("/channels/bad name!/enqueue", b'{"messages": [{"body": 1}]}', 422, "channel name"),
        ("/channels/.hidden/dequeue", b"{}", 422, "channel name"),
        ("/channels/" + "a" * 129 + "/dequeue", b"{}", 422, "channel name"),
    ],
)
async def test_bad_input_is_a_clear_4xx(
    app_client: httpx.AsyncClient, path: str, body: bytes, status: int, word: str
) -> None:
    r = await app_client.post(path, content=body, headers={"content-type": "application/json"})
    assert_problem(r, status, word)


async def test_bad_channel_settings(app_client: httpx.AsyncClient) -> None:
    assert_problem(await app_client.put("/channels/c", json={"visibility_ms": 1}), 422)
    assert_problem(await app_client.put("/channels/c", json={"dead_letter": "no good"}), 422)
    assert_problem(await app_client.put("/channels/c", json={"dead_letter": "c"}), 422, "itself")
    assert_problem(await app_client.put("/channels/c", json={"max_length": 0}), 422)
    assert_problem(await app_client.put("/channels/c", json={"max_length": 10**19}), 422)
    assert_problem(await app_client.put("/channels/c", json={"ttl_ms": 10**19}), 422, "ttl_ms")
    assert_problem(await app_client.put("/channels/c", json={"colour": "red"}), 422, "colour")


async def test_stale_and_unknown_receipts(app_client: httpx.AsyncClient) -> None:
    await app_client.post("/channels/s/enqueue", json={"messages": [{"body": 1}]})
    (got,) = (await app_client.post("/channels/s/dequeue", json={})).json()["messages"]
    old = got["receipt"]
    assert (await app_client.post("/channels/s/ack", json={"receipts": [old]})).json()["acked"] == 1
    r = await app_client.post("/channels/s/ack", json={"receipts": [old]})
    assert r.json() == {"acked": 0, "stale": [old]}
    r = await app_client.post("/channels/s/extend", json={"receipts": [old], "visibility_ms": 5000})
    assert r.json() == {"extended": 0, "stale": [old]}
    r = await app_client.post("/channels/s/nack", json={"receipts": [old]})
    assert r.json() == {"nacked": 0, "stale": [old]}
    # A receipt the node never issued (see tests/test_input.py) is refused, not stale.
    assert_problem(await app_client.post("/channels/s/ack", json={"receipts": ["1a-1"]}), 400)


async def test_unknown_route_and_method(app_client: httpx.AsyncClient) -> None:
    assert_problem(await app_client.get("/nowhere"), 404, "/nowhere")
    assert_problem(await app_client.get("/channels/x/enqueue"), 405, "GET")


async def test_probes_metrics_and_docs(app_client: httpx.AsyncClient) -> None:
    assert (await app_client.get("/health")).json()["status"] == "ok"
    assert (await app_client.get("/ready")).json()["status"] == "ready"
    await app_client.post("/channels/m/enqueue", json={"messages": [{"body": 1}]})
    text = (await app_client.get("/metrics")).text
    assert 'lionmq_channel_ready{channel="m"} 1.0' in text
    assert 'lionmq_enqueued_total{channel="m"} 1.0' in text
    spec = (await app_client.get("/openapi.json")).json()
    assert "/channels/{channel}/enqueue" in spec["paths"]
    assert "EnqueueRequest" in spec["components"]["schemas"]
    assert (await app_client.get("/docs")).status_code == 200


async def test_size_limits(tmp_path: Path) -> None:
    app: FastAPI = create_app(make_settings(tmp_path, max_message_bytes=100, max_batch=3))
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://localhost") as c,
    ):
        big = {"messages": [{"body": "x" * 200}]}
        assert_problem(await c.post("/channels/x/enqueue", json=big), 413, "MAX_MESSAGE_BYTES")
        many = {"messages": [{"body": 1}] * 4}
        assert_problem(await c.post("/channels/x/enqueue", json=many), 413, "MAX_BATCH")
        huge = b'{"messages": [' + b'{"body": 1},' * 2_000_000 + b"]}"
        r = await c.post("/channels/x/enqueue", content=huge, headers=JSON_TYPE)
        assert_problem(r, 413, "limit")
        assert (await c.get("/channels/x")).status_code == 404  # nothing was created


async def test_auth(tmp_path: Path) -> None:
    app: FastAPI = create_app(make_settings(tmp_path, api_token="s3cret"))
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://localhost") as c,
    ):
        assert (await c.get("/health")).status_code == 200
        assert (await c.get("/ready")).status_code == 200
        r = await c.get("/channels")
        assert_problem(r, 401, "Authorization")
        assert r.headers["www-authenticate"] == "Bearer"
        assert_problem(await c.get("/metrics", headers={"Authorization": "Bearer nope"}), 401)
        ok = await c.get("/channels", headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200
