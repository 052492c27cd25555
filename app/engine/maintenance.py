"""The background loop that drives `QueueEngine.tick`: lease expiry, delays, TTLs, dedup pruning.

It sleeps until the engine's next timer (or until a new, earlier one appears), so an expired lease
or a delayed message falling due wakes waiting consumers at once rather than at the next poll.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from app.clock import Clock
from app.engine.queue import QueueEngine
from app.errors import StoreError

log = logging.getLogger("lionmq.maintenance")


class Maintenance:
    def __init__(self, engine: QueueEngine, clock: Clock, max_sleep_ms: int = 1000) -> None:
        self._engine = engine
        self._clock = clock
        self._max_sleep_ms = max_sleep_ms
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self.failures = 0

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="lionmq-maintenance")

    async def stop(self) -> None:
        if self._task is not None:
            # The flag as well as the cancel: on 3.11 wait_for can swallow a cancellation that
            # lands just as its inner wait completes.
            self._stopping = True
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def tick(self, now: int) -> int | None:
        """One pass; a store failure is logged and retried with backoff, never fatal."""
        try:
            next_due: int | None = await self._engine.tick(now)
        except StoreError as exc:
            self.failures += 1
            backoff = min(self._max_sleep_ms, 50 << min(self.failures, 10))
            log.warning("maintenance pass failed (%s); retrying in %d ms", exc.detail, backoff)
            return now + backoff
        self.failures = 0
        return next_due

    async def _run(self) -> None:
        while not self._stopping:
            next_due = await self.tick(self._clock.now_ms())
            sleep_ms = self._max_sleep_ms
            if next_due is not None:
                sleep_ms = max(0, min(sleep_ms, next_due - self._clock.now_ms()))
            if sleep_ms:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._engine.timers_changed.wait(), sleep_ms / 1000)
