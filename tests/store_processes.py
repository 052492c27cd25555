"""What each process of tests/test_store_processes.py runs: a SQLiteStore of its own on a file it
shares with the others, doing a node's writes (enqueue, dequeue, ack, nack) at the same time.

Run by `multiprocessing` (spawn): a module of plain functions, importable on its own.
"""

from __future__ import annotations

import asyncio
import multiprocessing.synchronize
import time
from typing import Any

from app.errors import StoreUnavailable
from app.models import Message
from app.store.sqlite import SQLiteStore

DEDUP_CHANNEL = "dedup"
SHARED_CHANNEL = "both"
DEDUP_IDS = 300  # dedup ids every process enqueues, each with a message id of its own
BATCHES = 60  # batches of BATCH a process enqueues into SHARED_CHANNEL and its own channel
BATCH = 10
TASKS = 8  # concurrent producers in each process


def base(k: int) -> int:
    """Process k's message ids (unique across processes, as the engine's id slots make them)."""
    return (k + 1) * 1_000_000


def message(id: int, dedup_id: str | None = None) -> Message:
    return Message(id=id, body=b"%d" % id, headers=None, enqueued_at=1, dedup_id=dedup_id)


async def _work(
    path: str,
    k: int,
    ready: multiprocessing.synchronize.Event,
    go: multiprocessing.synchronize.Event,
) -> dict[str, Any]:
    store = SQLiteStore(path)
    await store.open()
    ready.set()
    try:
        if not await asyncio.to_thread(go.wait, 30):
            raise TimeoutError("never told to go")
        started = time.monotonic()
        started_at = time.time()
        busy: list[str] = []
        slowest = 0.0
        dedup: dict[str, int] = {}
        kept: dict[str, list[int]] = {SHARED_CHANNEL: [], f"own{k}": []}  # the nacked ones

        async def timed(write: Any) -> Any:
            nonlocal slowest
            t = time.monotonic()
            try:
                return await write
            except StoreUnavailable as exc:  # "database is locked" would land here
                busy.append(exc.detail)
                raise
            finally:
                slowest = max(slowest, time.monotonic() - t)

        async def claim(task: int) -> None:
            for i in range(task, DEDUP_IDS, TASKS):
                key = f"d{i}"
                result = await timed(
                    store.insert(DEDUP_CHANNEL, [message(base(k) + i, key)], dedup_since=0)
                )
                dedup[key] = result.ids[0]

        async def traffic(task: int) -> None:
            for b in range(task, BATCHES, TASKS):
                for channel, offset in ((SHARED_CHANNEL, 100_000), (f"own{k}", 200_000)):
                    first = base(k) + offset + b * BATCH
                    ids = list(range(first, first + BATCH))
                    await timed(store.insert(channel, [message(i) for i in ids], 0))
                    await timed(store.lease(channel, [(i, 1) for i in ids], 2**40))
                    await timed(store.delete(channel, ids[: BATCH // 2]))  # acked
                    await timed(store.release(channel, ids[BATCH // 2 :], 0))  # nacked
                    kept[channel].extend(ids[BATCH // 2 :])

        # The shard lease too, taken by both at once: one wins (a compare-and-set in the file).
        lease = await store.take_lease("race", f"node-{k}", f"http://n{k}:1", 60_000)
        await asyncio.gather(*(claim(t) for t in range(TASKS)), *(traffic(t) for t in range(TASKS)))
        return {
            "dedup": dedup,
            "lease": None if lease is None else (lease.owner, lease.epoch),
            "kept": kept,
            "busy": busy,
            "slowest_s": slowest,
            "took_s": time.monotonic() - started,
            "started_at": started_at,
            "ended_at": time.time(),  # wall clock: comparable across processes
        }
    finally:
        await store.close()


def work(
    path: str,
    k: int,
    ready: multiprocessing.synchronize.Event,
    go: multiprocessing.synchronize.Event,
    out: Any,
) -> None:
    """Process k: open the store, say ready, wait for go, write, put the outcome on `out`."""

    try:
        out.put((k, asyncio.run(_work(path, k, ready, go))))
    except BaseException as exc:  # the parent must hear of any failure, not wait for it
        out.put((k, {"error": repr(exc)}))
        raise
