"""The node side: the pure snapshot builder, and the pusher's buffering, backoff and sending."""

from __future__ import annotations

import asyncio
import random
import socket
import time
from collections.abc import Iterable
from typing import Any

import msgspec

from app.clock import ManualClock
from app.models import ChannelStats
from app.settings import Settings
from app.telemetry import (
    ProcessSample,
    WatcherPusher,
    advertised_ip,
    build_snapshot,
    percentile,
)
from watcher.schema import cluster_decoder, decoder

PROCESS = ProcessSample(12.5, 50 * 1024 * 1024, 1.25, 40.0, 60.0)


def stats(name: str = "orders", **kw: int | None) -> ChannelStats:
    base: dict[str, int | None] = dict(
        ready=0,
        delayed=0,
        in_flight=0,
        enqueued=0,
        dequeued=0,
        acked=0,
        nacked=0,
        dead_lettered=0,
        redelivered=0,
        oldest_ready_age_ms=None,
    )
    base.update(kw)
    return ChannelStats(name=name, **base)  # type: ignore[arg-type]


def snapshot(**kw: object) -> dict[str, Any]:
    args: dict[str, object] = dict(
        node_id="n1",
        url="http://127.0.0.1:8000",
        ip="127.0.0.1",
        role="standalone",
        status="ok",
        now_ms=10_000,
        started_ms=4_000,
        interval_ms=1000,
        elapsed_ms=2000,
        process=PROCESS,
        store_kind="sqlite",
        store_healthy=True,
        stats=[],
        previous={},
        latencies={},
    )
    args.update(kw)
    return build_snapshot(**args)  # type: ignore[arg-type]


def test_percentile_nearest_rank() -> None:
    values = list(range(100, 0, -1))  # 1..100, unsorted
    assert percentile(values, 0.5) == 50
    assert percentile(values, 0.99) == 99
    assert percentile(values, 1.0) == 100
    assert percentile([7], 0.99) == 7
    assert percentile([], 0.5) is None


def test_rates_are_counter_deltas_over_the_interval() -> None:
    before = stats(enqueued=100, dequeued=50, acked=40, nacked=2, dead_lettered=1, redelivered=3)
    now = stats(
        ready=70,
        delayed=5,
        in_flight=10,
        enqueued=300,
        dequeued=150,
        acked=130,
        nacked=6,
        dead_lettered=4,
        redelivered=5,
        oldest_ready_age_ms=1234,
    )
    snap = snapshot(stats=[now], previous={"orders": before}, elapsed_ms=2000)
    (ch,) = snap["channels"]
    assert ch["ready"] == 70 and ch["delayed"] == 5 and ch["in_flight"] == 10
    assert ch["enqueue_rate"] == 100.0  # 200 in 2 s
    assert ch["dequeue_rate"] == 50.0
    assert ch["ack_rate"] == 45.0
    assert ch["nack_rate"] == 2.0
    assert ch["dead_lettered"] == 3
    assert ch["redelivered"] == 2
    assert ch["oldest_ready_age_ms"] == 1234
    assert ch["enqueued_total"] == 300


def test_new_channel_counts_from_zero_and_reset_counters_never_go_negative() -> None:
    fresh = stats("new", enqueued=30)
    reset = stats("again", enqueued=5)
    snap = snapshot(
        stats=[fresh, reset], previous={"again": stats("again", enqueued=500)}, elapsed_ms=1000
    )
    by_name = {c["name"]: c for c in snap["channels"]}
    assert by_name["new"]["enqueue_rate"] == 30.0
    assert by_name["again"]["enqueue_rate"] == 0.0


def test_ack_latency_percentiles_per_channel() -> None:
    snap = snapshot(
        stats=[stats("a"), stats("b")],
        latencies={"a": [10, 20, 30, 40, 1000]},
    )
    a, b = snap["channels"]
    assert (a["ack_p50_ms"], a["ack_p99_ms"]) == (30.0, 1000.0)
    assert (b["ack_p50_ms"], b["ack_p99_ms"]) == (None, None)


def test_snapshot_describes_the_node_and_matches_the_watcher_schema() -> None:
    snap = snapshot(stats=[stats(ready=1)], store_healthy=False, status="degraded")
    assert snap["uptime_s"] == 6.0
    assert snap["store"] == {"kind": "sqlite", "healthy": False}
    assert snap["cpu_percent"] == 12.5 and snap["memory_rss_bytes"] == 50 * 1024 * 1024
    decoded = decoder.decode(msgspec.json.encode(snap))
    assert decoded.node_id == "n1" and decoded.channels[0].ready == 1
    assert decoded.status == "degraded" and decoded.role == "standalone"


def test_advertised_ip() -> None:
    assert advertised_ip("http://10.1.2.3:8000") == "10.1.2.3"
    assert advertised_ip("http://[::1]:8000") == "::1"
    assert advertised_ip("http://0.0.0.0:8000") == ""
    assert advertised_ip("http://node-1:8000") == ""


class FakeEngine:
    """Channels as stats; a test changes one with `set`, which marks it active."""

    def __init__(self) -> None:
        self.channels: dict[str, ChannelStats] = {"orders": stats("orders")}
        self.activity: set[str] = set(self.channels)
        self.latencies: dict[str, list[int]] = {}
        self.read: list[str] = []

    @property
    def enqueued(self) -> int:
        return self.channels["orders"].enqueued

    @enqueued.setter
    def enqueued(self, n: int) -> None:
        self.set(stats("orders", ready=n, enqueued=n))
        self.latencies["orders"] = [5]

    def set(self, st: ChannelStats) -> None:
        self.channels[st.name] = st
        self.activity.add(st.name)

    def delete(self, name: str) -> None:
        del self.channels[name]
        self.activity.add(name)

    def take_activity(self) -> set[str]:
        seen, self.activity = self.activity, set()
        return seen

    def stats_of(self, names: Iterable[str], now: int, /) -> list[ChannelStats]:
        names = list(names)
        self.read.extend(names)
        return [self.channels[n] for n in names if n in self.channels]

    def channel_count(self) -> int:
        return len(self.channels)

    def take_ack_latencies(self, names: Iterable[str], /) -> dict[str, list[int]]:
        return {n: self.latencies.pop(n) for n in list(names) if n in self.latencies}


class FakeStore:
    kind = "sqlite"

    def __init__(self) -> None:
        self.healthy = True

    async def ping(self) -> None:
        if not self.healthy:
            raise RuntimeError("down")


def pusher(url: str = "ws://127.0.0.1:9/ingest", **kw: object) -> WatcherPusher:
    settings = Settings(
        node_id="n1",
        watcher_url=url,
        watcher_token="t0ken-t0ken",
        metrics_interval_ms=100,
        _env_file=None,  # type: ignore[call-arg]
    )
    return WatcherPusher(
        settings,
        FakeEngine(),
        FakeStore(),
        ManualClock(1_000_000),
        sampler=lambda: PROCESS,
        **kw,  # type: ignore[arg-type]
    )


async def test_tick_computes_rates_between_ticks_and_reports_store_health() -> None:
    p = pusher()
    engine: FakeEngine = p.engine  # type: ignore[assignment]
    store: FakeStore = p.store  # type: ignore[assignment]
    clock: ManualClock = p.clock  # type: ignore[assignment]
    await p.tick()
    engine.enqueued = 50
    clock.advance(500)
    store.healthy = False
    snap = await p.tick()
    assert snap["channels"][0]["enqueue_rate"] == 100.0  # 50 in 0.5 s
    assert snap["status"] == "degraded" and snap["store"]["healthy"] is False
    assert snap["channels"][0]["ack_p50_ms"] == 5.0


async def test_buffer_is_bounded_and_drops_the_oldest() -> None:
    p = pusher(buffer_size=3)
    for _ in range(5):
        p.clock.advance(100)  # type: ignore[attr-defined]
        await p.tick()
    assert len(p.buffer) == 3 and p.counters.dropped == 2
    oldest = msgspec.json.decode(p.buffer[0])
    assert oldest["ts_ms"] == 1_000_000 + 300  # ticks 1 and 2 went


def test_backoff_is_capped_exponential_with_jitter() -> None:
    p = pusher(backoff_initial_s=0.1, backoff_max_s=2.0, rng=random.Random(7))
    for attempt, cap in [(0, 0.1), (1, 0.2), (3, 0.8), (10, 2.0), (500, 2.0)]:
        delays = [p.backoff_s(attempt) for _ in range(50)]
        assert all(cap / 2 <= d <= cap for d in delays)
        assert len(set(delays)) > 1


async def test_a_watcher_that_never_answers_does_not_slow_ticks() -> None:
    # A listener that accepts TCP but never completes the WebSocket handshake.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        port = silent.getsockname()[1]
        p = pusher(f"ws://127.0.0.1:{port}/ingest", buffer_size=4, send_timeout_s=0.3)
        await p.start()
        try:
            started = time.perf_counter()
            for _ in range(20):
                await p.tick()
            assert time.perf_counter() - started < 0.5
            assert len(p.buffer) <= 4
            assert p.counters.sent == 0
        finally:
            await asyncio.wait_for(p.stop(), 5)


# -- the cluster view (schema v3) -------------------------------------------------------------
CLUSTER_DOC: dict[str, Any] = {
    "version": 4,
    "node": {"id": "n1", "url": "http://127.0.0.1:8000", "role": "backup", "extra": 1},
    "shards": [
        {
            "id": "s1",
            "slot": 1,
            "primary": "http://127.0.0.1:8001",
            "backups": ["http://127.0.0.1:8000"],
            "owner": "http://127.0.0.1:8001",
            "owner_id": "p1",
            "epoch": 7,
            "lease_expires_in_ms": 1500,
            "channels": 12,
            "internal": {"not": "for the watcher"},
        }
    ],
    "nodes": [
        {
            "url": "http://127.0.0.1:8000",
            "id": "n1",
            "role": "backup",
            "shards": ["s1"],
            "status": "up",
            "heartbeat_age_ms": 120,
            "lag": {"s1": 2},
            "applied_version": 4,
        }
    ],
}


def test_a_snapshot_carries_the_nodes_cluster_view_in_the_watcher_schema() -> None:
    snap = snapshot(cluster=CLUSTER_DOC)
    assert snap["v"] == 4 and snap["role"] == "backup"
    assert "internal" not in snap["cluster"]["shards"][0]
    assert "extra" not in snap["cluster"]["node"]
    view = cluster_decoder.decode(decoder.decode(msgspec.json.encode(snap)).cluster)
    assert view is not None
    assert view.shards[0].owner_id == "p1" and view.shards[0].epoch == 7
    assert view.nodes[0].lag == {"s1": 2}
    # Without a view: no cluster section, the role the pusher was given.
    plain = snapshot()
    assert "cluster" not in plain and plain["role"] == "standalone"


async def test_the_pusher_reads_a_plain_or_an_async_cluster_view_and_survives_a_failing_one() -> (
    None
):
    plain = pusher(cluster_view=lambda: CLUSTER_DOC)
    assert (await plain.tick())["cluster"]["version"] == 4

    async def async_view() -> dict[str, Any]:
        return CLUSTER_DOC

    assert (await pusher(cluster_view=async_view).tick())["cluster"]["shards"][0]["id"] == "s1"

    def broken() -> dict[str, Any]:
        raise RuntimeError("store away")

    failing = pusher(cluster_view=broken)
    snap = await failing.tick()
    assert "cluster" not in snap and failing.counters.cluster_failures == 1
    assert len(failing.buffer) == 1  # the snapshot still goes
    assert "cluster" not in await pusher(cluster_view=lambda: None).tick()
