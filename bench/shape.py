"""Each scenario's shape, written once for every broker.

`Queues` is what the drain and the long queue need of a broker (every adapter provides it:
LionMQ, pika, aio-pika, nats-py). `AsyncBroker` is what an asyncio client provides (queues,
publishers and consumers opened before a run's clock starts); the six scenario bodies are
written once over it (`SCENARIOS`) and run by aio-pika and nats-py alike. LionMQ's own
bodies (HTTP dequeue, acks sent without waiting) and pika's threads keep theirs, sharing the
result building, the drain, the long queue and the table.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

from bench.config import Profile
from bench.ports import ServerProcess
from bench.stats import (
    Budget,
    Metrics,
    PeakRss,
    Record,
    Results,
    RunMatrix,
    RunResult,
    body,
    latency_metrics,
    long_queue_result,
    measured,
    recorder,
)

T = TypeVar("T")
S = TypeVar("S")


def table(batch: T, single: T, drain: T, end_to_end: T, paced: T, long: T) -> dict[int, T]:
    """The six scenarios by their number (`bench.config.SCENARIOS`)."""
    return {1: batch, 2: single, 3: drain, 4: end_to_end, 5: paced, 6: long}


def queue_name(tag: str) -> str:
    """A run's own queue (channel, stream): `bench-<tag>-<8 hex>`."""
    return f"bench-{tag}-{uuid.uuid4().hex[:8]}"


def throughput(done: int, start: float) -> Metrics:
    """Messages a second since `start` (a perf_counter reading), and the count."""
    return {"msg_s": done / (time.perf_counter() - start), "count": done}


async def measured_run(
    pids: list[int], work: Callable[[], Awaitable[Metrics]], *budgets: Budget
) -> RunResult:
    """`work()` measured within the first budget's deadline; partial if any budget was cut
    short."""
    metrics = await measured(pids, work, budgets[0])
    return RunResult(metrics, partial=any(b.cut_short for b in budgets))


def check_filled(counter: Budget, p: Profile) -> None:
    if counter.timed_out:
        raise TimeoutError(f"filled only {counter.done} of {counter.total} in {p.fill_deadline_s}s")


class Queues(Protocol):
    """What the drain and the long queue need of a broker."""

    def rss_bytes(self) -> int: ...

    async def queue(self, tag: str, max_unacked: int) -> str:
        """A new durable queue; `max_unacked` bounds its deliveries awaiting an ack where the
        broker needs one (JetStream's max_ack_pending)."""
        ...

    async def delete(self, name: str) -> None:
        """Deletes a run's queue so that later runs start from the same broker; best effort."""
        ...

    async def fill(self, queue: str, size: int, total: int, p: Profile) -> None: ...

    async def drain_queue(self, queue: str, total: int, p: Profile) -> RunResult: ...


async def drain(q: Queues, size: int, p: Profile) -> RunResult:
    queue = await q.queue("drain", p.drain_prefill)
    try:
        await q.fill(queue, size, p.drain_prefill, p)
        return await q.drain_queue(queue, p.drain_prefill, p)
    finally:
        await q.delete(queue)


async def long_queue(q: Queues, size: int, p: Profile) -> RunResult:
    """Drain rate over p.long_drain messages from a queue holding just those, then from one
    holding p.long_depth; the server's RSS once the deep queue is full (and its peak)."""
    shallow = await q.queue("shallow", p.long_drain)
    deep = await q.queue("deep", p.long_drain)
    try:
        async with PeakRss(q.rss_bytes) as memory:
            await q.fill(shallow, size, p.long_drain, p)
            empty = await q.drain_queue(shallow, p.long_drain, p)
            await q.delete(shallow)
            t0 = time.perf_counter()
            await q.fill(deep, size, p.long_depth, p)
            fill_s = time.perf_counter() - t0
            await asyncio.sleep(p.settle_s)
            rss_full = q.rss_bytes()
            at_depth = await q.drain_queue(deep, p.long_drain, p)
    finally:
        await q.delete(shallow)
        await q.delete(deep)
    return long_queue_result(
        depth=p.long_depth,  # a fill that falls short raises
        fill_s=fill_s,
        rss_full=rss_full,
        memory=memory,
        empty=empty,
        at_depth=at_depth,
    )


@dataclass(frozen=True)
class Pull:
    """How one scenario's consumers take deliveries: AMQP's basic.qos `prefetch`, or a fetch
    of up to `batch` waiting up to `wait_s` for the first; with `confirm`, a batch's acks are
    confirmed before the next fetch (the drain, as LionMQ's drain waits for its ack)."""

    prefetch: int
    batch: int
    wait_s: float
    confirm: bool


# A drain's fetch: the queue is full, so only the last fetches wait (as LionMQ's drain
# dequeues without waiting, its consumers end as soon as the channel is empty).
DRAIN_WAIT_S = 0.05


def drain_pull(p: Profile) -> Pull:
    return Pull(prefetch=2 * p.drain_batch, batch=p.drain_batch, wait_s=DRAIN_WAIT_S, confirm=True)


def e2e_pull(p: Profile) -> Pull:
    return Pull(prefetch=5 * p.batch_size, batch=p.batch_size, wait_s=0.2, confirm=False)


PACED_PULL = Pull(prefetch=100, batch=100, wait_s=1.0, confirm=False)
"""One long-polling consumer: up to 100, waiting up to 1 s."""


class Publisher(Protocol):
    async def publish_batch(self, queue: str, size: int, n: int) -> None:
        """n publishes, then wait until the broker has confirmed them all (stored)."""
        ...

    async def publish(self, queue: str, data: bytes) -> None:
        """One publish, returning once confirmed."""
        ...


class Consumer(Protocol):
    async def consume(self, counter: Budget, pull: Pull, record: Record | None = None) -> None:
        """Takes and acks deliveries until every consumer together has received
        `counter.total`, or its deadline; `record` sees each delivery's bodies."""
        ...


class Closable(Protocol):
    async def close(self) -> None: ...


C = TypeVar("C", bound=Closable)


class AsyncBroker(ABC, Generic[C]):
    """An asyncio client's connections (`C`) to one server, for one scenario run; `close()`
    closes every one."""

    hold_back_s: float
    """How often an end-to-end producer held back by its credit looks again."""
    subscribe_s: float
    """The paced run's pause between starting its consumer and the first publish."""

    def __init__(self, server: ServerProcess) -> None:
        self.server = server
        self.connections: list[C] = []

    @property
    def pid(self) -> int:
        return self.server.pid

    def rss_bytes(self) -> int:
        return self.server.rss_bytes()

    async def close(self) -> None:
        for connection in self.connections:
            with contextlib.suppress(Exception):
                await connection.close()
        self.connections.clear()

    @abstractmethod
    async def queue(self, tag: str, max_unacked: int) -> str: ...

    @abstractmethod
    async def delete(self, name: str) -> None: ...

    @abstractmethod
    async def publishers(self, n: int) -> list[Publisher]:
        """n publishers, each on a connection of its own."""

    @abstractmethod
    async def single_publishers(self, n: int) -> list[Publisher]:
        """The single-enqueue run's n concurrent publishers."""

    @abstractmethod
    async def consumers(self, queue: str, n: int) -> list[Consumer]:
        """n consumers of `queue`, each on a connection of its own."""

    async def produce(
        self,
        publisher: Publisher,
        queue: str,
        size: int,
        counter: Budget,
        batch: int,
        received: Budget | None = None,
        backlog: int = 0,
    ) -> None:
        """Publish batches until `counter` is done; with `received`, hold back while more than
        `backlog` messages wait for delivery (the end-to-end flow-control credit)."""
        while n := counter.claim(batch):
            while received is not None and counter.done - received.done > backlog:
                if counter.expired():
                    return
                await asyncio.sleep(self.hold_back_s)
            await publisher.publish_batch(queue, size, n)
            counter.add(n)

    async def fill(self, queue: str, size: int, total: int, p: Profile) -> None:
        """Fills `queue` with `total` messages (batches of p.fill_batch, 4 producers)."""
        counter = Budget(total, p.fill_deadline_s)
        publishers = await self.publishers(4)
        await asyncio.gather(
            *(self.produce(pub, queue, size, counter, p.fill_batch) for pub in publishers)
        )
        check_filled(counter, p)

    async def drain_queue(self, queue: str, total: int, p: Profile) -> RunResult:
        counter = Budget(total, p.deadline_s)
        consumers = await self.consumers(queue, p.drain_consumers)

        async def work() -> Metrics:
            start = time.perf_counter()
            await asyncio.gather(*(c.consume(counter, drain_pull(p)) for c in consumers))
            return throughput(counter.done, start)

        return await measured_run([self.pid], work, counter)


async def batch_enqueue(b: AsyncBroker[Any], size: int, p: Profile) -> RunResult:
    queue = await b.queue("batch", p.drain_prefill)
    counter = Budget(p.batch_total, p.deadline_s)
    publishers = await b.publishers(p.batch_producers)

    async def work() -> Metrics:
        start = time.perf_counter()
        await asyncio.gather(
            *(b.produce(pub, queue, size, counter, p.batch_size) for pub in publishers)
        )
        return throughput(counter.done, start)

    try:
        return await measured_run([b.pid], work, counter)
    finally:
        await b.delete(queue)


async def single_enqueue(b: AsyncBroker[Any], size: int, p: Profile) -> RunResult:
    queue = await b.queue("single", p.drain_prefill)
    counter = Budget(p.single_total, p.deadline_s)
    latencies: list[float] = []
    publishers = await b.single_publishers(p.single_concurrency)

    async def producer(publisher: Publisher) -> None:
        while counter.claim(1):
            t0 = time.perf_counter()
            await publisher.publish(queue, body(size).encode())
            latencies.append(time.perf_counter() - t0)
            counter.add(1)

    async def work() -> Metrics:
        start = time.perf_counter()
        await asyncio.gather(*(producer(pub) for pub in publishers))
        return {**throughput(counter.done, start), **latency_metrics(latencies)}

    try:
        return await measured_run([b.pid], work, counter)
    finally:
        await b.delete(queue)


async def end_to_end(b: AsyncBroker[Any], size: int, p: Profile) -> RunResult:
    queue = await b.queue("e2e", p.e2e_backlog + p.e2e_consumers * p.batch_size)
    produced = Budget(p.e2e_total, p.deadline_s)
    received = Budget(p.e2e_total, p.deadline_s)
    latencies: list[float] = []
    record = recorder(latencies)
    publishers = await b.publishers(p.e2e_producers)
    consumers = await b.consumers(queue, p.e2e_consumers)

    async def work() -> Metrics:
        start = time.perf_counter()
        await asyncio.gather(
            *(
                b.produce(pub, queue, size, produced, p.batch_size, received, p.e2e_backlog)
                for pub in publishers
            ),
            *(c.consume(received, e2e_pull(p), record) for c in consumers),
        )
        return {**throughput(received.done, start), **latency_metrics(latencies)}

    try:
        return await measured_run([b.pid], work, received, produced)
    finally:
        await b.delete(queue)


async def paced(b: AsyncBroker[Any], size: int, p: Profile) -> RunResult:
    """p.paced_rate single publishes a second, each sent on schedule in its own task and
    counted once confirmed; one consumer long-polls (PACED_PULL)."""
    queue = await b.queue("paced", p.drain_prefill)
    total = int(p.paced_rate * p.paced_seconds)
    received = Budget(total, p.paced_seconds + p.deadline_s)
    latencies: list[float] = []
    (publisher,) = await b.publishers(1)
    (consumer,) = await b.consumers(queue, 1)
    pending: set[asyncio.Future[Any]] = set()

    async def producer() -> float:
        start = time.perf_counter()
        sent = 0
        while sent < total and not received.expired():
            due = min(total, int((time.perf_counter() - start) * p.paced_rate) + 1)
            for _ in range(due - sent):
                task = asyncio.ensure_future(publisher.publish(queue, body(size).encode()))
                pending.add(task)
                task.add_done_callback(pending.discard)
            sent = due
            await asyncio.sleep(1 / p.paced_rate)
        return sent / (time.perf_counter() - start)

    async def work() -> Metrics:
        consuming = asyncio.ensure_future(
            consumer.consume(received, PACED_PULL, recorder(latencies))
        )
        await asyncio.sleep(b.subscribe_s)  # the consumer waits before the first publish
        sent_rate = await producer()
        await consuming
        if pending:
            await asyncio.gather(*pending)
        return {"sent_msg_s": sent_rate, "count": received.done, **latency_metrics(latencies)}

    try:
        return await measured_run([b.pid], work, received)
    finally:
        await b.delete(queue)


Scenario = Callable[[AsyncBroker[Any], int, Profile], Awaitable[RunResult]]
SCENARIOS: dict[int, Scenario] = table(
    batch_enqueue, single_enqueue, drain, end_to_end, paced, long_queue
)

Runner = Callable[[S, int, Profile], Awaitable[RunResult]]


def runners(connect: Callable[[S], AsyncBroker[Any]]) -> dict[int, Runner[S]]:
    """Each scenario run with connections of its own to a server, closed when it ends."""

    def with_connections(scenario: Scenario) -> Runner[S]:
        async def run(server: S, size: int, p: Profile) -> RunResult:
            broker = connect(server)
            try:
                return await scenario(broker, size, p)
            finally:
                await broker.close()

        return run

    return {n: with_connections(scenario) for n, scenario in SCENARIOS.items()}


async def run_clients(
    peer: str,
    server: S,
    clients: dict[str, dict[int, Runner[S]]],
    args: argparse.Namespace,
    profile: Profile,
    results: Results,
    run_matrix: RunMatrix,
) -> None:
    """Runs the matrix against `server` with each client in turn; results go to
    `results["<peer>/<client>"]`."""
    for client, scenarios in clients.items():

        async def run_one(
            number: int, size: int, scenarios: dict[int, Runner[S]] = scenarios
        ) -> RunResult:
            return await scenarios[number](server, size, profile)

        name = f"{peer}/{client}"
        await run_matrix(name, run_one, args, results.setdefault(name, {}))
