"""Many channels: the maintenance pass, the watcher snapshot and /metrics cost nothing per idle
channel, and what they report still covers every channel."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import httpx
import msgspec
import pytest
from fastapi import FastAPI
from many_channels import seed_channels
from prometheus_client.parser import text_string_to_metric_families

from app.clock import ManualClock
from app.engine.channel import ChannelState
from app.engine.ids import receipt
from app.engine.queue import EngineLimits, NewMessage, QueueEngine
from app.engine.timers import Timers
from app.errors import StoreUnavailable
from app.main import create_app
from app.models import ChannelStats, Event, Lease
from app.settings import Settings
from app.store.sqlite import SQLiteStore
from app.telemetry import (
    TOP_BY_ACTIVITY,
    TOP_BY_DEPTH,
    ChannelTable,
    ProcessSample,
    WatcherPusher,
)
from watcher.schema import SCHEMA_VERSION as WATCHER_SCHEMA_VERSION
from watcher.schema import decoder
from watcher.settings import WatcherSettings
from watcher.state import WatcherState

CHANNELS = 2000
DEEP = {f"deep{i}": i + 1 for i in range(60)}  # deep0 holds 1 message … deep59 holds 60


def msg(body: object) -> NewMessage:
    return NewMessage(body=msgspec.Raw(msgspec.json.encode(body)))


def receipts(leases: list[Lease]) -> list[str]:
    return [receipt(lease.message.id, lease.attempt) for lease in leases]


# -- the timer heap ---------------------------------------------------------------------------
def test_timers_fire_each_channel_once_at_its_earliest_time() -> None:
    t = Timers()
    assert t.arm("a", 100) and t.arm("b", 50)
    assert not t.arm("a", 200)  # a later time never postpones an earlier one
    assert t.arm("a", 30)  # an earlier one replaces it; the entry at 100 goes stale
    assert t.next() == 30
    assert t.pop_due(40) == ["a"]
    assert t.pop_due(1000) == ["b"]  # the stale entry of "a" at 100 fires nothing
    assert t.next() is None and len(t) == 0
    t.arm("c", 10)
    t.disarm("c")
    assert t.pop_due(1000) == [] and t.next() is None


def test_timers_heap_stays_bounded_when_rearmed_earlier_and_earlier() -> None:
    t = Timers()
    for i in range(10_000):
        t.arm("x", 1_000_000 - i)
    assert len(t._heap) <= 64 or len(t._heap) <= 2 * len(t)
    assert t.pop_due(10**9) == ["x"]


# -- the engine's maintenance pass ------------------------------------------------------------
class Counting:
    """Counts ChannelState.expired_leases calls: one per channel a pass visits."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        original = ChannelState.expired_leases

        def counted(ch: ChannelState, now: int) -> list[object]:
            self.calls += 1
            return original(ch, now)  # type: ignore[return-value]

        monkeypatch.setattr(ChannelState, "expired_leases", counted)


@pytest.fixture
async def engine(tmp_path: Path) -> AsyncIterator[QueueEngine]:
    db = tmp_path / "q.db"
    seed_channels(db, CHANNELS)
    store = SQLiteStore(str(db))
    await store.open()
    q = QueueEngine(store, ManualClock(1_000_000), EngineLimits())
    await q.start()
    yield q
    await q.stop()
    await store.close()


async def test_a_pass_visits_only_the_channels_with_something_due(
    engine: QueueEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock: ManualClock = engine.clock  # type: ignore[assignment]
    counting = Counting(monkeypatch)
    wake = await engine.tick(clock.now_ms())
    assert counting.calls == 0  # 5,000 idle channels: none visited
    assert wake is not None and wake > clock.now_ms()  # the next dedup prune, nothing sooner

    await engine.enqueue("c000042", [msg(1)])
    (lease,) = await engine.dequeue("c000042", 1, 0, 5000)
    assert await engine.tick(clock.now_ms()) == lease.deadline  # the one lease names the wake
    assert counting.calls == 0
    clock.advance(5000)
    await engine.tick(clock.now_ms())
    assert counting.calls == 1  # only the channel whose lease ended
    (again,) = await engine.dequeue("c000042", 1, 0, 5000)
    assert again.attempt == 2


async def test_a_missed_timer_is_found_by_the_round_of_checks(engine: QueueEngine) -> None:
    clock: ManualClock = engine.clock  # type: ignore[assignment]
    await engine.enqueue("c000007", [msg(1)])
    await engine.dequeue("c000007", 1, 0, 1000)
    engine.timers.disarm("c000007")  # as if a lease came back after its timer had fired
    clock.advance(1000)
    for _ in range(CHANNELS // 500 + 2):  # one round over every channel (500 a pass), and one more
        await engine.tick(clock.now_ms())
    (again,) = await engine.dequeue("c000007", 1, 0, 1000)
    assert again.attempt == 2


# -- the watcher snapshot ---------------------------------------------------------------------
def make_pusher(engine: QueueEngine) -> WatcherPusher:
    settings = Settings(
        node_id="many",
        watcher_url="ws://127.0.0.1:9/ingest",
        watcher_token="t0ken-t0ken",
        _env_file=None,  # type: ignore[call-arg]
    )
    store = engine.store
    return WatcherPusher(
        settings, engine, store, engine.clock, sampler=lambda: ProcessSample(1.0, 1, 1.0)
    )


async def test_the_snapshot_carries_totals_and_the_top_channels_and_skips_idle_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = tmp_path / "q.db"
    seed_channels(db, CHANNELS, depths=DEEP)
    store = SQLiteStore(str(db))
    await store.open()
    clock = ManualClock(1_000_000)
    engine = QueueEngine(store, clock, EngineLimits())
    await engine.start()
    try:
        pusher = make_pusher(engine)
        snap = await pusher.tick()
        assert snap["v"] == WATCHER_SCHEMA_VERSION
        assert snap["channels_total"] == CHANNELS + len(DEEP)
        assert snap["totals"]["ready"] == sum(DEEP.values())
        names = [c["name"] for c in snap["channels"]]
        assert len(names) == TOP_BY_DEPTH
        assert names[:3] == ["deep59", "deep58", "deep57"]  # the deepest first

        # The watcher takes it: within its channel limit, valid, the node up with the count.
        limits = WatcherSettings(token="x" * 8, _env_file=None)  # type: ignore[call-arg]
        assert len(snap["channels"]) <= limits.max_channels
        decoded = decoder.decode(msgspec.json.encode(snap))
        state = WatcherState()
        record, _ = state.accept(decoded, 1) or (None, None)
        assert record is not None
        view = state.view(record, 1)
        assert view["status"] == "up" and view["totals"]["channels"] == CHANNELS + len(DEEP)
        assert view["totals"]["ready"] == sum(DEEP.values())

        # Activity on a shallow channel: it is listed among the busiest, with its rate.
        await engine.enqueue("c000001", [msg(i) for i in range(5)])
        clock.advance(1000)
        snap = await pusher.tick()
        busy = {c["name"]: c for c in snap["channels"]}["c000001"]
        assert busy["enqueue_rate"] == 5.0 and snap["totals"]["enqueue_rate"] == 5.0
        assert snap["totals"]["ready"] == sum(DEEP.values()) + 5
        assert len(snap["channels"]) <= TOP_BY_DEPTH + TOP_BY_ACTIVITY

        # An idle interval reads only the listed channels again, whatever the node holds.
        reads = 0
        original = ChannelState.stats

        def counted(ch: ChannelState, now: int) -> object:
            nonlocal reads
            reads += 1
            return original(ch, now)

        monkeypatch.setattr(ChannelState, "stats", counted)
        clock.advance(1000)
        snap = await pusher.tick()
        assert reads <= TOP_BY_DEPTH + TOP_BY_ACTIVITY
        assert snap["totals"]["enqueue_rate"] == 0.0
        assert snap["channels_total"] == CHANNELS + len(DEEP)

        # A deleted channel leaves the totals and the count.
        await engine.delete_channel("deep59")
        clock.advance(1000)
        snap = await pusher.tick()
        assert snap["totals"]["ready"] == sum(DEEP.values()) + 5 - 60
        assert snap["channels_total"] == CHANNELS + len(DEEP) - 1
        assert "deep59" not in {c["name"] for c in snap["channels"]}
    finally:
        await engine.stop()
        await store.close()


def test_node_and_watcher_speak_the_same_schema_version() -> None:
    from app.telemetry import SCHEMA_VERSION

    assert SCHEMA_VERSION == WATCHER_SCHEMA_VERSION == 3


# -- /metrics ---------------------------------------------------------------------------------
async def test_metrics_export_node_totals_and_only_the_deepest_channels(tmp_path: Path) -> None:
    db = tmp_path / "inproc.db"
    seed_channels(db, 10_000, depths=DEEP)
    settings = Settings(
        store_url=f"sqlite:///{db}",
        node_id="inproc",
        metrics_max_channels=10,
        _env_file=None,  # type: ignore[call-arg]
    )
    app: FastAPI = create_app(settings)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app), base_url="http://localhost"
        ) as client,
    ):
        r = await client.get("/metrics")
    assert r.status_code == 200 and len(r.content) < 20_000  # was ~5 MB at 10,000 channels
    families = {f.name: f for f in text_string_to_metric_families(r.text)}  # valid text format
    value = {f.name: f.samples[0].value for f in families.values() if len(f.samples) == 1}
    assert value["lionmq_channels"] == 10_000 + len(DEEP)
    assert value["lionmq_channels_exported"] == 10
    assert value["lionmq_node_ready"] == sum(DEEP.values())
    labelled = [s.labels["channel"] for s in families["lionmq_channel_ready"].samples]
    assert labelled == [f"deep{i}" for i in range(59, 49, -1)]


async def test_a_change_still_in_progress_at_a_snapshot_shows_in_the_next(
    engine: QueueEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock: ManualClock = engine.clock  # type: ignore[assignment]
    pusher = make_pusher(engine)
    await engine.enqueue("c000003", [msg(1)])
    (lease,) = await engine.dequeue("c000003", 1, 0, 5000)
    snap = await pusher.tick()
    assert (snap["totals"]["ready"], snap["totals"]["in_flight"]) == (0, 1)

    # A nack whose store write is slow: a snapshot is taken while it waits.
    writing, go_on = asyncio.Event(), asyncio.Event()
    release = engine.store.release

    async def slow_release(
        channel: str, ids: Sequence[int], available_at: int, events: list[Event] | None = None
    ) -> None:
        writing.set()
        await go_on.wait()
        await release(channel, ids, available_at, events)

    monkeypatch.setattr(engine.store, "release", slow_release)
    nack = asyncio.create_task(engine.nack("c000003", receipts([lease]), 0, False))
    await writing.wait()
    clock.advance(1000)
    await pusher.tick()
    go_on.set()
    await nack
    clock.advance(1000)
    snap = await pusher.tick()
    assert (snap["totals"]["ready"], snap["totals"]["in_flight"]) == (1, 0)


def test_reranking_only_the_changed_channels_finds_the_same_deepest_as_ranking_all() -> None:
    rng = random.Random(11)

    def row(name: str, depth: int) -> ChannelStats:
        return ChannelStats(name, depth, 0, 0, 1, 0, 0, 0, 0, 0, None)

    table = ChannelTable()
    table.update([row(f"c{i}", rng.randrange(100)) for i in range(500)], [])
    top = table.deepest(10)
    for _ in range(300):
        changed = list({f"c{rng.randrange(520)}" for _ in range(rng.randrange(1, 6))})
        fresh = [row(name, rng.randrange(120)) for name in changed if rng.random() > 0.1]
        gone = [name for name in changed if name not in {st.name for st in fresh}]
        before = table.update(fresh, gone)
        top = table.rerank(top, 10, changed, before)
        depths = sorted((table.rows[n].ready for n in top), reverse=True)
        assert depths == sorted((table.rows[n].ready for n in table.deepest(10)), reverse=True)


async def test_a_store_failure_mid_pass_leaves_the_failed_channel_due(
    engine: QueueEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock: ManualClock = engine.clock  # type: ignore[assignment]
    for name in ("c000001", "c000002"):
        await engine.enqueue(name, [msg(1)])
        await engine.dequeue(name, 1, 0, 1000)
    release = engine.store.release
    calls = 0

    async def failing_once(
        channel: str, ids: Sequence[int], available_at: int, events: list[Event] | None = None
    ) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise StoreUnavailable("disk busy")
        await release(channel, ids, available_at, events)

    monkeypatch.setattr(engine.store, "release", failing_once)
    clock.advance(1000)
    next_wake = await engine.tick(clock.now_ms())  # c000001 fails; c000002 carries on
    (again,) = await engine.dequeue("c000002", 1, 0, 1000)
    assert again.attempt == 2
    assert list(engine.failing()) == ["c000001"]
    assert next_wake is not None and clock.now_ms() < next_wake <= clock.now_ms() + 1000
    clock.advance(next_wake - clock.now_ms())
    await engine.tick(clock.now_ms())  # its retry: the timer kept it due
    (again,) = await engine.dequeue("c000001", 1, 0, 1000)
    assert again.attempt == 2
    assert engine.failing() == {}
