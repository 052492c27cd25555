"""How store errors leave the node: 503 + Retry-After only for what a retry can fix, 413 for a
message the store cannot hold, 500 for the rest; 429 carries Retry-After too. And a node whose
MAX_MESSAGE_BYTES passes its store's limit refuses to start."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from mongomock_motor import AsyncMongoMockClient

from app.clock import SystemClock
from app.engine.queue import _dead_headers
from app.errors import ConfigError, StoreError, StoreUnavailable
from app.main import create_app
from app.models import DEAD_LETTER_HEADROOM, Message
from app.store.mongo import MongoStore
from app.store.sqlite import SQLiteStore
from tests.conftest import make_settings


class Failing:
    """A real SQLite store whose calls raise `error` while it is set."""

    def __init__(self, path: str) -> None:
        self.inner = SQLiteStore(path)
        self.error: Exception | None = None
        self.kind = "sqlite"
        self.max_message_bytes = self.inner.max_message_bytes

    def __getattr__(self, name: str) -> Any:
        target = getattr(self.inner, name)
        if name in {"open", "close", "fence"}:  # fence: a plain call, not a coroutine
            return target

        async def call(*args: Any, **kwargs: Any) -> Any:
            if self.error is not None:
                raise self.error
            return await target(*args, **kwargs)

        return call


@pytest.fixture
async def failing(tmp_path: Path) -> AsyncIterator[tuple[httpx.AsyncClient, Failing]]:
    store = Failing(str(tmp_path / "f.db"))
    app: FastAPI = create_app(make_settings(tmp_path), store=store)  # type: ignore[arg-type]
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://localhost") as c,
    ):
        yield c, store


async def test_transient_store_error_is_503_with_retry_after(
    failing: tuple[httpx.AsyncClient, Failing],
) -> None:
    c, store = failing
    store.error = StoreUnavailable("MongoDB unreachable: connection refused")
    for r in (
        await c.post("/channels/o/enqueue", json={"messages": [{"body": 1}]}),
        await c.get("/ready"),
    ):
        assert r.status_code == 503, r.text
        assert r.headers["retry-after"] == "1"
        assert r.headers["content-type"] == "application/problem+json"


async def test_permanent_store_error_is_500_without_retry_after(
    failing: tuple[httpx.AsyncClient, Failing],
) -> None:
    c, store = failing
    store.error = StoreError("the embedded store refused the operation: constraint failed")
    r = await c.post("/channels/o/enqueue", json={"messages": [{"body": 1}]})
    assert r.status_code == 500, r.text
    assert "retry-after" not in r.headers
    assert r.json()["title"] == "Store error"
    assert "constraint failed" in r.json()["detail"]


@pytest.mark.parametrize("kind", ["sqlite", "mongomock"])
async def test_message_the_store_cannot_hold_is_413(tmp_path: Path, kind: str) -> None:
    """The edge counts header characters; the store holds their JSON encoding, which escapes
    newlines into two bytes. A message that passes the first check and not the store's must
    be a 413, with nothing stored."""
    limit = 1000
    store: Any = (
        SQLiteStore(str(tmp_path / "t.db"), max_message_bytes=limit)
        if kind == "sqlite"
        else MongoStore(
            client=AsyncMongoMockClient(),
            database="t",
            max_message_bytes=limit,
            clock=SystemClock(),
        )
    )
    app: FastAPI = create_app(make_settings(tmp_path, max_message_bytes=limit), store=store)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://localhost") as c,
    ):
        body = "x" * 940
        escaped = {"messages": [{"body": body, "headers": {"k": "\n" * 45}}]}
        r = await c.post("/channels/big/enqueue", json=escaped)
        assert r.status_code == 413, r.text
        assert "retry-after" not in r.headers
        assert "mongodb" in r.json()["detail"] or "sqlite" in r.json()["detail"]
        fits = {"messages": [{"body": body, "headers": {"k": "v"}}]}
        assert (await c.post("/channels/big/enqueue", json=fits)).status_code == 201
        counts = (await c.get("/channels/big")).json()["counts"]
        assert counts["ready"] == 1


async def test_channel_full_429_has_retry_after(tmp_path: Path) -> None:
    app: FastAPI = create_app(make_settings(tmp_path))
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://localhost") as c,
    ):
        assert (await c.put("/channels/f", json={"max_length": 1})).is_success
        assert (await c.post("/channels/f/enqueue", json={"messages": [{"body": 1}]})).is_success
        r = await c.post("/channels/f/enqueue", json={"messages": [{"body": 2}]})
        assert r.status_code == 429, r.text
        assert r.headers["retry-after"] == "1"


async def test_node_refuses_a_max_message_bytes_its_store_cannot_hold(tmp_path: Path) -> None:
    """MongoDB holds 16 MiB documents; MAX_MESSAGE_BYTES may be set up to 64 MiB."""
    settings = make_settings(tmp_path, max_message_bytes=20 * 1024 * 1024)
    store = MongoStore(client=AsyncMongoMockClient(), database="big")
    app: FastAPI = create_app(settings, store=store)
    with pytest.raises(ConfigError, match="MAX_MESSAGE_BYTES"):
        async with app.router.lifespan_context(app):
            pass
    # The same setting suits SQLite, which holds larger rows.
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        pass


@pytest.mark.parametrize("kind", ["sqlite", "mongomock"])
async def test_a_message_at_the_limit_can_be_dead_lettered(tmp_path: Path, kind: str) -> None:
    """Dead-lettering adds headers: a message the store took in at its limit must still fit as
    a dead letter. Refused, it stayed in flight for good (its nack a 413 telling the consumer
    to send smaller parts, and every lease expiry a maintenance failure: /ready 503)."""
    limit = 1000
    store: Any = (
        SQLiteStore(str(tmp_path / "t.db"), max_message_bytes=limit)
        if kind == "sqlite"
        else MongoStore(
            client=AsyncMongoMockClient(),
            database="t",
            max_message_bytes=limit,
            clock=SystemClock(),
        )
    )
    app: FastAPI = create_app(make_settings(tmp_path, max_message_bytes=limit), store=store)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://localhost") as c,
    ):
        assert (await c.put("/channels/p", json={"max_attempts": 1})).is_success
        big = {"messages": [{"body": "x" * (limit - 2)}]}  # with its quotes: exactly the limit
        assert (await c.post("/channels/p/enqueue", json=big)).status_code == 201
        got = (await c.post("/channels/p/dequeue", json={"max": 1})).json()["messages"]
        r = await c.post("/channels/p/nack", json={"receipts": [got[0]["receipt"]]})
        assert r.status_code == 200 and r.json()["nacked"] == 1, r.text
        dead = (await c.post("/channels/p.dlq/dequeue", json={"max": 1})).json()["messages"]
        assert [m["body"] for m in dead] == [big["messages"][0]["body"]]
        assert (await c.get("/channels/p")).json()["counts"]["in_flight"] == 0
        assert (await c.get("/ready")).status_code == 200


def test_dead_letter_headers_fit_the_headroom() -> None:
    """The most the engine's dead-letter headers add: the longest name, the largest id."""
    worst = Message(id=2**63 - 1, body=b"x", headers=None, enqueued_at=0, attempt=1000)
    added = len(_dead_headers(worst, "c" * 128, "max_attempts"))
    assert added <= DEAD_LETTER_HEADROOM
