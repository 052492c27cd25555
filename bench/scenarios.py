"""The scenarios against a LionMQ node, driven through the bundled `lionmq.AsyncClient`.

Each run uses its own channel and deletes it afterwards. Workers stop at a count or at the
run's deadline, whichever comes first; a run cut short by its deadline is marked partial.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Awaitable, Callable

from lionmq import AsyncClient

from bench.config import Profile
from bench.node import Node
from bench.stats import (
    Budget,
    Metrics,
    PeakRss,
    RunResult,
    body,
    latency_metrics,
    long_queue_result,
    measured,
    sent_at,
)


def channel_name(tag: str) -> str:
    return f"bench-{tag}-{uuid.uuid4().hex[:8]}"


async def _measured(
    node: Node, work: Callable[[], Awaitable[Metrics]], budget: Budget
) -> RunResult:
    try:
        metrics = await measured([node.pid], work, budget)
    except TimeoutError:
        return RunResult({}, partial=True, note="hung past the deadline")
    return RunResult(metrics, partial=budget.timed_out)


async def fill(client: AsyncClient, channel: str, size: int, total: int, p: Profile) -> int:
    """Fills `channel` with `total` messages (batches of p.fill_batch, 4 producers)."""
    budget = Budget(total, p.fill_deadline_s)

    async def producer() -> None:
        while n := budget.claim(p.fill_batch):
            await client.enqueue_many(channel, [body(size) for _ in range(n)])
            budget.add(n)

    await asyncio.gather(*(producer() for _ in range(4)))
    if budget.timed_out:
        raise TimeoutError(f"filled only {budget.done} of {total} in {p.fill_deadline_s}s")
    return budget.done


async def batch_enqueue(client: AsyncClient, node: Node, size: int, p: Profile) -> RunResult:
    channel = channel_name("batch")
    budget = Budget(p.batch_total, p.deadline_s)

    async def producer() -> None:
        while n := budget.claim(p.batch_size):
            await client.enqueue_many(channel, [body(size) for _ in range(n)])
            budget.add(n)

    async def work() -> Metrics:
        start = time.perf_counter()
        await asyncio.gather(*(producer() for _ in range(p.batch_producers)))
        return {"msg_s": budget.done / (time.perf_counter() - start), "count": budget.done}

    try:
        return await _measured(node, work, budget)
    finally:
        await _drop(client, channel)


async def single_enqueue(client: AsyncClient, node: Node, size: int, p: Profile) -> RunResult:
    channel = channel_name("single")
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
        rate = budget.done / (time.perf_counter() - start)
        return {"msg_s": rate, "count": budget.done, **latency_metrics(latencies)}

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
        return {"msg_s": budget.done / (time.perf_counter() - start), "count": budget.done}

    return await _measured(node, work, budget)


async def drain(client: AsyncClient, node: Node, size: int, p: Profile) -> RunResult:
    channel = channel_name("drain")
    try:
        await fill(client, channel, size, p.drain_prefill, p)
        return await drain_channel(client, node, channel, p.drain_prefill, p)
    finally:
        await _drop(client, channel)


async def end_to_end(client: AsyncClient, node: Node, size: int, p: Profile) -> RunResult:
    """Producers and consumers at once, as a pipeline runs: producers hold back while more than
    `e2e_backlog` messages wait (the credit a broker's flow control gives), so the latency is
    the pipeline's, not the age of a backlog growing without bound. Consumers dequeue 100 and
    send the ack without waiting for it before their next dequeue."""
    channel = channel_name("e2e")
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
        rate = received / (time.perf_counter() - start)
        if acks:
            await asyncio.gather(*acks)
        return {"msg_s": rate, "count": received, **latency_metrics(latencies)}

    try:
        return await _measured(node, work, produced)
    finally:
        await _drop(client, channel)


async def paced(client: AsyncClient, node: Node, size: int, p: Profile) -> RunResult:
    """p.paced_rate single enqueues a second for p.paced_seconds, each sent on schedule in its
    own task; one consumer long-polls (max 100, wait 1 s) and acks in the background."""
    channel = channel_name("paced")
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


async def long_queue(client: AsyncClient, node: Node, size: int, p: Profile) -> RunResult:
    """Drain rate over p.long_drain messages from a channel holding just those, then from one
    holding p.long_depth; the node's RSS once the deep channel is full (and its peak)."""
    shallow, deep = channel_name("shallow"), channel_name("deep")
    try:
        async with PeakRss(node.rss_bytes) as memory:
            await fill(client, shallow, size, p.long_drain, p)
            empty = await drain_channel(client, node, shallow, p.long_drain, p)
            await _drop(client, shallow)
            t0 = time.perf_counter()
            filled = await fill(client, deep, size, p.long_depth, p)
            fill_s = time.perf_counter() - t0
            await asyncio.sleep(p.settle_s)
            rss_full = node.rss_bytes()
            at_depth = await drain_channel(client, node, deep, p.long_drain, p)
    finally:
        await _drop(client, shallow)
        await _drop(client, deep)
    return long_queue_result(
        depth=filled,
        fill_s=fill_s,
        rss_full=rss_full,
        memory=memory,
        empty=empty,
        at_depth=at_depth,
    )


async def _drop(client: AsyncClient, channel: str) -> None:
    """Deletes a run's channel so that later runs start from the same store; best effort."""
    with contextlib.suppress(Exception):
        await client.delete_channel(channel)


RUNNERS: dict[int, Callable[[AsyncClient, Node, int, Profile], Awaitable[RunResult]]] = {
    1: batch_enqueue,
    2: single_enqueue,
    3: drain,
    4: end_to_end,
    5: paced,
    6: long_queue,
}
