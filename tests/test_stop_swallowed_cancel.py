"""The node's background loops stop even when a cancellation is swallowed on its way (3.11's
wait_for drops one that lands just as its inner wait completes): a node whose port was taken
hung for good in its shutdown, its watcher pusher's first snapshot under way when the cancel
came. Each loop also checks a stop flag, as the maintenance loop does."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import httpx

from app.cluster.heartbeat import HeartbeatSender
from app.cluster.journal import Journal
from app.telemetry import WatcherPusher
from tests.watcher.test_snapshot import pusher


def swallowing() -> Callable[..., Awaitable[object]]:
    """A tick that loses the first cancellation that reaches it, as wait_for can on 3.11."""
    lost = []

    async def tick(*args: object, **kwargs: object) -> object:
        try:
            await asyncio.sleep(0.05)
        except asyncio.CancelledError:
            if lost:
                raise
            lost.append(True)
        return {}

    return tick


async def stops(service: HeartbeatSender | WatcherPusher) -> None:
    stop = asyncio.ensure_future(service.stop())
    await asyncio.wait({stop}, timeout=3)
    assert stop.done(), "stop() still waits for its loop"


async def test_the_watcher_pusher_stops_though_its_tick_swallowed_the_cancel() -> None:
    p = pusher()
    p.tick = swallowing()  # type: ignore[method-assign]
    await p.start()
    await asyncio.sleep(0.02)  # the first tick under way
    await stops(p)


async def test_the_heartbeat_sender_stops_though_its_beat_swallowed_the_cancel() -> None:
    class Engine:
        journal = None

    async with httpx.AsyncClient() as http:
        sender = HeartbeatSender(
            engine=Engine(),  # type: ignore[arg-type]
            journal=Journal(lambda name: "s1"),
            owned=dict,
            backups_of=lambda shard: [],
            node_id="n",
            node_url="http://127.0.0.1:1",
            secret="s",
            heartbeat_ms=50,
            http=http,
            monotonic_ms=lambda: 0,
        )
        sender.tick = swallowing()  # type: ignore[method-assign]
        await sender.start()
        await asyncio.sleep(0.02)
        await stops(sender)
