"""`Client.consume`: one fetching thread, a pool of handler threads and a keeper thread that
flushes acks and extends leases, so no ack waits behind a long poll."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import TYPE_CHECKING

from lionmq.consume import ConsumeConfig, Op, Tracker, ctrl_c_stops
from lionmq.errors import ConnectionFailed, ServerError
from lionmq.message import Message

if TYPE_CHECKING:
    from lionmq._sync import Client


def consume(
    client: Client,
    channel: str,
    handler: Callable[[Message], object],
    config: ConsumeConfig,
    stop: threading.Event | None,
) -> None:
    stop = stop if stop is not None else threading.Event()
    with ctrl_c_stops(channel, stop.set):
        _consume(client, channel, handler, config, stop)


def _consume(
    client: Client,
    channel: str,
    handler: Callable[[Message], object],
    config: ConsumeConfig,
    stop: threading.Event,
) -> None:
    tracker = Tracker(client._wire, channel, config)
    slot = threading.Event()  # a handler finished: there may be room to fetch more
    flush_now = threading.Event()
    keeper_done = threading.Event()
    running: dict[Future[None], Message] = {}

    def handle(message: Message) -> None:
        error: Exception | None = None
        try:
            handler(message)
        except Exception as exc:
            error = exc
        if tracker.finish(message, error):
            flush_now.set()
        slot.set()

    def keep() -> None:
        while not keeper_done.is_set():
            flush_now.wait(config.tick)
            flush_now.clear()
            _send(client, tracker, tracker.due())

    keeper = threading.Thread(target=keep, name=f"lionmq-keeper-{channel}", daemon=True)
    pool = ThreadPoolExecutor(config.concurrency, thread_name_prefix=f"lionmq-{channel}")
    keeper.start()
    try:
        while not stop.is_set():
            running = {f: m for f, m in running.items() if not f.done()}
            slot.clear()
            free = tracker.free()
            if free <= 0:
                slot.wait(config.tick)
                continue
            try:
                deliveries = client._call(tracker.fetch())
            except (ConnectionFailed, ServerError) as exc:
                tracker.fetch_failed(exc)
                stop.wait(config.error_pause)
                continue
            messages = [Message(client, channel, delivery) for delivery in deliveries]
            if not tracker.received(messages, stop.is_set()):
                break
            for message in messages:
                running[pool.submit(handle, message)] = message
    finally:
        try:
            # Messages fetched ahead and not started go back at once.
            tracker.release(m.receipt for f, m in running.items() if f.cancel())
            wait(running, timeout=config.drain_timeout)
        finally:
            # Still held here: the handler overran drain_timeout, or a second Ctrl-C came.
            tracker.release()
            keeper_done.set()
            flush_now.set()
            keeper.join()
            _send(client, tracker, tracker.due())
            pool.shutdown(wait=False, cancel_futures=True)


def _send(client: Client, tracker: Tracker, ops: list[Op]) -> None:
    for op in ops:
        try:
            tracker.sent(op, client._call(op.call))
        except Exception as exc:  # the keeper must outlive any one failed request
            tracker.failed(op, exc)
