"""Per-message history (a channel with `trace`), recorded by the engine over the real SQLite store.

The clock is the test's: every event's time is known exactly.
"""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import msgspec
import pytest

from app.clock import ManualClock
from app.cluster import journal
from app.cluster.journal import config_of, settings_of
from app.engine import trace
from app.engine.channel import ChannelState
from app.engine.ids import IdGenerator, receipt
from app.engine.queue import EngineLimits, NewMessage, QueueEngine
from app.errors import ChannelNotFound
from app.models import ChannelConfig, Event, Lease, Message
from app.store.sqlite import SQLiteStore

T0 = 1_700_000_000_000
VIS = 30_000
WHO = "10.1.2.3:40000"


def msg(body: object, **kw: object) -> NewMessage:
    return NewMessage(body=msgspec.Raw(msgspec.json.encode(body)), **kw)  # type: ignore[arg-type]


def receipts(leases: Sequence[Lease]) -> list[str]:
    return [receipt(lease.message.id, lease.attempt) for lease in leases]


class Env:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.clock = ManualClock(T0)
        limits = EngineLimits(defaults=ChannelConfig(visibility_ms=VIS, max_attempts=3))
        self.store = SQLiteStore(str(path))
        self.engine = QueueEngine(self.store, self.clock, limits)
        self.asked = 0  # how often the engine asked who the consumer is

    def consumer(self) -> str:
        self.asked += 1
        return WHO

    async def dequeue(self, channel: str, n: int = 10) -> list[Lease]:
        return await self.engine.dequeue(channel, n, 0, None, self.consumer)

    async def tick(self, advance_ms: int) -> None:
        self.clock.advance(advance_ms)
        await self.engine.tick(self.clock.now_ms())

    def columns(self) -> set[str]:
        with sqlite3.connect(self.path) as conn:
            return {row[1] for row in conn.execute("PRAGMA table_info(messages)")}


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    e = Env(tmp_path / "q.db")
    await e.store.open()
    await e.engine.start()
    yield e
    await e.engine.stop()
    await e.store.close()


def delivered(at: int, attempt: int) -> Event:
    return {
        "at": at,
        "event": "delivered",
        "consumer": WHO,
        "lease_deadline": at + VIS,
        "attempt": attempt,
    }


async def test_a_poison_messages_whole_story(env: Env) -> None:
    q = env.engine
    await q.configure("jobs", {"trace": True})
    [msg_id] = await q.enqueue("jobs", [msg({"n": 1})])
    t_enq = env.clock.now_ms()

    await env.tick(5)
    assert len(await env.dequeue("jobs")) == 1
    t1 = env.clock.now_ms()
    await env.tick(VIS)  # the lease runs out
    t_exp = env.clock.now_ms()
    [second] = await env.dequeue("jobs")
    t2 = env.clock.now_ms()
    await env.tick(7)
    await q.nack("jobs", receipts([second]), 500, False)
    t_nack = env.clock.now_ms()
    await env.tick(500)
    [third] = await env.dequeue("jobs")
    t3 = env.clock.now_ms()
    await env.tick(9)
    await q.nack("jobs", receipts([third]), 0, False)  # the third of max_attempts 3
    t_dead = env.clock.now_ms()

    assert await q.history("jobs", msg_id) is None  # moved
    dlq = q.get("jobs.dlq")
    assert dlq.config.trace  # made for a traced channel: traces too
    [copy] = await env.dequeue("jobs.dlq")
    assert copy.message.id != msg_id
    story = await q.history("jobs.dlq", copy.message.id)
    assert story is not None
    assert story[:-1] == [
        {"at": t_enq, "event": "enqueued"},
        delivered(t1, 1),
        {"at": t_exp, "event": "lease_expired", "attempt": 1},
        delivered(t2, 2),
        {"at": t_nack, "event": "nacked", "attempt": 2, "delay_ms": 500},
        delivered(t3, 3),
        {
            "at": t_dead,
            "event": "dead_lettered",
            "reason": "max_attempts",
            "to": "jobs.dlq",
            "after": "nacked",
            "attempt": 3,
        },
    ]
    assert story[-1] == {**delivered(t_dead, 1), "lease_deadline": t_dead + VIS}  # in the dlq


async def test_an_untraced_channel_does_no_history_work(env: Env) -> None:
    q = env.engine
    await q.configure("jobs", {"max_attempts": 1, "ttl_ms": 60_000})
    await q.enqueue("jobs", [msg(1), msg(2)])
    leases = await env.dequeue("jobs")
    await q.nack("jobs", receipts(leases[:1]), 0, False)  # dead-lettered: attempts used up
    await env.tick(VIS)  # the other lease expires: dead-lettered too
    [copy, _] = await env.dequeue("jobs.dlq")
    await q.enqueue("jobs", [msg(3)])
    await env.tick(60_001)  # its TTL runs out
    assert env.asked == 0  # the consumer's address is never worked out
    assert "history" not in env.columns()  # no store work: the column was never needed
    assert await q.history("jobs.dlq", copy.message.id) == []
    assert not q.get("jobs.dlq").config.trace


async def test_ttl_and_dropped_dead_letters(env: Env) -> None:
    q = env.engine
    await q.configure("jobs", {"trace": True, "ttl_ms": 1_000})
    await q.configure("gone", {"trace": True, "dead_letter": None, "max_attempts": 1})
    [expiring] = await q.enqueue("jobs", [msg(1)])
    [dropped] = await q.enqueue("gone", [msg(2)])
    await env.tick(1_000)
    t = env.clock.now_ms()
    [copy] = await env.dequeue("jobs.dlq")  # the sweep moved it
    assert await q.history("jobs.dlq", copy.message.id) == [
        {"at": T0, "event": "enqueued"},
        {
            "at": t,
            "event": "dead_lettered",
            "reason": "ttl",
            "to": "jobs.dlq",
            "attempt": 0,
        },
        delivered(t, 1),
    ]
    assert await q.history("jobs", expiring) is None
    leases = await env.dequeue("gone")
    await q.nack("gone", receipts(leases), 0, True)
    assert await q.history("gone", dropped) is None  # dropped: its history with it


async def test_trace_turned_on_and_off(env: Env) -> None:
    q = env.engine
    [before] = await q.enqueue("jobs", [msg(1)])
    await q.configure("jobs", {"trace": True})
    [traced] = await q.enqueue("jobs", [msg(2)])
    await env.dequeue("jobs")
    t = env.clock.now_ms()
    assert await q.history("jobs", before) == [delivered(t, 1)]  # from when it was turned on
    assert await q.history("jobs", traced) == [{"at": t, "event": "enqueued"}, delivered(t, 1)]
    await q.configure("jobs", {"trace": False})
    asked = env.asked
    await env.tick(VIS)  # leases expire: not recorded now
    await env.dequeue("jobs")
    assert env.asked == asked
    assert await q.history("jobs", traced) == [{"at": t, "event": "enqueued"}, delivered(t, 1)]


async def test_history_of_unknown_channel_or_message(env: Env) -> None:
    q = env.engine
    with pytest.raises(ChannelNotFound):
        await q.history("nope", 1)
    await q.enqueue("jobs", [msg(1)])
    assert await q.history("jobs", 12345) is None


async def test_a_dequeue_without_a_known_consumer(env: Env) -> None:
    q = env.engine
    await q.configure("jobs", {"trace": True})
    [msg_id] = await q.enqueue("jobs", [msg(1)])
    await q.dequeue("jobs", 1, 0, None)
    history = await q.history("jobs", msg_id)
    assert history is not None and history[-1]["consumer"] == "unknown"


def test_builders_share_one_event_per_batch_or_attempt() -> None:
    assert len({id(e) for e in trace.enqueued(1, 5)}) == 1
    assert len({id(e) for e in trace.redriven(1, "a.dlq", "a", 3)}) == 1
    long_name = "x" * 200
    m = [Lease(message=_message(i), attempt=1 + i % 2, deadline=9) for i in range(6)]
    events = trace.delivered(1, m, long_name, 9)
    assert len({id(e) for e in events}) == 2
    assert [e["attempt"] for e in events] == [1, 2, 1, 2, 1, 2]
    consumer = events[0]["consumer"]
    assert isinstance(consumer, str) and len(consumer) == 64  # bounded (CONSUMER_MAX_CHARS)


def _message(i: int) -> Message:
    return Message(id=i, body=b"1", headers=None, enqueued_at=0)


def test_the_trace_setting_round_trips_through_the_mirror() -> None:
    ch = ChannelState("jobs", ChannelConfig(max_attempts=4, trace=True), 10)
    wire = msgspec.json.encode(settings_of(ch))
    assert config_of(msgspec.json.decode(wire, type=journal.Settings)) == ch.config
    # A node of an older version sends the array without it (and ignores it at the end).
    older = msgspec.json.decode(wire, type=list[object])[:-1]
    decoded = msgspec.json.decode(msgspec.json.encode(older), type=journal.Settings)
    assert config_of(decoded) == ChannelConfig(max_attempts=4, trace=False)


class OneShard:
    """This node serves every channel but the dead-letter channel, which is another shard's."""

    def __init__(self, clock: ManualClock) -> None:
        self.ids = IdGenerator(clock)
        self.poked: list[str] = []

    def ids_for(self, channel: str) -> IdGenerator:
        return self.ids

    def serves(self, channel: str) -> bool:
        return not channel.endswith(".dlq")

    def admits(self, channel: str) -> bool:
        return self.serves(channel)

    def poke(self, channel: str) -> None:
        self.poked.append(channel)


async def test_a_dead_letter_into_another_shard_carries_its_history(env: Env) -> None:
    q = env.engine
    own = q.ownership = OneShard(env.clock)
    await q.configure("jobs", {"trace": True, "max_attempts": 1})
    await q.enqueue("jobs", [msg(1)])
    [lease] = await env.dequeue("jobs")
    await q.nack("jobs", receipts([lease]), 0, False)
    assert own.poked == ["jobs.dlq"] and "jobs.dlq" not in q.channels
    # The other shard's owner finds the channel (tracing, as made for a traced channel) and the
    # copy with its history, in the store.
    assert (await env.store.load_channels())["jobs.dlq"].trace
    [copy] = await env.store.page_ready("jobs.dlq", 0, env.clock.now_ms(), 10)
    history = await env.store.history("jobs.dlq", copy.id)
    assert history is not None
    assert [e["event"] for e in history] == ["enqueued", "delivered", "dead_lettered"]
