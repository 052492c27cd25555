"""`AsyncClient.consume`: the asyncio twin of the threaded consumer."""

from __future__ import annotations

import asyncio
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
from lionmq import AsyncClient, AsyncMessage
from lionmq_fake import FakeNode

FAST: dict[str, Any] = {"wait_ms": 50, "flush_interval": 0.01}
Handler = Callable[[AsyncMessage], Awaitable[object]]


@asynccontextmanager
async def consuming(
    client: AsyncClient, handler: Handler, **kwargs: Any
) -> AsyncIterator[asyncio.Event]:
    """Runs consume as a task; stops it on leaving and fails if it does not end in time."""
    stop = asyncio.Event()
    task = asyncio.create_task(client.consume("jobs", handler, stop=stop, **{**FAST, **kwargs}))
    try:
        yield stop
    finally:
        stop.set()
        async with asyncio.timeout(5):
            await task


async def test_acks_every_message_in_batches(aclient: AsyncClient, node: FakeNode) -> None:
    node.seed("jobs", 60)
    seen: list[str] = []

    async def handler(message: AsyncMessage) -> None:
        await asyncio.sleep(0)
        seen.append(message.id)

    async with consuming(aclient, handler, concurrency=8, batch=20):
        await node.await_for(lambda: len(node.channel("jobs").acked) == 60)
    assert sorted(seen, key=int) == [str(n) for n in range(1, 61)]
    assert len(node.bodies("/ack")) < 20
    assert node.channel("jobs").leased == {}


async def test_concurrency_bounds_running_handlers(aclient: AsyncClient, node: FakeNode) -> None:
    node.seed("jobs", 20)
    running = peak = 0

    async def handler(message: AsyncMessage) -> None:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.005)
        running -= 1

    async with consuming(aclient, handler, concurrency=3, batch=10):
        await node.await_for(lambda: len(node.channel("jobs").acked) == 20)
    assert peak == 3


async def test_nacks_when_the_handler_raises(aclient: AsyncClient, node: FakeNode) -> None:
    node.seed("jobs", 3)

    async def handler(message: AsyncMessage) -> None:
        if message.attempt == 1:
            raise ValueError("boom")

    async with consuming(aclient, handler, concurrency=3):
        await node.await_for(lambda: len(node.channel("jobs").acked) == 3)
    assert len(node.channel("jobs").nacked) == 3


async def test_extends_the_lease_of_a_slow_handler(aclient: AsyncClient, node: FakeNode) -> None:
    node.seed("jobs", 1)
    channel = node.channel("jobs")

    async def handler(message: AsyncMessage) -> None:
        await node.await_for(lambda: len(channel.extended) >= 2)

    async with consuming(aclient, handler, visibility_ms=200):
        await node.await_for(lambda: len(channel.acked) == 1)
    assert node.bodies("/extend")[0]["visibility_ms"] == 200


async def test_stop_finishes_running_handlers_and_nacks_what_waited(
    aclient: AsyncClient, node: FakeNode
) -> None:
    node.seed("jobs", 5)
    started, release = asyncio.Event(), asyncio.Event()

    async def handler(message: AsyncMessage) -> None:
        started.set()
        await release.wait()

    async with consuming(aclient, handler, concurrency=1, batch=5) as stop:
        await asyncio.wait_for(started.wait(), 5)
        stop.set()
        await node.await_for(lambda: len(node.channel("jobs").nacked) == 4)
        release.set()
    channel = node.channel("jobs")
    assert len(channel.acked) == 1 and channel.leased == {}


async def test_drain_timeout_cancels_and_nacks(aclient: AsyncClient, node: FakeNode) -> None:
    node.seed("jobs", 1)
    started, cancelled = asyncio.Event(), asyncio.Event()

    async def handler(message: AsyncMessage) -> None:
        started.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    async with consuming(aclient, handler, drain_timeout=0.05) as stop:
        await asyncio.wait_for(started.wait(), 5)
        stop.set()
    assert cancelled.is_set()
    channel = node.channel("jobs")
    assert channel.acked == [] and len(channel.nacked) == 1


async def test_cancelling_releases_what_it_holds(aclient: AsyncClient, node: FakeNode) -> None:
    """What Ctrl-C under asyncio.run does: the consume task is cancelled."""
    node.seed("jobs", 3)
    started = asyncio.Event()

    async def handler(message: AsyncMessage) -> None:
        if message.id == "1":
            return
        started.set()
        await asyncio.sleep(30)

    task = asyncio.create_task(aclient.consume("jobs", handler, concurrency=2, batch=3, **FAST))
    await asyncio.wait_for(started.wait(), 5)
    await node.await_for(lambda: len(node.channel("jobs").acked) == 1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        async with asyncio.timeout(5):
            await task
    channel = node.channel("jobs")
    assert len(channel.nacked) == 2 and channel.leased == {}


async def test_keeps_consuming_when_the_node_fails_for_a_while(
    aclient: AsyncClient, node: FakeNode
) -> None:
    node.faults.extend([httpx.ConnectError] * 3 + [503] * 3)
    node.seed("jobs", 1)

    async def handler(message: AsyncMessage) -> None:
        await message.ack()

    async with consuming(aclient, handler, error_pause=0.01):
        await node.await_for(lambda: len(node.channel("jobs").acked) == 1)
    assert len(node.bodies("/ack")) == 1  # the handler's own ack; consume sent none


async def test_a_long_run_keeps_no_record_of_finished_messages(
    aclient: AsyncClient, node: FakeNode
) -> None:
    # What the consumer keeps per message must go when the message is done: measured, while it
    # idles, as the memory still held by allocations made in the consume loop, after 1,000 and
    # after 5,000 messages.
    async def handler(message: AsyncMessage) -> None:
        await asyncio.sleep(0)

    def held_by_the_loop() -> int:
        snapshot = tracemalloc.take_snapshot().filter_traces(
            [tracemalloc.Filter(True, "*_consume_async.py")]
        )
        return sum(stat.size for stat in snapshot.statistics("filename"))

    async def idle_after(total: int) -> int:
        await node.await_for(lambda: len(node.channel("jobs").acked) == total, seconds=20)
        await node.await_for(lambda: len(node.bodies("/dequeue")) > polls + 2)  # idle polls
        return held_by_the_loop()

    tracemalloc.start()
    try:
        async with consuming(aclient, handler, concurrency=50, batch=100):
            node.seed("jobs", 1000)
            polls = 0
            after_1000 = await idle_after(1000)
            polls = len(node.bodies("/dequeue"))
            node.seed("jobs", 4000)
            after_5000 = await idle_after(5000)
    finally:
        tracemalloc.stop()
    assert after_5000 - after_1000 < 8 * 1024, (after_1000, after_5000)
