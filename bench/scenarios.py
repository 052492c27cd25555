"""The scenarios against a LionMQ node, driven through the bundled `lionmq.AsyncClient`.

Each run uses its own channel and deletes it afterwards. Workers stop at a count or at the
run's deadline, whichever comes first; a run cut short by its deadline is marked partial.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable

from lionmq import AsyncClient

from bench import shape
from bench.config import Profile
from bench.node import Node
from bench.shape import check_filled, queue_name, throughput
from bench.stats import Budget, Metrics, RunResult, body, latency_metrics, measured, sent_at


async def _measured(
    node: Node, work: Callable[[], Awaitable[Metrics]], budget: Budget
) -> RunResult:
    try:
        metrics = await measured([node.pid], work, budget)
    except TimeoutError:
        return RunResult({}, partial=True, note="hung past the deadline")
    return RunResult(metrics, partial=budget.timed_out)


async def fill(client: AsyncClient, channel: str, size: int, total: int, p: Profile) -> None:
    """Fills `channel` with `total` messages (batches of p.fill_batch, 4 producers)."""
    budget = Budget(total, p.fill_deadline_s)

    async def producer() -> None:
        while n := budget.claim(p.fill_batch):
            await client.enqueue_many(channel, [body(size) for _ in range(n)])
            budget.add(n)

    await asyncio.gather(*(producer() for _ in range(4)))
    check_filled(budget, p)


async def batch_enqueue(client: AsyncClient, node: Node, size: int, p: Profile) -> RunResult:
    channel = await lion_channel(client, "batch", p)
    budget = Budget(p.batch_total, p.deadline_s)

    async def producer() -> None:
        while n := budget.claim(p.batch_size):
            await client.enqueue_many(channel, [body(size) for _ in range(n)])
            budget.add(n)

    async def work() -> Metrics:
        start = time.perf_counter()
        await asyncio.gather(*(producer() for _ in range(p.batch_producers)))
        return throughput(budget.done, start)

    try:
        return await _measured(node, work, budget)
    finally:
        await _drop(client, channel)


async def single_enqueue(client: AsyncClient, node: Node, size: int, p: Profile) -> RunResult:
    channel = await lion_channel(client, "single", p)
    budget = Budget(p.single_total, p.deadline_s)
    latencies: list[float] = []

    async def producer() -> None:
        while budget.claim(1):
            t0 = time.perf_counter()
            await client.enqueue(channel, body(size))
            latencies.append(time.perf_counter() - t0)
            budget.add(1)

    async def work() -> Metrics:
        start = time.perf_counter()
        await asyncio.gather(*(producer() for _ in range(p.single_concurrency)))
        return {**throughput(budget.done, start), **latency_metrics(latencies)}

    try:
        return await _measured(node, work, budget)
    finally:
        await _drop(client, channel)


async def drain_channel(
    client: AsyncClient, node: Node, channel: str, total: int, p: Profile
) -> RunResult:
    """Dequeue p.drain_batch + ack them, p.drain_consumers at once, until `total` are acked."""
    budget = Budget(total, p.deadline_s)

    async def consumer() -> None:
        while budget.done < budget.total:
            if budget.left_s <= 0:
                budget.timed_out = True
                return
            messages = await client.dequeue(channel, p.drain_batch)
            if not messages:
                return
            await client.ack(channel, [m.receipt for m in messages])
            budget.add(len(messages))

    async def work() -> Metrics:
        start = time.perf_counter()
        await asyncio.gather(*(consumer() for _ in range(p.drain_consumers)))
        return throughput(budget.done, start)

    return await _measured(node, work, budget)


async def end_to_end(client: AsyncClient, node: Node, size: int, p: Profile) -> RunResult:
    """Producers and consumers at once, as a pipeline runs: producers hold back while more than
    `e2e_backlog` messages wait (the credit a broker's flow control gives), so the latency is
    the pipeline's, not the age of a backlog growing without bound. Consumers dequeue 100 and
    send the ack without waiting for it before their next dequeue."""
    channel = await lion_channel(client, "e2e", p)
    produced = Budget(p.e2e_total, p.deadline_s)
    latencies: list[float] = []
    received = 0
    room = asyncio.Event()
    room.set()
    acks: set[asyncio.Task[object]] = set()

    async def producer() -> None:
        while n := produced.claim(p.batch_size):
            while produced.done - received > p.e2e_backlog and produced.left_s > 0:
                room.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(room.wait(), timeout=0.05)
            await client.enqueue_many(channel, [body(size) for _ in range(n)])
            produced.add(n)

    async def consumer() -> None:
        nonlocal received
        while received < p.e2e_total and produced.left_s > 0:
            messages = await client.dequeue(channel, p.batch_size, wait_ms=200)
            now = time.time()
            latencies.extend(now - sent_at(m.body) for m in messages)
            received += len(messages)
            room.set()
            if messages:
                task = asyncio.ensure_future(client.ack(channel, [m.receipt for m in messages]))
                acks.add(task)
                task.add_done_callback(acks.discard)
        if received < p.e2e_total:
            produced.timed_out = True

    async def work() -> Metrics:
        start = time.perf_counter()
        await asyncio.gather(
            *(producer() for _ in range(p.e2e_producers)),
            *(consumer() for _ in range(p.e2e_consumers)),
        )
        metrics = throughput(received, start)  # delivered; the acks may still be on their way
        if acks:
            await asyncio.gather(*acks)
        return {**metrics, **latency_metrics(latencies)}

    try:
        return await _measured(node, work, produced)
    finally:
        await _drop(client, channel)


async def paced(client: AsyncClient, node: Node, size: int, p: Profile) -> RunResult:
    """p.paced_rate single enqueues a second for p.paced_seconds, each sent on schedule in its
    own task; one consumer long-polls (max 100, wait 1 s) and acks in the background."""
    channel = await lion_channel(client, "paced", p)
    total = int(p.paced_rate * p.paced_seconds)
    budget = Budget(total, p.paced_seconds + p.deadline_s)
    latencies: list[float] = []
    received = 0
    in_flight: set[asyncio.Task[object]] = set()

    def spawn(coro: Awaitable[object]) -> None:
        task: asyncio.Task[object] = asyncio.ensure_future(coro)
        in_flight.add(task)
        task.add_done_callback(in_flight.discard)

    async def producer() -> None:
        start = time.perf_counter()
        sent = 0
        while sent < total and budget.left_s > 0:
            due = min(total, int((time.perf_counter() - start) * p.paced_rate) + 1)
            for _ in range(due - sent):
                spawn(client.enqueue(channel, body(size)))
            sent = due
            await asyncio.sleep(1 / p.paced_rate)
        budget.done = sent

    async def consumer() -> None:
        nonlocal received
        while received < total and budget.left_s > 0:
            messages = await client.dequeue(channel, 100, wait_ms=1000)
            now = time.time()
            latencies.extend(now - sent_at(m.body) for m in messages)
            received += len(messages)
            if messages:
                spawn(client.ack(channel, [m.receipt for m in messages]))
        if received < total:
            budget.timed_out = True

    async def work() -> Metrics:
        consuming = asyncio.ensure_future(consumer())
        await asyncio.sleep(0.2)  # the consumer is parked in its long poll before the first send
        start = time.perf_counter()
        await producer()
        sent_rate = budget.done / (time.perf_counter() - start)
        await consuming
        if in_flight:
            await asyncio.gather(*in_flight)
        return {"sent_msg_s": sent_rate, "count": received, **latency_metrics(latencies)}

    try:
        return await _measured(node, work, budget)
    finally:
        await _drop(client, channel)


async def _drop(client: AsyncClient, channel: str) -> None:
    """Deletes a run's channel so that later runs start from the same store; best effort."""
    with contextlib.suppress(Exception):
        await client.delete_channel(channel)


async def lion_channel(client: AsyncClient, tag: str, p: Profile) -> str:
    """A fresh channel's name; with `--trace` the channel is made first, with history on."""
    name = queue_name(tag)
    if p.trace:
        await client.put_channel(name, trace=True)
    return name


class Lion:
    """A node's channels as the shared drain and long queue use them (`bench.shape.Queues`)."""

    def __init__(self, client: AsyncClient, node: Node, p: Profile) -> None:
        self.client = client
        self.node = node
        self.p = p

    def rss_bytes(self) -> int:
        return self.node.rss_bytes()

    async def queue(self, tag: str, max_unacked: int) -> str:
        return await lion_channel(self.client, tag, self.p)

    async def delete(self, name: str) -> None:
        await _drop(self.client, name)

    async def fill(self, queue: str, size: int, total: int, p: Profile) -> None:
        await fill(self.client, queue, size, total, p)

    async def drain_queue(self, queue: str, total: int, p: Profile) -> RunResult:
        return await drain_channel(self.client, self.node, queue, total, p)


async def drain(client: AsyncClient, node: Node, size: int, p: Profile) -> RunResult:
    return await shape.drain(Lion(client, node, p), size, p)


async def long_queue(client: AsyncClient, node: Node, size: int, p: Profile) -> RunResult:
    return await shape.long_queue(Lion(client, node, p), size, p)


RUNNERS: dict[int, Callable[[AsyncClient, Node, int, Profile], Awaitable[RunResult]]] = shape.table(
    batch_enqueue, single_enqueue, drain, end_to_end, paced, long_queue
)
