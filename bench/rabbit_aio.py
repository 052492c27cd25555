"""RabbitMQ driven with aio-pika (asyncio): one connection and channel per producer or
consumer (single enqueue: 32 channels on one connection).

A batch is 100 publishes followed by waiting for their publisher confirms; consumers use
basic.qos prefetch and ack with multiple=true every 100 deliveries.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import aio_pika
from aio_pika.abc import (
    AbstractChannel,
    AbstractConnection,
    AbstractIncomingMessage,
    AbstractQueue,
)

from bench.config import Profile
from bench.rabbit import RabbitServer, Runner
from bench.stats import (
    Budget,
    Metrics,
    PeakRss,
    Record,
    RunResult,
    body,
    latency_metrics,
    long_queue_result,
    measured,
    recorder,
)

ACK_EVERY = 100
# How often a consumer looks at the count and the deadline.
IDLE_S = 0.005


class Amqp:
    """Connections to one server; each producer or consumer gets its own channel."""

    def __init__(self, server: RabbitServer) -> None:
        self.server = server
        self.connections: list[AbstractConnection] = []

    async def connection(self) -> AbstractConnection:
        connection = await aio_pika.connect(self.server.url)
        self.connections.append(connection)
        return connection

    async def channel(self, connection: AbstractConnection | None = None) -> AbstractChannel:
        connection = connection or await self.connection()
        return await connection.channel(publisher_confirms=True)

    async def channels(self, n: int) -> list[AbstractChannel]:
        """n channels, each on a connection of its own, opened before a run's clock starts."""
        return [await self.channel() for _ in range(n)]

    async def queue(self, tag: str) -> str:
        name = f"bench-{tag}-{uuid.uuid4().hex[:8]}"
        channel = await self.channel(self.connections[0] if self.connections else None)
        await channel.declare_queue(name, durable=True)
        await channel.close()
        return name

    async def delete(self, name: str) -> None:
        with contextlib.suppress(Exception):
            channel = await self.channel(self.connections[0])
            await channel.queue_delete(name)
            await channel.close()

    async def close(self) -> None:
        for connection in self.connections:
            with contextlib.suppress(Exception):
                await connection.close()
        self.connections.clear()


def persistent(size: int) -> aio_pika.Message:
    return aio_pika.Message(body(size).encode(), delivery_mode=aio_pika.DeliveryMode.PERSISTENT)


async def publish_batch(channel: AbstractChannel, queue: str, size: int, n: int) -> None:
    """n publishes, then wait for all their confirms."""
    exchange = channel.default_exchange
    await asyncio.gather(*(exchange.publish(persistent(size), routing_key=queue) for _ in range(n)))


async def produce(
    channel: AbstractChannel,
    queue: str,
    size: int,
    counter: Budget,
    batch: int,
    received: Budget | None = None,
    backlog: int = 0,
) -> None:
    """Publish batches until `counter` is done; with `received`, hold back while more than
    `backlog` messages wait for delivery (as the LionMQ end-to-end producers do)."""
    while n := counter.claim(batch):
        while received is not None and counter.done - received.done > backlog:
            if counter.left_s <= 0:
                return
            await asyncio.sleep(0.005)
        await publish_batch(channel, queue, size, n)
        counter.add(n)


async def fill(amqp: Amqp, queue: str, size: int, total: int, p: Profile) -> None:
    counter = Budget(total, p.fill_deadline_s)
    channels = await amqp.channels(4)
    await asyncio.gather(*(produce(c, queue, size, counter, p.fill_batch) for c in channels))
    if counter.timed_out:
        raise TimeoutError(f"filled only {counter.done} of {total} in {p.fill_deadline_s}s")


async def consume(
    channel: AbstractChannel,
    queue: str,
    counter: Budget,
    prefetch: int,
    record: Record | None = None,
) -> None:
    """Consumes until every consumer together has received `counter.total`, or its deadline;
    acks with multiple=true every ACK_EVERY deliveries and once more at the end. A delivery
    past the total is left unacked: the broker requeues it when `channel` closes, at the end."""
    await channel.set_qos(prefetch_count=prefetch)
    q: AbstractQueue = await channel.get_queue(queue, ensure=False)
    last: AbstractIncomingMessage | None = None
    unacked = 0
    reached = asyncio.Event()  # this consumer saw the total reached

    async def on_message(message: AbstractIncomingMessage) -> None:
        nonlocal last, unacked
        if counter.complete:
            reached.set()
            return
        if record is not None:
            record(time.time(), [message.body])
        counter.add(1)
        last, unacked = message, unacked + 1
        if unacked >= ACK_EVERY:
            await message.ack(multiple=True)
            unacked = 0
        if counter.complete:
            reached.set()

    tag = await q.consume(on_message)
    try:
        # Another consumer may reach the total: look at the count every IDLE_S too.
        while not counter.complete and not counter.expired():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(reached.wait(), IDLE_S)
        await q.cancel(tag)
        if last is not None and unacked:
            await last.ack(multiple=True)
    finally:
        await channel.close()


async def batch_enqueue(amqp: Amqp, size: int, p: Profile) -> RunResult:
    queue = await amqp.queue("batch")
    counter = Budget(p.batch_total, p.deadline_s)
    channels = await amqp.channels(p.batch_producers)

    async def producer(channel: AbstractChannel) -> None:
        while n := counter.claim(p.batch_size):
            await publish_batch(channel, queue, size, n)
            counter.add(n)

    async def work() -> Metrics:
        start = time.perf_counter()
        await asyncio.gather(*(producer(c) for c in channels))
        return {"msg_s": counter.done / (time.perf_counter() - start), "count": counter.done}

    try:
        return RunResult(
            await measured([amqp.server.pid], work, counter), partial=counter.cut_short
        )
    finally:
        await amqp.delete(queue)


async def single_enqueue(amqp: Amqp, size: int, p: Profile) -> RunResult:
    queue = await amqp.queue("single")
    counter = Budget(p.single_total, p.deadline_s)
    connection = await amqp.connection()
    channels = [await amqp.channel(connection) for _ in range(p.single_concurrency)]
    latencies: list[float] = []

    async def producer(channel: AbstractChannel) -> None:
        while counter.claim(1):
            t0 = time.perf_counter()
            await channel.default_exchange.publish(persistent(size), routing_key=queue)
            latencies.append(time.perf_counter() - t0)
            counter.add(1)

    async def work() -> Metrics:
        start = time.perf_counter()
        await asyncio.gather(*(producer(c) for c in channels))
        rate = counter.done / (time.perf_counter() - start)
        return {"msg_s": rate, "count": counter.done, **latency_metrics(latencies)}

    try:
        return RunResult(
            await measured([amqp.server.pid], work, counter), partial=counter.cut_short
        )
    finally:
        await amqp.delete(queue)


async def drain_queue(amqp: Amqp, queue: str, total: int, p: Profile) -> RunResult:
    counter = Budget(total, p.deadline_s)
    channels = await amqp.channels(p.drain_consumers)

    async def work() -> Metrics:
        start = time.perf_counter()
        await asyncio.gather(*(consume(c, queue, counter, 2 * p.drain_batch) for c in channels))
        return {"msg_s": counter.done / (time.perf_counter() - start), "count": counter.done}

    return RunResult(await measured([amqp.server.pid], work, counter), partial=counter.cut_short)


async def drain(amqp: Amqp, size: int, p: Profile) -> RunResult:
    queue = await amqp.queue("drain")
    try:
        await fill(amqp, queue, size, p.drain_prefill, p)
        return await drain_queue(amqp, queue, p.drain_prefill, p)
    finally:
        await amqp.delete(queue)


async def end_to_end(amqp: Amqp, size: int, p: Profile) -> RunResult:
    queue = await amqp.queue("e2e")
    produced = Budget(p.e2e_total, p.deadline_s)
    received = Budget(p.e2e_total, p.deadline_s)
    latencies: list[float] = []
    record = recorder(latencies)
    producers = await amqp.channels(p.e2e_producers)
    consumers = await amqp.channels(p.e2e_consumers)

    async def work() -> Metrics:
        start = time.perf_counter()
        await asyncio.gather(
            *(
                produce(c, queue, size, produced, p.batch_size, received, p.e2e_backlog)
                for c in producers
            ),
            *(consume(c, queue, received, 5 * p.batch_size, record) for c in consumers),
        )
        rate = received.done / (time.perf_counter() - start)
        return {"msg_s": rate, "count": received.done, **latency_metrics(latencies)}

    try:
        metrics = await measured([amqp.server.pid], work, received)
        return RunResult(metrics, partial=produced.cut_short or received.cut_short)
    finally:
        await amqp.delete(queue)


async def paced(amqp: Amqp, size: int, p: Profile) -> RunResult:
    queue = await amqp.queue("paced")
    total = int(p.paced_rate * p.paced_seconds)
    received = Budget(total, p.paced_seconds + p.deadline_s)
    latencies: list[float] = []
    channel, consumer = await amqp.channels(2)
    pending: set[asyncio.Future[Any]] = set()
    record = recorder(latencies)

    async def producer() -> float:
        start = time.perf_counter()
        sent = 0
        while sent < total and received.left_s > 0:
            due = min(total, int((time.perf_counter() - start) * p.paced_rate) + 1)
            for _ in range(due - sent):
                publish = channel.default_exchange.publish(persistent(size), routing_key=queue)
                task = asyncio.ensure_future(publish)
                pending.add(task)
                task.add_done_callback(pending.discard)
            sent = due
            await asyncio.sleep(1 / p.paced_rate)
        return sent / (time.perf_counter() - start)

    async def work() -> Metrics:
        consuming = asyncio.ensure_future(consume(consumer, queue, received, 100, record))
        await asyncio.sleep(0.5)  # the consumer is subscribed before the first publish
        sent_rate = await producer()
        await consuming
        if pending:
            await asyncio.gather(*pending)
        return {"sent_msg_s": sent_rate, "count": received.done, **latency_metrics(latencies)}

    try:
        metrics = await measured([amqp.server.pid], work, received)
        return RunResult(metrics, partial=received.cut_short)
    finally:
        await amqp.delete(queue)


async def long_queue(amqp: Amqp, size: int, p: Profile) -> RunResult:
    server = amqp.server
    shallow = await amqp.queue("shallow")
    deep = await amqp.queue("deep")
    try:
        async with PeakRss(server.rss_bytes) as memory:
            await fill(amqp, shallow, size, p.long_drain, p)
            empty = await drain_queue(amqp, shallow, p.long_drain, p)
            t0 = time.perf_counter()
            await fill(amqp, deep, size, p.long_depth, p)
            fill_s = time.perf_counter() - t0
            await asyncio.sleep(p.settle_s)
            rss_full = server.rss_bytes()
            at_depth = await drain_queue(amqp, deep, p.long_drain, p)
    finally:
        await amqp.delete(shallow)
        await amqp.delete(deep)
    return long_queue_result(
        depth=p.long_depth,
        fill_s=fill_s,
        rss_full=rss_full,
        memory=memory,
        empty=empty,
        at_depth=at_depth,
    )


Scenario = Callable[[Amqp, int, Profile], Awaitable[RunResult]]
SCENARIOS: dict[int, Scenario] = {
    1: batch_enqueue,
    2: single_enqueue,
    3: drain,
    4: end_to_end,
    5: paced,
    6: long_queue,
}


def _with_connections(scenario: Scenario) -> Runner:
    """The scenario with connections of its own, closed when it ends."""

    async def run(server: RabbitServer, size: int, p: Profile) -> RunResult:
        amqp = Amqp(server)
        try:
            return await scenario(amqp, size, p)
        finally:
            await amqp.close()

    return run


RUNNERS: dict[int, Runner] = {n: _with_connections(scenario) for n, scenario in SCENARIOS.items()}
