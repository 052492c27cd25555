"""RabbitMQ driven with pika's BlockingConnection: every producer and consumer is a thread with
a connection of its own (a BlockingConnection is not thread-safe), opened before the run's
clock starts; the threads run from a pool so that the event loop of `python -m bench` only
waits.

Batches are transactions: 100 persistent publishes, then tx.commit, whose commit-ok RabbitMQ
sends once the messages are durable (what a publisher confirm says, for the whole batch at
once; pika's blocking confirm mode would wait for each message in turn). Single publishes use
publisher confirms (basic_publish returns once confirmed). Consumers use basic.qos prefetch
and ack with multiple=true every 100 deliveries.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue as queues
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import pika
from pika.adapters.blocking_connection import BlockingChannel, BlockingConnection

from bench import shape
from bench.config import Profile
from bench.rabbit_server import RabbitServer
from bench.shape import (
    PACED_PULL,
    Pull,
    Runner,
    check_filled,
    drain_pull,
    e2e_pull,
    measured_run,
    queue_name,
    throughput,
)
from bench.stats import Budget, Metrics, Record, RunResult, body, latency_metrics, recorder

ACK_EVERY = 100
PERSISTENT = pika.BasicProperties(delivery_mode=pika.DeliveryMode.Persistent)
# How long a consumer waits for a delivery before it looks at the count and the deadline again.
IDLE_S = 0.05


def connect(url: str) -> BlockingConnection:
    return BlockingConnection(pika.URLParameters(url))


def _open(url: str, n: int) -> list[BlockingConnection]:
    opened: list[BlockingConnection] = []
    try:
        for _ in range(n):
            opened.append(connect(url))
    except BaseException:
        _close(opened)
        raise
    return opened


def _close(connections: list[BlockingConnection]) -> None:
    for connection in connections:
        if connection.is_open:
            connection.close()


@contextlib.asynccontextmanager
async def connected(server: RabbitServer, n: int) -> AsyncIterator[list[BlockingConnection]]:
    """n connections, opened before a run's clock starts (as LionMQ's client and the other
    peers' connections are) and closed after it; each is then used by one thread only."""
    connections = await asyncio.to_thread(_open, server.url, n)
    try:
        yield connections
    finally:
        await asyncio.to_thread(_close, connections)


def in_threads(work: list[Callable[[], None]]) -> None:
    """Runs each callable in a thread of its own; raises the first error once all have ended
    (each is bounded by its run's count and deadline)."""
    with ThreadPoolExecutor(len(work), thread_name_prefix="pika") as pool:
        futures = [pool.submit(fn) for fn in work]
        for future in futures:
            future.result()


async def threads(*work: Callable[[], None]) -> None:
    await asyncio.to_thread(in_threads, list(work))


def _declare(url: str, tag: str) -> str:
    name = queue_name(tag)
    with connect(url) as connection:
        connection.channel().queue_declare(name, durable=True)
    return name


def _delete(url: str, name: str) -> None:
    with connect(url) as connection:
        connection.channel().queue_delete(name)


def produce(
    connection: BlockingConnection,
    queue: str,
    size: int,
    counter: Budget,
    batch: int,
    received: Budget | None = None,
    backlog: int = 0,
) -> None:
    """Publishes transactions of `batch` until `counter` is done; with `received`, holds back
    while more than `backlog` messages wait for delivery (the end-to-end flow-control credit)."""
    channel = connection.channel()
    channel.tx_select()
    while n := counter.claim(batch):
        while received is not None and counter.done - received.done > backlog:
            if counter.expired():
                return
            time.sleep(0.002)
        for _ in range(n):
            channel.basic_publish("", queue, body(size).encode(), PERSISTENT)
        channel.tx_commit()
        counter.add(n)
    channel.close()


def consume(
    connection: BlockingConnection,
    queue: str,
    counter: Budget,
    pull: Pull,
    record: Record | None = None,
) -> None:
    """Consumes (basic.qos `pull.prefetch`) until every consumer together has received
    `counter.total`, or its deadline; acks with multiple=true every ACK_EVERY deliveries and
    once more at the end. Deliveries it did not count go back to the queue when it cancels."""
    channel = connection.channel()
    channel.basic_qos(prefetch_count=pull.prefetch)
    unacked, last_tag = 0, 0
    for method, _props, payload in channel.consume(queue, inactivity_timeout=IDLE_S):
        if method is not None:
            if record is not None:
                record(time.time(), [payload])
            done = counter.add(1)
            last_tag, unacked = method.delivery_tag, unacked + 1
            if unacked >= ACK_EVERY:
                channel.basic_ack(last_tag, multiple=True)
                unacked = 0
            if done >= counter.total:
                break
        if counter.complete or counter.expired():
            break
    if unacked:
        channel.basic_ack(last_tag, multiple=True)
    channel.cancel()
    channel.close()


class Pika:
    """A server's queues as the shared drain and long queue use them (`bench.shape.Queues`)."""

    def __init__(self, server: RabbitServer) -> None:
        self.server = server

    def rss_bytes(self) -> int:
        return self.server.rss_bytes()

    async def queue(self, tag: str, max_unacked: int) -> str:
        return await asyncio.to_thread(_declare, self.server.url, tag)

    async def delete(self, name: str) -> None:
        with contextlib.suppress(Exception):
            await asyncio.to_thread(_delete, self.server.url, name)

    async def fill(self, queue: str, size: int, total: int, p: Profile) -> None:
        """Fills `queue` with `total` messages: transactions of p.fill_batch, 4 producers."""
        counter = Budget(total, p.fill_deadline_s)
        async with connected(self.server, 4) as connections:
            await threads(
                *(partial(produce, c, queue, size, counter, p.fill_batch) for c in connections)
            )
        check_filled(counter, p)

    async def drain_queue(self, queue: str, total: int, p: Profile) -> RunResult:
        counter = Budget(total, p.deadline_s)
        async with connected(self.server, p.drain_consumers) as connections:

            async def work() -> Metrics:
                start = time.perf_counter()
                await threads(
                    *(partial(consume, c, queue, counter, drain_pull(p)) for c in connections)
                )
                return throughput(counter.done, start)

            return await measured_run([self.server.pid], work, counter)


async def batch_enqueue(server: RabbitServer, size: int, p: Profile) -> RunResult:
    rabbit = Pika(server)
    queue = await rabbit.queue("batch", p.drain_prefill)
    counter = Budget(p.batch_total, p.deadline_s)
    try:
        async with connected(server, p.batch_producers) as connections:

            async def work() -> Metrics:
                start = time.perf_counter()
                await threads(
                    *(partial(produce, c, queue, size, counter, p.batch_size) for c in connections)
                )
                return throughput(counter.done, start)

            return await measured_run([server.pid], work, counter)
    finally:
        await rabbit.delete(queue)


def _confirmed_channel(connection: BlockingConnection) -> BlockingChannel:
    channel = connection.channel()
    channel.confirm_delivery()
    return channel


async def single_enqueue(server: RabbitServer, size: int, p: Profile) -> RunResult:
    rabbit = Pika(server)
    queue = await rabbit.queue("single", p.drain_prefill)
    counter = Budget(p.single_total, p.deadline_s)
    latencies: list[float] = []

    def producer(connection: BlockingConnection) -> None:
        channel = _confirmed_channel(connection)
        while counter.claim(1):
            t0 = time.perf_counter()
            channel.basic_publish("", queue, body(size).encode(), PERSISTENT)
            latencies.append(time.perf_counter() - t0)
            counter.add(1)
        channel.close()

    try:
        async with connected(server, p.single_concurrency) as connections:

            async def work() -> Metrics:
                start = time.perf_counter()
                await threads(*(partial(producer, c) for c in connections))
                return {**throughput(counter.done, start), **latency_metrics(latencies)}

            return await measured_run([server.pid], work, counter)
    finally:
        await rabbit.delete(queue)


async def end_to_end(server: RabbitServer, size: int, p: Profile) -> RunResult:
    rabbit = Pika(server)
    queue = await rabbit.queue("e2e", p.e2e_backlog + p.e2e_consumers * p.batch_size)
    produced = Budget(p.e2e_total, p.deadline_s)
    received = Budget(p.e2e_total, p.deadline_s)
    latencies: list[float] = []
    record = recorder(latencies)
    try:
        async with connected(server, p.e2e_producers + p.e2e_consumers) as connections:
            producers, consumers = connections[: p.e2e_producers], connections[p.e2e_producers :]

            async def work() -> Metrics:
                start = time.perf_counter()
                await threads(
                    *(
                        partial(
                            produce, c, queue, size, produced, p.batch_size, received, p.e2e_backlog
                        )
                        for c in producers
                    ),
                    *(partial(consume, c, queue, received, e2e_pull(p), record) for c in consumers),
                )
                return {**throughput(received.done, start), **latency_metrics(latencies)}

            return await measured_run([server.pid], work, received, produced)
    finally:
        await rabbit.delete(queue)


# Publisher threads of the paced run: enough that a confirm's fsync never holds up the pace.
PACED_PUBLISHERS = 16


async def paced(server: RabbitServer, size: int, p: Profile) -> RunResult:
    """p.paced_rate single confirmed publishes a second: a scheduler stamps each body when it
    is due and hands it to a pool of publisher threads, which all have their confirm-mode
    channel open before the first is due; one consumer (PACED_PULL)."""
    rabbit = Pika(server)
    queue = await rabbit.queue("paced", p.drain_prefill)
    total = int(p.paced_rate * p.paced_seconds)
    received = Budget(total, p.paced_seconds + p.deadline_s)
    latencies: list[float] = []
    record = recorder(latencies)
    due_bodies: queues.Queue[bytes | None] = queues.Queue()
    ready = threading.Barrier(PACED_PUBLISHERS + 1, timeout=30)
    sent_rate = 0.0

    def publisher(connection: BlockingConnection) -> None:
        try:
            channel = _confirmed_channel(connection)
        except BaseException:
            ready.abort()  # the others stop waiting for this one
            raise
        ready.wait()
        while (payload := due_bodies.get()) is not None:
            channel.basic_publish("", queue, payload, PERSISTENT)
        channel.close()

    def scheduler() -> None:
        nonlocal sent_rate
        try:
            ready.wait()
            start = time.perf_counter()
            sent = 0
            while sent < total and not received.expired():
                due = min(total, int((time.perf_counter() - start) * p.paced_rate) + 1)
                for _ in range(due - sent):
                    due_bodies.put(body(size).encode())
                sent = due
                time.sleep(1 / p.paced_rate)
            sent_rate = sent / (time.perf_counter() - start)
        finally:
            for _ in range(PACED_PUBLISHERS):
                due_bodies.put(None)

    try:
        async with connected(server, PACED_PUBLISHERS + 1) as connections:
            consumer, publishers = connections[0], connections[1:]

            async def work() -> Metrics:
                consuming = asyncio.ensure_future(
                    threads(partial(consume, consumer, queue, received, PACED_PULL, record))
                )
                await asyncio.sleep(0.5)  # the consumer is subscribed before the first publish
                await threads(scheduler, *(partial(publisher, c) for c in publishers))
                await consuming
                return {
                    "sent_msg_s": sent_rate,
                    "count": received.done,
                    **latency_metrics(latencies),
                }

            return await measured_run([server.pid], work, received)
    finally:
        await rabbit.delete(queue)


async def drain(server: RabbitServer, size: int, p: Profile) -> RunResult:
    return await shape.drain(Pika(server), size, p)


async def long_queue(server: RabbitServer, size: int, p: Profile) -> RunResult:
    return await shape.long_queue(Pika(server), size, p)


RUNNERS: dict[int, Runner[RabbitServer]] = shape.table(
    batch_enqueue, single_enqueue, drain, end_to_end, paced, long_queue
)
