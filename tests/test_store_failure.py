"""When the store fails: 503 with a clear detail, nothing half-done, and recovery on its own."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from app.clock import ManualClock
from app.errors import StoreUnavailable
from app.main import create_app
from app.store.sqlite import SQLiteStore
from tests.conftest import make_settings

PASSTHROUGH = {"open", "close", "kind", "fence"}  # fence: a plain call, not a coroutine


class FlakyStore:
    """A real SQLite store whose every call fails while `down` is set, as a lost disk would."""

    def __init__(self, path: str) -> None:
        self.inner = SQLiteStore(path)
        self.down = False
        self.kind = "sqlite"

    def __getattr__(self, name: str) -> Any:
        target = getattr(self.inner, name)
        if name in PASSTHROUGH or not callable(target):
            return target

        async def call(*args: Any, **kwargs: Any) -> Any:
            if self.down:
                raise StoreUnavailable("the embedded store failed: disk I/O error (simulated)")
            return await target(*args, **kwargs)

        return call


@pytest.fixture
async def flaky(tmp_path: Path) -> AsyncIterator[tuple[httpx.AsyncClient, FlakyStore]]:
    store = FlakyStore(str(tmp_path / "f.db"))
    app: FastAPI = create_app(make_settings(tmp_path), store=store)  # type: ignore[arg-type]
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://localhost") as c,
    ):
        yield c, store


def assert_503(r: httpx.Response) -> None:
    assert r.status_code == 503, r.text
    assert r.headers["content-type"] == "application/problem+json"
    assert r.headers["retry-after"] == "1"  # a retry can fix it
    assert "disk I/O error" in r.json()["detail"]


async def test_store_outage_is_a_503_and_recovers(
    flaky: tuple[httpx.AsyncClient, FlakyStore],
) -> None:
    c, store = flaky
    await c.post("/channels/o/enqueue", json={"messages": [{"body": i} for i in range(3)]})
    held = (await c.post("/channels/o/dequeue", json={"max": 1})).json()["messages"]

    store.down = True
    assert_503(await c.post("/channels/o/enqueue", json={"messages": [{"body": "lost?"}]}))
    assert_503(await c.post("/channels/o/dequeue", json={"max": 5}))
    assert_503(await c.post("/channels/o/ack", json={"receipts": [held[0]["receipt"]]}))
    assert (await c.get("/ready")).status_code == 503
    assert (await c.get("/health")).status_code == 200
    counts = (await c.get("/channels/o")).json()["counts"]
    assert counts == {"ready": 2, "delayed": 0, "in_flight": 1}  # nothing half-done

    store.down = False
    assert (await c.get("/ready")).status_code == 200
    # The lease survived the failed ack; the failed dequeue gave its messages back.
    ack = await c.post("/channels/o/ack", json={"receipts": [held[0]["receipt"]]})
    assert ack.json() == {"acked": 1, "stale": []}
    rest = (await c.post("/channels/o/dequeue", json={"max": 10})).json()["messages"]
    assert [m["body"] for m in rest] == [1, 2]
    assert all(m["attempt"] == 1 for m in rest)


async def test_failed_dead_letter_on_delivery_keeps_the_others(tmp_path: Path) -> None:
    """A delivery that must dead-letter one message and fails on the store gives the others
    back: none is lost from the node's memory."""
    clock = ManualClock(start_ms=time.time_ns() // 1_000_000)
    store = FlakyStore(str(tmp_path / "d.db"))
    app: FastAPI = create_app(make_settings(tmp_path), clock=clock, store=store)  # type: ignore[arg-type]
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://localhost") as c,
    ):
        await c.post("/channels/t/enqueue", json={"messages": [{"body": "doomed", "ttl_ms": 5}]})
        await c.post("/channels/t/enqueue", json={"messages": [{"body": "fine"}]})
        store.down = True
        clock.advance(10)  # "doomed" has run out; the maintenance loop cannot reach the store
        assert_503(await c.post("/channels/t/dequeue", json={"max": 5}))
        store.down = False
        got = (await c.post("/channels/t/dequeue", json={"max": 5})).json()["messages"]
        assert [m["body"] for m in got] == ["fine"]


async def test_metrics_answer_while_the_store_is_down(
    flaky: tuple[httpx.AsyncClient, FlakyStore],
) -> None:
    # /metrics is read most when something is wrong: the role comes from the store's leases and
    # member reports, and from the node's own view while the store cannot answer.
    client, store = flaky
    store.down = True
    r = await client.get("/metrics")
    assert r.status_code == 200, r.text
    assert "lionmq_cluster_role{" in r.text
