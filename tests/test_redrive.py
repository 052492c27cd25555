"""Redrive: POST /channels/{c}/redrive moves ready messages of a (dead-letter) channel back to
the channels they came from, or to one named, in bounded, paced batches; on each store. The
pacing runs on the engine's clock (a manual one here)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest

from app.clock import ManualClock
from app.engine import redrive as redrive_module
from app.engine.ids import receipt
from app.engine.queue import NewMessage, QueueEngine
from app.engine.redrive import CALL_BUDGET_MS, redrive
from app.errors import ChannelNotFound, InvalidInput
from app.store.sqlite import SQLiteStore
from tests.test_browse import enqueue, page

Json = dict[str, Any]
DLQ = "orders.dlq"


async def dead_letter(c: httpx.AsyncClient, channel: str, *bodies: Any) -> None:
    """Enqueue `bodies` to `channel` (max_attempts 1) and nack each to its dead-letter channel."""
    await enqueue(c, channel, *({"body": b} for b in bodies))
    got = await c.post(f"/channels/{channel}/dequeue", json={"max": len(bodies)})
    receipts = [m["receipt"] for m in got.json()["messages"]]
    assert len(receipts) == len(bodies)
    r = await c.post(f"/channels/{channel}/nack", json={"receipts": receipts, "dead_letter": True})
    assert r.json()["nacked"] == len(bodies)


async def post_redrive(c: httpx.AsyncClient, channel: str, **body: Any) -> Json:
    r = await c.post(f"/channels/{channel}/redrive", json=body)
    assert r.status_code == 200, r.text
    doc: Json = r.json()
    return doc


async def ready(c: httpx.AsyncClient, channel: str) -> int:
    n: int = (await c.get(f"/channels/{channel}")).json()["counts"]["ready"]
    return n


async def test_dead_letters_go_back_where_they_came_from(app_client: httpx.AsyncClient) -> None:
    c = app_client
    # Two channels dead-letter into one DLQ; a third message was put there by hand.
    await c.put("/channels/orders", json={"max_attempts": 1})
    await c.put("/channels/billing", json={"max_attempts": 1, "dead_letter": DLQ})
    await dead_letter(c, "orders", {"o": 1}, {"o": 2})
    await dead_letter(c, "billing", {"b": 1})
    (stray,) = await enqueue(c, DLQ, {"body": "no origin"})
    dead = {json.dumps(m["body"]): m for m in (await page(c, DLQ))["messages"][:3]}
    assert await ready(c, DLQ) == 4

    done = await post_redrive(c, DLQ)
    assert done == {"moved": 3, "skipped": 1, "remaining": 1}
    assert [m["id"] for m in (await page(c, DLQ))["messages"]] == [stray]

    got = await c.post("/channels/orders/dequeue", json={"max": 10})
    back = got.json()["messages"]
    assert [m["body"] for m in back] == [{"o": 1}, {"o": 2}]
    for m in back:
        assert m["attempt"] == 1  # reset: this is the copy's first delivery
        original = dead[json.dumps(m["body"])]
        assert m["id"] != original["id"]
        headers = m["headers"]
        # The dead-letter headers are kept as history; when and whence it was redriven added.
        assert {k: v for k, v in headers.items() if k.startswith("x-dead-letter")} == (
            original["headers"]
        )
        assert headers["x-redriven-from"] == DLQ
        assert int(headers["x-redriven-at"]) >= original["enqueued_at"]
    billing = (await page(c, "billing"))["messages"]
    assert [m["body"] for m in billing] == [{"b": 1}] and billing[0]["attempt"] == 0

    # Safe to run again: nothing more to move, nothing moved twice.
    assert await post_redrive(c, DLQ) == {"moved": 0, "skipped": 1, "remaining": 1}
    assert await ready(c, "orders") == 0 and await ready(c, "billing") == 1


async def test_to_a_channel_named_bounded_by_max_and_in_flight_left(
    app_client: httpx.AsyncClient,
) -> None:
    c = app_client
    await enqueue(c, DLQ, *({"body": i} for i in range(6)))
    # One is being consumed from the DLQ itself: redrive leaves it.
    leased = (await c.post(f"/channels/{DLQ}/dequeue", json={"max": 1})).json()["messages"]
    assert [m["body"] for m in leased] == [0]

    assert await post_redrive(c, DLQ, to="replay", max=2) == {
        "moved": 2,
        "skipped": 0,
        "remaining": 3,
    }
    assert await post_redrive(c, DLQ, to="replay", max=2) == {
        "moved": 2,
        "skipped": 0,
        "remaining": 1,
    }
    assert await post_redrive(c, DLQ, to="replay") == {"moved": 1, "skipped": 0, "remaining": 0}
    assert [m["body"] for m in (await page(c, "replay"))["messages"]] == [1, 2, 3, 4, 5]
    assert [m["state"] for m in (await page(c, DLQ))["messages"]] == ["in_flight"]
    assert (await c.get("/channels/replay")).json()["counts"]["ready"] == 5

    refused = [
        (f"/channels/{DLQ}/redrive", {"to": DLQ}, 422),
        (f"/channels/{DLQ}/redrive", {"to": "no spaces"}, 422),
        (f"/channels/{DLQ}/redrive", {"max": 0}, 422),
        (f"/channels/{DLQ}/redrive", {"max": 10_001}, 422),
        (f"/channels/{DLQ}/redrive", {"rate": 0}, 422),
        (f"/channels/{DLQ}/redrive", {"limit": 5}, 422),
        ("/channels/nowhere/redrive", {}, 404),
    ]
    for path, body, status in refused:
        r = await c.post(path, json=body)
        assert r.status_code == status, (body, r.text)
        assert r.headers["content-type"] == "application/problem+json"


@pytest.fixture
async def engine(tmp_path: Path) -> Any:
    store = SQLiteStore(str(tmp_path / "rate.db"))
    await store.open()
    clock = ManualClock()
    e = QueueEngine(store, clock)
    await e.start()
    yield e, clock
    await e.stop()
    await store.close()


async def test_pacing_runs_on_the_engines_clock_and_a_call_is_bounded(engine: Any) -> None:
    e, clock = engine

    await e.enqueue(DLQ, [NewMessage(body=msgspec.Raw(b"%d" % i)) for i in range(60)])
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)
        clock.advance(int(seconds * 1000))

    # 50 a second: batches of 5 (one per 100 ms); 20 messages take 300 ms after the first batch.
    start = clock.now_ms()
    done = await redrive(e, DLQ, "replay", 20, 50.0, sleep)
    assert (done.moved, done.remaining) == (20, 40)
    assert clock.now_ms() - start == 300 and len(slept) == 3
    # 2 a second: one message per 500 ms; a call stops within its budget and says what is left.
    done = await redrive(e, DLQ, "replay", 1000, 2.0, sleep)
    assert done.moved == CALL_BUDGET_MS // 500 and done.remaining == 40 - done.moved
    # Unpaced: no waiting at all.
    slept.clear()
    done = await redrive(e, DLQ, "replay", 1000, None, sleep)
    assert done.remaining == 0 and slept == []
    assert e.channels["replay"].total == 60

    with pytest.raises(InvalidInput):
        await redrive(e, DLQ, DLQ, 10, None, sleep)
    with pytest.raises(ChannelNotFound):
        await redrive(e, "nowhere", None, 10, None, sleep)


async def test_a_redrive_racing_consumers_of_the_same_channel_takes_no_delivered_message(
    engine: Any,
) -> None:
    """Consumers lease (and ack) from the DLQ while it is redriven: each message ends either
    consumed there or moved, never both, and none is lost. Redrive reads its pages from the
    store while the consumers lease from memory: what they hold when a batch is moved stays."""
    e, _ = engine
    n = 600
    await e.enqueue(DLQ, [NewMessage(body=msgspec.Raw(b"%d" % i)) for i in range(n)])
    consumed: list[int] = []
    done = asyncio.Event()

    async def consume() -> None:
        for _ in range(2 * n):  # bounded; ends once the redrive is over and nothing is left
            leases = await e.dequeue(DLQ, 7, 0, None)
            if not leases:
                if done.is_set():
                    return
                await asyncio.sleep(0)
                continue
            consumed.extend(int(lease.message.body) for lease in leases)
            await e.ack(DLQ, [receipt(lease.message.id, lease.attempt) for lease in leases])

    consumers = [asyncio.ensure_future(consume()) for _ in range(3)]
    moved = 0
    for _ in range(20):  # small batches of calls, interleaved with the consumers
        result = await redrive(e, DLQ, "replay", 50, None)
        moved += result.moved
        if result.remaining == 0:
            break
    done.set()
    await asyncio.gather(*consumers)
    replayed = [
        int(m.body) for m in (await e.store.browse("replay", None, 0, 2**62, 1000, 1000)).messages
    ]
    assert moved == len(replayed) and moved > 0 and consumed
    assert not set(consumed) & set(replayed)
    assert sorted(consumed + replayed) == list(range(n))
    assert e.channels[DLQ].total == 0 and e.channels["replay"].total == moved


async def test_a_batch_of_large_messages_is_moved_in_several_writes(
    engine: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    e, _ = engine
    monkeypatch.setattr(redrive_module, "REDRIVE_BATCH_BYTES", 3000)
    big = msgspec.Raw(b'"' + b"x" * 1000 + b'"')
    await e.enqueue(DLQ, [NewMessage(body=big) for _ in range(7)])
    moves: list[int] = []
    store_move = e.store.move

    def counted(channel: str, ids: Any, *args: Any, **kwargs: Any) -> Any:
        moves.append(len(ids))
        return store_move(channel, ids, *args, **kwargs)

    monkeypatch.setattr(e.store, "move", counted)
    done = await redrive(e, DLQ, "replay", 100, None)
    assert done.moved == 7 and moves == [2, 2, 2, 1]  # 1,002 bytes each: two fit in 3,000
