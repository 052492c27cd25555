"""A stand-in node for the watcher's tests: the real `WatcherPusher`, fed by a fake engine.

Run as `python tests/watcher/fake_node.py`; configured by the node's own environment variables
(NODE_ID, WATCHER_URL, WATCHER_TOKEN, METRICS_INTERVAL_MS, SERVER_HOST). Its one channel, `orders`,
gains 5 messages a second and has 2 taken and acked a second. With FAKE_CLUSTER_VIEW naming a JSON
file, the file is the node's `GET /cluster` document, read again for every snapshot (a test
rewrites it to play the cluster's part).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from app.clock import SystemClock
from app.models import ChannelStats
from app.settings import load_settings
from app.telemetry import WatcherPusher


class FakeEngine:
    def __init__(self, clock: SystemClock) -> None:
        self.clock = clock
        self.start = clock.now_ms()

    def take_activity(self) -> set[str]:
        return {"orders"}

    def channel_count(self) -> int:
        return 1

    def stats_of(self, names: Iterable[str], now: int, /) -> list[ChannelStats]:
        secs = (now - self.start) / 1000
        enq, deq = int(5 * secs), int(2 * secs)
        orders = ChannelStats(
            name="orders",
            ready=enq - deq,
            delayed=3,
            in_flight=1,
            enqueued=enq,
            dequeued=deq,
            acked=deq,
            nacked=0,
            dead_lettered=0,
            redelivered=0,
            oldest_ready_age_ms=int(secs * 600),
        )
        return [orders] if "orders" in names else []

    def take_ack_latencies(self, names: Iterable[str], /) -> dict[str, list[int]]:
        return {"orders": [20, 30, 40, 250]} if "orders" in names else {}


class FakeStore:
    kind = "sqlite"

    async def ping(self) -> None:
        return None


def cluster_view(path: Path) -> dict[str, Any] | None:
    doc: dict[str, Any] = json.loads(path.read_text())
    return doc


async def main() -> None:
    settings = load_settings()
    clock = SystemClock()
    view_file = os.environ.get("FAKE_CLUSTER_VIEW")
    pusher = WatcherPusher(
        settings,
        FakeEngine(clock),
        FakeStore(),
        clock,
        cluster_view=(lambda: cluster_view(Path(view_file))) if view_file else None,
    )
    await pusher.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await pusher.stop()


if __name__ == "__main__":
    asyncio.run(main())
