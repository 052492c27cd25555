"""What a node reports for the alerts: a shallow dead-letter channel is listed (in the watcher
snapshot, version 4) and labelled (in /metrics) however many deeper channels the node holds, and
/metrics carries the process's resident memory and each channel's oldest ready age."""

from __future__ import annotations

from pathlib import Path

import httpx
from fastapi import FastAPI
from many_channels import seed_channels
from prometheus_client.parser import text_string_to_metric_families

from app.clock import ManualClock
from app.engine.queue import EngineLimits, QueueEngine
from app.main import create_app
from app.settings import Settings
from app.store.sqlite import SQLiteStore
from app.telemetry import TOP_BY_DEPTH, ProcessSample, WatcherPusher

# More channels deeper than the dead-letter channel than a snapshot lists by depth, or /metrics
# labels (METRICS_MAX_CHANNELS=10 below).
DEEP = {f"deep{i}": 5 + i for i in range(TOP_BY_DEPTH + 10)}
DLQ = "jobs.dlq"


def seed(db: Path) -> None:
    seed_channels(db, 100, depths={**DEEP, DLQ: 1}, now_ms=1)


async def test_the_snapshot_lists_a_shallow_dead_letter_channel(tmp_path: Path) -> None:
    db = tmp_path / "q.db"
    seed(db)
    store = SQLiteStore(str(db))
    await store.open()
    clock = ManualClock(1_000_000)
    engine = QueueEngine(store, clock, EngineLimits())
    await engine.start()
    try:
        settings = Settings(
            node_id="n",
            watcher_url="ws://127.0.0.1:9/ingest",
            watcher_token="t0ken-t0ken",
            _env_file=None,  # type: ignore[call-arg]
        )
        pusher = WatcherPusher(
            settings, engine, store, clock, sampler=lambda: ProcessSample(1.0, 1, 1.0)
        )
        snap = await pusher.tick()
        listed = {c["name"]: c for c in snap["channels"]}
        assert DLQ in listed and listed[DLQ]["ready"] == 1
        assert snap["v"] == 4
        # Still listed on the next, idle, snapshot; gone once empty.
        clock.advance(1000)
        assert DLQ in {c["name"] for c in (await pusher.tick())["channels"]}
        await engine.purge(DLQ)
        clock.advance(1000)
        assert DLQ not in {c["name"] for c in (await pusher.tick())["channels"]}
    finally:
        await engine.stop()
        await store.close()


async def test_metrics_carry_memory_oldest_age_and_a_shallow_dead_letter_channel(
    tmp_path: Path,
) -> None:
    db = tmp_path / "m.db"
    seed(db)
    settings = Settings(
        store_url=f"sqlite:///{db}",
        node_id="m",
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
    assert r.status_code == 200
    families = {f.name: f for f in text_string_to_metric_families(r.text)}
    ready = {s.labels["channel"]: s.value for s in families["lionmq_channel_ready"].samples}
    assert ready.get(DLQ) == 1 and len(ready) == 11  # the 10 deepest, and the dead letters
    (rss,) = families["process_resident_memory_bytes"].samples
    assert rss.value > 10 * 1024**2  # a Python process with FastAPI loaded
    ages = {
        s.labels["channel"]: s.value
        for s in families["lionmq_channel_oldest_ready_age_seconds"].samples
    }
    assert ages[DLQ] > 0  # seeded at time 1 ms: long ago
