"""The background loop that drives `QueueEngine.tick`: lease expiry, delays, TTLs, dedup pruning.

It sleeps until the engine's next timer (or until a new, earlier one appears), so an expired lease
or a delayed message falling due wakes waiting consumers at once rather than at the next poll.

The loop is supervised: a failing pass (any exception, not only the store's) is logged and
retried with backoff, and `problem()` says why the node is not ready while the loop is down or
failing, or while some channel's maintenance fails; `/ready` answers 503 with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from app.clock import Clock
from app.engine.queue import QueueEngine
from app.errors import LionMQError

log = logging.getLogger("lionmq.maintenance")

# Channels /ready names when many fail at once.
_NAMED = 5


class Maintenance:
    def __init__(self, engine: QueueEngine, clock: Clock, max_sleep_ms: int = 1000) -> None:
        self._engine = engine
        self._clock = clock
        self._max_sleep_ms = max_sleep_ms
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self.failures = 0  # passes failed in a row
        self._failure: str | None = None  # why the last pass failed

    async def start(self) -> None:
        self._stopping = False
        self._task = asyncio.create_task(self._run(), name="lionmq-maintenance")
        self._task.add_done_callback(self._ended)

    def _ended(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            log.error("the maintenance loop died; the node reports unready", exc_info=exc)
        elif not self._stopping:
            log.error("the maintenance loop ended on its own; the node reports unready")

    async def stop(self) -> None:
        """Cancel the loop and wait for it. Never raises: how it ended was logged already."""
        if self._task is not None:
            # The flag as well as the cancel: on 3.11 wait_for can swallow a cancellation that
            # lands just as its inner wait completes.
            self._stopping = True
            self._task.cancel()
            await asyncio.wait({self._task})
            self._task = None

    def problem(self) -> str | None:
        """Why the node should not be called ready (None: the loop runs and keeps up)."""
        if self._task is None or self._task.done():
            return (
                "the maintenance loop is not running: leases do not expire and delayed messages"
                " are not released; the log says why"
            )
        if self._failure is not None:
            return f"maintenance has failed {self.failures} pass(es) in a row: {self._failure}"
        failing = self._engine.failing()
        if failing:
            names = ", ".join(sorted(failing)[:_NAMED])
            more = f" and {len(failing) - _NAMED} more" if len(failing) > _NAMED else ""
            first = failing[min(failing)]
            return f"maintenance fails for {names}{more}: {first}"
        return None

    async def tick(self, now: int) -> int | None:
        """One pass; a failure is logged and retried with backoff, never fatal."""
        try:
            next_due: int | None = await self._engine.tick(now)
        except Exception as exc:
            self.failures += 1
            backoff = min(self._max_sleep_ms, 50 << min(self.failures, 10))
            if isinstance(exc, LionMQError):
                self._failure = exc.detail
                log.warning("maintenance pass failed (%s); retrying in %d ms", exc.detail, backoff)
            else:
                self._failure = f"unexpected {type(exc).__name__}: {exc}"
                # The traceback once per run of failures; a line per retry after that.
                log.log(
                    logging.ERROR if self.failures == 1 else logging.WARNING,
                    "maintenance pass failed unexpectedly (%d in a row); retrying in %d ms",
                    self.failures,
                    backoff,
                    exc_info=exc if self.failures == 1 else None,
                )
            return now + backoff
        if self.failures:
            log.info("maintenance works again after %d failed pass(es)", self.failures)
        self.failures = 0
        self._failure = None
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
