"""Many producers and consumers on one channel at once: every message acked exactly once."""

from __future__ import annotations

import asyncio
import time

from lionmq import AsyncClient

from tests.conftest import NodeProcess

PRODUCERS = 8
BATCHES = 25
BATCH = 40
CONSUMERS = 8
TOTAL = PRODUCERS * BATCHES * BATCH


async def test_many_producers_and_consumers(node: NodeProcess) -> None:
    enqueued: list[str] = []
    acked: list[str] = []
    deliveries = 0
    produced = asyncio.Event()
    deadline = time.monotonic() + 60

    async with AsyncClient(node.url) as client:

        async def produce(p: int) -> None:
            for b in range(BATCHES):
                ids = await client.enqueue_many("hot", [f"{p}-{b}-{i}" for i in range(BATCH)])
                enqueued.extend(ids)

        async def consume() -> None:
            nonlocal deliveries
            while time.monotonic() < deadline and not (produced.is_set() and len(acked) >= TOTAL):
                batch = await client.dequeue("hot", 25, wait_ms=200)
                deliveries += len(batch)
                if batch:
                    result = await client.ack("hot", [m.receipt for m in batch])
                    assert result.acked == len(batch) and not result.stale
                    acked.extend(m.id for m in batch)

        consumers = [asyncio.create_task(consume()) for _ in range(CONSUMERS)]
        await asyncio.gather(*(produce(p) for p in range(PRODUCERS)))
        produced.set()
        await asyncio.wait_for(asyncio.gather(*consumers), timeout=70)
        info = await client.get_channel("hot")

    assert len(enqueued) == len(set(enqueued)) == TOTAL
    assert sorted(acked) == sorted(enqueued), "a message was lost or acked twice"
    assert deliveries == TOTAL  # nothing was delivered twice either
    assert (info.counts.ready, info.counts.in_flight, info.totals.acked) == (0, 0, TOTAL)
