"""The maintenance loop is supervised: one channel's failure does not stop the others' upkeep,
an unexpected error is survived and reported by /ready, and shutdown closes every resource
whatever fails."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
from fastapi import FastAPI

from app.clock import ManualClock
from app.engine.maintenance import Maintenance
from app.engine.queue import EngineLimits, NewMessage, QueueEngine
from app.errors import StoreUnavailable
from app.main import create_app
from app.store.sqlite import SQLiteStore
from tests.conftest import make_settings


class PickyStore:
    """A real SQLite store whose `promote_due` fails for the channels in `broken`."""

    def __init__(self, path: str) -> None:
        self.inner = SQLiteStore(path)
        self.kind = "sqlite"
        self.max_message_bytes = self.inner.max_message_bytes
        self.broken: set[str] = set()
        self.promote_calls: dict[str, int] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def promote_due(self, channel: str, now: int, limit: int) -> Any:
        self.promote_calls[channel] = self.promote_calls.get(channel, 0) + 1
        if channel in self.broken:
            raise StoreUnavailable(f"the embedded store failed: disk I/O error ({channel})")
        return await self.inner.promote_due(channel, now, limit)


def new(body: object, **kw: Any) -> NewMessage:
    return NewMessage(body=msgspec.Raw(msgspec.json.encode(body)), **kw)


async def test_one_failing_channel_does_not_stop_the_others(tmp_path: Path) -> None:
    clock = ManualClock()
    store = PickyStore(str(tmp_path / "m.db"))
    await store.open()
    engine = QueueEngine(store, clock, EngineLimits())  # type: ignore[arg-type]
    try:
        await engine.start()
        await engine.enqueue("a", [new("late", delay_ms=100)])  # "a" comes first in a pass
        await engine.enqueue("b", [new("held")])
        (lease,) = await engine.dequeue("b", 1, 0, 1000)
        store.broken = {"a"}

        clock.advance(1000)
        await engine.tick(clock.now_ms())
        # "b"'s lease ran out and came back, although "a" failed before it.
        again = await engine.dequeue("b", 1, 0, 1000)
        assert [lease_.message.id for lease_ in again] == [lease.message.id]
        assert again[0].attempt == 2
        assert list(engine.failing()) == ["a"]
        assert "disk I/O error" in engine.failing()["a"]

        # Backed off: the next passes leave "a" alone until its retry is due...
        calls = store.promote_calls["a"]
        next_wake = await engine.tick(clock.now_ms())
        assert store.promote_calls["a"] == calls
        assert next_wake is not None and next_wake > clock.now_ms()  # no busy loop
        # ... and once it is, and the store answers again, "a" is whole.
        store.broken = set()
        clock.advance(200)
        await engine.tick(clock.now_ms())
        assert engine.failing() == {}
        assert [m.message.body for m in await engine.dequeue("a", 1, 0, 1000)] == [b'"late"']
    finally:
        await engine.stop()
        await store.close()


async def until(predicate: Callable[[], Awaitable[bool]], seconds: float, what: str) -> None:
    """Poll `predicate` until it holds, failing after `seconds`."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if await predicate():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out after {seconds}s waiting for {what}")


async def test_unexpected_error_is_survived_logged_and_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A bug in a pass (not a StoreError) used to end the loop silently, /ready still 200."""
    real_tick = QueueEngine.tick
    broken = True

    async def tick(self: QueueEngine, now: int) -> int | None:
        if broken:
            raise RuntimeError("a bug in the pass")
        return await real_tick(self, now)

    monkeypatch.setattr(QueueEngine, "tick", tick)
    app: FastAPI = create_app(make_settings(tmp_path))
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://localhost") as c,
    ):

        async def unready() -> bool:
            r = await c.get("/ready")
            return r.status_code == 503 and "RuntimeError: a bug in the pass" in r.text

        await until(unready, 5, "/ready to report the failing loop")
        assert any(
            r.exc_info and "maintenance pass failed unexpectedly" in r.getMessage()
            for r in caplog.records
            if r.levelno == logging.ERROR
        ), "the first failure is logged with its traceback"
        broken = False

        async def ready() -> bool:
            return (await c.get("/ready")).status_code == 200

        await until(ready, 5, "/ready once the loop works again")


async def test_a_stopped_loop_makes_the_node_unready(tmp_path: Path) -> None:
    app: FastAPI = create_app(make_settings(tmp_path))
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://localhost") as c,
    ):
        assert (await c.get("/ready")).status_code == 200
        maintenance: Maintenance = app.state.node.maintenance
        task = maintenance._task
        assert task is not None
        task.cancel()
        await asyncio.wait({task})
        r = await c.get("/ready")
        assert r.status_code == 503
        assert "maintenance loop is not running" in r.json()["detail"]


async def test_shutdown_closes_the_store_when_the_loop_died(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The loop's error used to escape Maintenance.stop() and skip engine.stop() and
    store.close()."""

    async def dies(self: Maintenance, now: int) -> int | None:
        raise RuntimeError("the loop itself broke")

    monkeypatch.setattr(Maintenance, "tick", dies)
    store = SQLiteStore(str(tmp_path / "s.db"))
    app: FastAPI = create_app(make_settings(tmp_path), store=store)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://localhost") as c,
    ):

        async def unready() -> bool:
            return (await c.get("/ready")).status_code == 503

        await until(unready, 5, "/ready to report the dead loop")
    assert store._writer is None and store._read_conn is None  # closed


async def test_shutdown_closes_the_store_when_the_engine_fails_to_stop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def fails(self: QueueEngine) -> None:
        raise RuntimeError("engine stop failed")

    monkeypatch.setattr(QueueEngine, "stop", fails)
    store = SQLiteStore(str(tmp_path / "s.db"))
    app: FastAPI = create_app(make_settings(tmp_path), store=store)
    with pytest.raises(RuntimeError, match="engine stop failed"):
        async with app.router.lifespan_context(app):
            pass
    assert store._writer is None and store._read_conn is None  # closed all the same
