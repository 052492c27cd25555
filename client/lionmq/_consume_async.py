"""`AsyncClient.consume`: the fetch loop, one task per message and a keeper task that flushes
acks and extends leases, so no ack waits behind a long poll."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from lionmq.consume import ConsumeConfig, Op, Tracker, ctrl_c_stops
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
    loop = asyncio.get_running_loop()
    # The signal handler runs outside the loop: hand the stop to it.
    with ctrl_c_stops(channel, lambda: loop.call_soon_threadsafe(stop.set)):
        await _consume(client, channel, handler, config, stop)


async def _consume(
    client: AsyncClient,
    channel: str,
    handler: Callable[[AsyncMessage], Awaitable[object]],
    config: ConsumeConfig,
    stop: asyncio.Event,
) -> None:
    tracker = Tracker(client._wire, channel, config)
    slot = asyncio.Event()  # a handler finished: there may be room to fetch more
    flush_now = asyncio.Event()
    keeper_done = asyncio.Event()
    gate = asyncio.Semaphore(config.concurrency)  # batch > concurrency fetches ahead
    # Each task's message, and whether its handler got past the gate; a task leaves when done,
    # so this holds no more than the messages in hand however long the consumer runs.
    running: dict[asyncio.Task[None], _Job] = {}

    async def handle(job: _Job) -> None:
        error: Exception | None = None
        async with gate:
            job.begun = True
            try:
                await handler(job.message)
            except Exception as exc:
                error = exc
        if tracker.finish(job.message, error):
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
                job = _Job(message)
                task = asyncio.create_task(handle(job))
                running[task] = job
                task.add_done_callback(lambda done: running.pop(done, None))
    except asyncio.CancelledError:
        # Cancelled (Ctrl-C under asyncio.run): no waiting for handlers, release what is held.
        drain = False
        raise
    finally:
        # Fetched ahead and not started: they go back at once.
        waiting = [task for task, job in running.items() if not job.begun]
        for task in waiting:
            task.cancel()
        tracker.release(running[task].message.receipt for task in waiting)
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


@dataclass(slots=True)
class _Job:
    message: AsyncMessage
    begun: bool = False


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
