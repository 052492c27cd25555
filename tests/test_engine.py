"""The queue engine over the real SQLite store, with the clock in the test's hands.

Time moves only when a test says so and `tick(now)` runs only when a test calls it, so lease
expiry, delays and TTLs are checked exactly, without sleeping.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
import pytest

from app.clock import ManualClock
from app.engine.ids import receipt
from app.engine.queue import EngineLimits, NewMessage, QueueEngine
from app.errors import ChannelFull, InvalidReceipt
from app.models import ChannelConfig, Lease
from app.store.sqlite import SQLiteStore


def msg(body: object, **kw: object) -> NewMessage:
    return NewMessage(body=msgspec.Raw(msgspec.json.encode(body)), **kw)  # type: ignore[arg-type]


def bodies(leases: list[Lease]) -> list[object]:
    return [msgspec.json.decode(lease.message.body) for lease in leases]


def receipts(leases: list[Lease]) -> list[str]:
    return [receipt(lease.message.id, lease.attempt) for lease in leases]


class Env:
    def __init__(self, path: Path, window: int = 10_000) -> None:
        self.path = path
        self.clock = ManualClock()
        self.limits = EngineLimits(
            window_size=window,
            dedup_window_ms=300_000,
            defaults=ChannelConfig(visibility_ms=30_000, max_attempts=3),
        )
        self.store = SQLiteStore(str(path))
        self.engine = QueueEngine(self.store, self.clock, self.limits)

    async def open(self) -> QueueEngine:
        await self.store.open()
        await self.engine.start()
        return self.engine

    async def restart(self) -> QueueEngine:
        await self.engine.stop()
        await self.store.close()
        self.store = SQLiteStore(str(self.path))
        self.engine = QueueEngine(self.store, self.clock, self.limits)
        return await self.open()

    async def tick(self, advance_ms: int = 0) -> None:
        self.clock.advance(advance_ms)
        await self.engine.tick(self.clock.now_ms())


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    e = Env(tmp_path / "q.db")
    await e.open()
    yield e
    await e.engine.stop()
    await e.store.close()


async def test_lifecycle_in_order(env: Env) -> None:
    q = env.engine
    await q.enqueue("jobs", [msg(i) for i in range(5)])
    got = await q.dequeue("jobs", 3, 0, None)
    assert bodies(got) == [0, 1, 2]
    assert [lease.attempt for lease in got] == [1, 1, 1]
    out = await q.ack("jobs", receipts(got))
    assert (out.done, out.stale) == (3, [])
    rest = await q.dequeue("jobs", 10, 0, None)
    assert bodies(rest) == [3, 4]
    stats = q.get("jobs").stats(env.clock.now_ms())
    assert (stats.ready, stats.in_flight, stats.acked, stats.enqueued) == (0, 2, 3, 5)


async def test_ack_is_idempotent_and_old_receipts_are_stale(env: Env) -> None:
    q = env.engine
    await q.enqueue("jobs", [msg("a")])
    first = await q.dequeue("jobs", 1, 0, 1000)
    await env.tick(1001)  # lease ends: delivered again with a new receipt
    second = await q.dequeue("jobs", 1, 0, None)
    assert second[0].attempt == 2
    stale = await q.ack("jobs", receipts(first))
    assert (stale.done, stale.stale) == (0, receipts(first))
    assert (await q.ack("jobs", receipts(second))).done == 1
    assert (await q.ack("jobs", receipts(second))).done == 0
    with pytest.raises(InvalidReceipt):
        await q.ack("jobs", ["not-a-receipt!"])


async def test_returned_message_keeps_its_place(env: Env) -> None:
    q = env.engine
    await q.enqueue("jobs", [msg(i) for i in range(3)])
    first = await q.dequeue("jobs", 1, 0, None)
    await q.nack("jobs", receipts(first), 0, False)
    assert bodies(await q.dequeue("jobs", 3, 0, None)) == [0, 1, 2]


async def test_dead_letter_after_max_attempts(env: Env) -> None:
    q = env.engine
    await q.enqueue("jobs", [msg("poison", headers={"trace": "t1"})])
    for attempt in (1, 2, 3):
        got = await q.dequeue("jobs", 1, 0, 1000)
        assert [lease.attempt for lease in got] == [attempt]
        await env.tick(1001)
    assert await q.dequeue("jobs", 1, 0, None) == []
    dead = await q.dequeue("jobs.dlq", 1, 0, None)
    assert bodies(dead) == ["poison"]
    headers = msgspec.json.decode(dead[0].message.headers or b"{}")
    assert headers["trace"] == "t1"
    assert headers["x-dead-letter-channel"] == "jobs"
    assert headers["x-dead-letter-reason"] == "max_attempts"
    assert headers["x-dead-letter-attempts"] == "3"
    assert q.get("jobs").stats(env.clock.now_ms()).dead_lettered == 1
    assert q.get("jobs.dlq").config.dead_letter is None


async def test_nack_to_dead_letter_and_drop_without_one(env: Env) -> None:
    q = env.engine
    await q.enqueue("jobs", [msg("x")])
    got = await q.dequeue("jobs", 1, 0, None)
    await q.nack("jobs", receipts(got), 0, True)
    dead = await q.dequeue("jobs.dlq", 1, 0, None)
    assert msgspec.json.decode(dead[0].message.headers or b"")["x-dead-letter-reason"] == "nack"
    await q.configure("drop", {"dead_letter": None})
    await q.enqueue("drop", [msg("y")])
    got = await q.dequeue("drop", 1, 0, None)
    await q.nack("drop", receipts(got), 0, True)
    assert q.get("drop").stats(env.clock.now_ms()).dead_lettered == 1
    assert "drop.dlq" not in q.channels


async def test_delay_and_nack_delay(env: Env) -> None:
    q = env.engine
    await q.enqueue("jobs", [msg("later", delay_ms=5000), msg("now")])
    assert bodies(await q.dequeue("jobs", 5, 0, None)) == ["now"]
    assert q.get("jobs").stats(env.clock.now_ms()).delayed == 1
    await env.tick(4999)
    assert await q.dequeue("jobs", 5, 0, None) == []
    await env.tick(1)
    later = await q.dequeue("jobs", 5, 0, None)
    assert bodies(later) == ["later"]
    await q.nack("jobs", receipts(later), 2000, False)
    assert q.get("jobs").stats(env.clock.now_ms()).delayed == 1
    await env.tick(2000)
    again = await q.dequeue("jobs", 5, 0, None)
    assert bodies(again) == ["later"] and again[0].attempt == 2


async def test_ttl_dead_letters_ready_and_in_flight(env: Env) -> None:
    q = env.engine
    await q.enqueue("jobs", [msg("short", ttl_ms=1000), msg("long", ttl_ms=60_000)])
    await env.tick(1000)
    dead = await q.dequeue("jobs.dlq", 5, 0, None)
    assert bodies(dead) == ["short"]
    assert msgspec.json.decode(dead[0].message.headers or b"")["x-dead-letter-reason"] == "ttl"
    await q.ack("jobs.dlq", receipts(dead))
    held = await q.dequeue("jobs", 1, 0, 120_000)
    assert bodies(held) == ["long"]
    await env.tick(59_000)  # runs out while leased: not taken from the consumer
    assert q.get("jobs").stats(env.clock.now_ms()).in_flight == 1
    await env.tick(61_000)  # the lease ends after the TTL: dead-lettered, not redelivered
    assert await q.dequeue("jobs", 1, 0, None) == []
    assert bodies(await q.dequeue("jobs.dlq", 5, 0, None)) == ["long"]


async def test_extend_moves_the_deadline(env: Env) -> None:
    q = env.engine
    await q.enqueue("jobs", [msg("slow")])
    got = await q.dequeue("jobs", 1, 0, 1000)
    await env.tick(900)
    out = await q.extend("jobs", receipts(got), 5000)
    assert out.done == 1
    await env.tick(1000)
    assert await q.dequeue("jobs", 1, 0, None) == []
    assert (await q.ack("jobs", receipts(got))).done == 1


async def test_dedup_returns_the_first_id_within_the_window(env: Env) -> None:
    q = env.engine
    first = await q.enqueue("jobs", [msg("a", dedup_id="k1"), msg("b", dedup_id="k1")])
    assert first[0] == first[1]
    again = await q.enqueue("jobs", [msg("c", dedup_id="k1")])
    assert again == [first[0]]
    got = await q.dequeue("jobs", 5, 0, None)
    assert bodies(got) == ["a"]
    await q.ack("jobs", receipts(got))
    assert await q.enqueue("jobs", [msg("d", dedup_id="k1")]) == [first[0]]  # acked, still deduped
    env.clock.advance(300_001)
    fresh = await q.enqueue("jobs", [msg("e", dedup_id="k1")])
    assert fresh != [first[0]]


async def test_max_length_refuses_whole_batch(env: Env) -> None:
    q = env.engine
    await q.configure("small", {"max_length": 3})
    await q.enqueue("small", [msg(1), msg(2)])
    with pytest.raises(ChannelFull):
        await q.enqueue("small", [msg(3), msg(4)])
    assert q.get("small").stats(env.clock.now_ms()).ready == 2
    await q.enqueue("small", [msg(3)])


async def test_window_pages_the_backlog_in_order(tmp_path: Path) -> None:
    e = Env(tmp_path / "w.db", window=100)
    q = await e.open()
    for start in range(0, 1000, 250):
        await q.enqueue("big", [msg(i) for i in range(start, start + 250)])
    assert len(q.get("big").ready) <= 100  # the rest stays in the store
    seen: list[object] = []
    for _ in range(40):
        got = await q.dequeue("big", 37, 0, None)
        if not got:
            break
        seen += bodies(got)
        await q.ack("big", receipts(got))
    assert seen == list(range(1000))
    await e.engine.stop()
    await e.store.close()


async def test_restart_keeps_leases_and_acks(env: Env) -> None:
    q = env.engine
    await q.enqueue("jobs", [msg(i) for i in range(4)])
    got = await q.dequeue("jobs", 3, 0, 10_000)
    await q.ack("jobs", receipts(got[:1]))
    q = await env.restart()
    stats = q.get("jobs").stats(env.clock.now_ms())
    assert (stats.ready, stats.in_flight) == (1, 2)
    # The lease survived the restart: its receipt still acks.
    assert (await q.ack("jobs", receipts(got[1:2]))).done == 1
    assert bodies(await q.dequeue("jobs", 5, 0, None)) == [3]
    await env.tick(10_000)
    back = await q.dequeue("jobs", 5, 0, None)
    assert bodies(back) == [2] and back[0].attempt == 2


async def test_purge_and_delete(env: Env) -> None:
    q = env.engine
    await q.enqueue("jobs", [msg(i) for i in range(3)])
    held = await q.dequeue("jobs", 1, 0, None)
    assert await q.purge("jobs") == 3
    assert (await q.ack("jobs", receipts(held))).done == 0
    assert q.get("jobs").stats(env.clock.now_ms()).ready == 0
    await q.enqueue("jobs", [msg("after")])
    assert bodies(await q.dequeue("jobs", 5, 0, None)) == ["after"]
    await q.delete_channel("jobs")
    assert "jobs" not in q.channels
    q = await env.restart()
    assert "jobs" not in q.channels


async def test_dedup_ids_are_pruned_after_the_window(env: Env) -> None:
    q = env.engine
    await q.enqueue("jobs", [msg(i, dedup_id=f"k{i}") for i in range(5)])
    await env.tick(1)  # a pass inside the window keeps them
    await env.tick(300_000)  # the next pass after the window forgets them
    assert await env.store.prune_dedup(env.clock.now_ms(), 100) == 0
