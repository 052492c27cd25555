"""`AsyncClient.consume`: the fetch loop, one task per message and a keeper task that flushes
acks and extends leases, so no ack waits behind a long poll."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from lionmq.consume import ConsumeConfig, Op, Tracker
from lionmq.errors import ConnectionFailed, ServerError
from lionmq.message import AsyncMessage

if TYPE_CHECKING:
    from lionmq._async import AsyncClient


async def consume(
    client: AsyncClient,
    channel: str,
    handler: Callable[[AsyncMessage], Awaitable[object]],
    config: ConsumeConfig,
    stop: asyncio.Event | None,
) -> None:
    stop = stop if stop is not None else asyncio.Event()
    tracker = Tracker(client._wire, channel, config)
    slot = asyncio.Event()  # a handler finished: there may be room to fetch more
    flush_now = asyncio.Event()
    keeper_done = asyncio.Event()
    gate = asyncio.Semaphore(config.concurrency)  # batch > concurrency fetches ahead
    running: dict[asyncio.Task[None], AsyncMessage] = {}
    begun: set[str] = set()  # receipts whose handler got past the gate

    async def handle(message: AsyncMessage) -> None:
        error: Exception | None = None
        async with gate:
            begun.add(message.receipt)
            try:
                await handler(message)
            except Exception as exc:
                error = exc
        if tracker.finish(message, error):
            flush_now.set()
        slot.set()

    async def keep() -> None:
        while not keeper_done.is_set():
            await _wait(flush_now, config.tick)
            flush_now.clear()
            await _send(client, tracker, tracker.due())

    keeper = asyncio.create_task(keep(), name=f"lionmq-keeper-{channel}")
    drain = True
    try:
        while not stop.is_set():
            slot.clear()
            free = tracker.free()
            if free <= 0:
                await _wait(slot, config.tick)
                continue
            try:
                deliveries = await client._call(tracker.fetch())
            except (ConnectionFailed, ServerError) as exc:
                tracker.fetch_failed(exc)
                await _wait(stop, config.error_pause)
                continue
            messages = [AsyncMessage(client, channel, delivery) for delivery in deliveries]
            if not tracker.received(messages, stop.is_set()):
                break
            for message in messages:
                task = asyncio.create_task(handle(message))
                running[task] = message
                task.add_done_callback(lambda done: running.pop(done, None))
    except asyncio.CancelledError:
        # Cancelled (Ctrl-C under asyncio.run): no waiting for handlers, release what is held.
        drain = False
        raise
    finally:
        # Fetched ahead and not started: they go back at once.
        waiting = [task for task, m in running.items() if m.receipt not in begun]
        for task in waiting:
            task.cancel()
        tracker.release(running[task].receipt for task in waiting)
        flush_now.set()
        if drain and running:
            await asyncio.wait(running, timeout=config.drain_timeout)
        for task in running:
            task.cancel()
        # Still held here: the handler overran drain_timeout, or the consumer was cancelled.
        tracker.release()
        keeper_done.set()
        flush_now.set()
        await keeper
        await _send(client, tracker, tracker.due())


async def _wait(event: asyncio.Event, seconds: float) -> None:
    """Returns when `event` is set or after `seconds`, whichever comes first."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await event.wait()


async def _send(client: AsyncClient, tracker: Tracker, ops: list[Op]) -> None:
    for op in ops:
        try:
            tracker.sent(op, await client._call(op.call))
        except Exception as exc:  # the keeper must outlive any one failed request
            tracker.failed(op, exc)
