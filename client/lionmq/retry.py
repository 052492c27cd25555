"""When to try a request again and how long to wait first; shared by both clients."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

from lionmq.errors import ConnectionFailed, LionMQError, ServerError, error_for
from lionmq.protocol import Call, Reply

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Exponential backoff with jitter over a bounded number of attempts.

    Only connection errors and 5xx are retried: a 4xx will fail the same way again. Every
    request the client sends is safe to repeat (enqueue carries dedup ids; settling a receipt
    twice reports it stale), so no request is exempt.
    """

    attempts: int = 4
    """Tries in all, the first included; 1 disables retrying."""
    base_delay: float = 0.1
    max_delay: float = 5.0
    random: Callable[[], float] = field(default=random.random, repr=False)
    """The jitter's source: a float in [0, 1), like `random.random` (pass a seeded one to test)."""
    sleep: Callable[[float], None] = field(default=time.sleep, repr=False)
    """How `Client` waits between tries."""
    async_sleep: Callable[[float], Awaitable[None]] = field(default=asyncio.sleep, repr=False)
    """How `AsyncClient` waits between tries."""

    def __post_init__(self) -> None:
        if self.attempts < 1 or self.base_delay < 0 or self.max_delay < self.base_delay:
            raise ValueError("need attempts >= 1 and 0 <= base_delay <= max_delay")

    def backoff(self, retry: int) -> float:
        """Seconds to wait before retry number `retry` (0 for the first retry).

        "Equal jitter": half the exponential step is fixed, half random, so clients that failed
        together spread out, yet none retries at once."""
        step = min(self.max_delay, self.base_delay * 2.0**retry)
        return step / 2 + self.random() * step / 2

    def begin(self) -> Attempts:
        return Attempts(self)


@dataclass(frozen=True, slots=True)
class Wait:
    """Try again after `seconds`."""

    seconds: float


class Attempts:
    """The retry state of one call. Each method returns the call's result, or how long to
    `Wait` before the next try, or raises the error for the caller when no try is left or
    retrying cannot help."""

    __slots__ = ("_policy", "_tries")

    def __init__(self, policy: RetryPolicy) -> None:
        self._policy = policy
        self._tries = 1

    def outcome(self, call: Call[T], reply: Reply) -> T | Wait:
        if reply.status in call.ok:
            return call.result(reply)
        error = error_for(reply.status, reply.content, reply.reason)
        return self._next(error, reply.headers.get("retry-after"))

    def failed(self, error: ConnectionFailed) -> Wait:
        return self._next(error, None)

    def _next(self, error: LionMQError, retry_after: str | None) -> Wait:
        retryable = isinstance(error, ConnectionFailed | ServerError)
        if not retryable or self._tries >= self._policy.attempts:
            raise error
        delay = self._policy.backoff(self._tries - 1)
        self._tries += 1
        if retry_after is not None and retry_after.isdigit():
            # The node knows best when it will be back, but never wait past the policy's bound.
            delay = min(max(delay, float(retry_after)), self._policy.max_delay)
        return Wait(delay)
