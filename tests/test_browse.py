"""Browsing: GET /channels/{c}/messages pages through a channel's messages in every state
without leasing or changing any, and GET /channels/{c}/messages/{id} shows one; on each store."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from app.engine import redrive as engine_redrive

Json = dict[str, Any]


async def enqueue(client: httpx.AsyncClient, channel: str, *messages: Json) -> list[str]:
    r = await client.post(f"/channels/{channel}/enqueue", json={"messages": list(messages)})
    assert r.status_code == 201, r.text
    ids: list[str] = r.json()["ids"]
    return ids


async def page(client: httpx.AsyncClient, channel: str, **params: Any) -> Json:
    r = await client.get(f"/channels/{channel}/messages", params=params)
    assert r.status_code == 200, r.text
    doc: Json = r.json()
    return doc


async def counts(client: httpx.AsyncClient, channel: str) -> Json:
    info: Json = (await client.get(f"/channels/{channel}")).json()
    return {"counts": info["counts"], "totals": info["totals"]}


async def test_messages_in_every_state_are_shown_without_leasing_any(
    app_client: httpx.AsyncClient,
) -> None:
    c = app_client
    first, second, third, delayed = await enqueue(
        c,
        "orders",
        {"body": {"n": 1}, "headers": {"k": "v"}, "dedup_id": "d-1"},
        {"body": [2]},
        {"body": "three", "ttl_ms": 60_000},
        {"body": 4, "delay_ms": 60_000},
    )
    got = await c.post("/channels/orders/dequeue", json={"max": 1, "visibility_ms": 5000})
    assert [m["id"] for m in got.json()["messages"]] == [first]
    before = await counts(c, "orders")

    doc = await page(c, "orders")
    assert doc["channel"] == "orders" and doc["next"] is None
    views = {m["id"]: m for m in doc["messages"]}
    assert [m["id"] for m in doc["messages"]] == [first, second, third, delayed]
    one = views[first]
    assert one["state"] == "in_flight" and one["attempt"] == 1
    assert one["body"] == {"n": 1} and one["headers"] == {"k": "v"}
    assert one["available_at"] is None
    assert one["lease_deadline"] >= one["enqueued_at"] + 5000
    assert views[second] == {
        "id": second,
        "state": "ready",
        "body": [2],
        "headers": None,
        "attempt": 0,
        "enqueued_at": one["enqueued_at"],
        "available_at": None,
        "lease_deadline": None,
        "expires_at": None,
    }
    assert views[third]["expires_at"] == one["enqueued_at"] + 60_000
    assert views[delayed]["state"] == "delayed"
    assert views[delayed]["available_at"] == one["enqueued_at"] + 60_000

    by_state = {
        state: [m["id"] for m in (await page(c, "orders", state=state))["messages"]]
        for state in ("ready", "delayed", "in_flight")
    }
    assert by_state == {"ready": [second, third], "delayed": [delayed], "in_flight": [first]}

    # Paged by id: `next` is the `after` of the next page, null on the last one.
    seen: list[str] = []
    after: str | None = None
    for _ in range(5):
        doc = await page(c, "orders", limit=3, **({"after": after} if after else {}))
        seen += [m["id"] for m in doc["messages"]]
        after = doc["next"]
        if after is None:
            break
    assert seen == [first, second, third, delayed]

    # Nothing was leased or changed: same counts, and the ready ones are still delivered.
    assert await counts(c, "orders") == before
    got = await c.post("/channels/orders/dequeue", json={"max": 10})
    assert [m["id"] for m in got.json()["messages"]] == [second, third]


async def test_one_message_and_what_is_refused(app_client: httpx.AsyncClient) -> None:
    c = app_client
    (msg_id,) = await enqueue(c, "orders", {"body": {"n": 1}, "dedup_id": "x"})
    r = await c.get(f"/channels/orders/messages/{msg_id}")
    assert r.status_code == 200, r.text
    shown = r.json()
    assert shown["id"] == msg_id and shown["state"] == "ready"
    assert "history" in shown and shown["history"] is None  # the channel does not trace
    assert shown == {**(await page(c, "orders"))["messages"][0], "history": None}

    missing = await c.get("/channels/orders/messages/12345")
    assert missing.status_code == 404
    assert missing.json()["title"] == "Message not found"
    assert "no message 12345" in missing.json()["detail"]
    unknown = await c.get(f"/channels/nowhere/messages/{msg_id}")
    assert unknown.status_code == 404 and unknown.json()["title"] == "Channel not found"
    assert (await c.get("/channels/nowhere/messages")).status_code == 404
    # Not digits, too large, of 4,300 digits or more (int() refuses those: was a 500), or
    # digits of another script (was taken as a limit).
    for bad in ("abc", "-1", "1.5", "9" * 30, "9" * 5000, "\uff11", "²"):
        r = await c.get(f"/channels/orders/messages/{bad}")
        assert r.status_code == 422, bad
        assert r.headers["content-type"] == "application/problem+json"
    for params in (
        {"state": "leased"},
        {"limit": "0"},
        {"limit": "1001"},
        {"limit": "ten"},
        {"limit": "9" * 5000},
        {"limit": "\uff11"},
        {"after": "9" * 5000},
        {"after": "x"},
        {"status": "ready"},  # a typo is refused, not ignored
    ):
        r = await c.get("/channels/orders/messages", params=params)
        assert r.status_code == 422, params
        assert r.headers["content-type"] == "application/problem+json"
    padded = await c.get("/channels/orders/messages", params={"limit": "0" * 5000 + "1"})
    assert padded.status_code == 200 and len(padded.json()["messages"]) == 1, padded.text


async def test_a_page_of_large_messages_is_cut_at_page_bytes(
    app_client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Bounded in bytes, not only in count: 1000 messages of MAX_MESSAGE_BYTES would be read and
    # encoded at once (256 MB). Cut short, the page says where to go on.
    monkeypatch.setattr(engine_redrive, "PAGE_BYTES", 2500)
    ids = await enqueue(app_client, "fat", *({"body": "x" * 1000} for _ in range(5)))
    first = await page(app_client, "fat", limit=100)
    assert [m["id"] for m in first["messages"]] == ids[:2] and first["next"] == ids[1]
    second = await page(app_client, "fat", after=first["next"])
    assert [m["id"] for m in second["messages"]] == ids[2:4] and second["next"] == ids[3]
    last = await page(app_client, "fat", after=second["next"])
    assert [m["id"] for m in last["messages"]] == ids[4:] and last["next"] is None
