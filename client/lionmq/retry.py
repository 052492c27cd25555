"""When to try a request again and how long to wait first; shared by both clients."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

from lionmq.errors import (
    ConnectionFailed,
    LionMQError,
    ServerError,
    ServiceUnavailable,
    error_for,
)
from lionmq.protocol import Call, Reply, Wait

T = TypeVar("T")

FAILOVER_POLL_S = 0.5
"""Past `attempts`, a request to a cluster is retried at least this often, so it goes on within
about this long after a shard's new owner starts serving."""


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Exponential backoff with jitter over a bounded number of attempts.

    Only connection errors and 5xx are retried: a 4xx will fail the same way again. Every
    request the client sends is safe to repeat (enqueue carries dedup ids; settling a receipt
    twice reports it stale; a redrive moves what is left) but a shard hand-off, which is sent
    once (`Call.retry`).
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
    failover_timeout: float = 10.0
    """Seconds a request to a cluster (several seeds, or a topology naming several nodes) keeps
    being retried after `attempts` ran out, while the answer is 503 or a node is unreachable:
    a shard whose primary died has no owner until a backup takes it over (about 3 s), and the
    request should outlast that rather than fail. 0 turns it off. A single standalone node
    never gets it."""
    clock: Callable[[], float] = field(default=time.monotonic, repr=False)
    """Seconds of a monotonic clock, for `failover_timeout` and topology refreshes."""

    def __post_init__(self) -> None:
        if self.attempts < 1 or self.base_delay < 0 or self.max_delay < self.base_delay:
            raise ValueError("need attempts >= 1 and 0 <= base_delay <= max_delay")
        if self.failover_timeout < 0:
            raise ValueError("failover_timeout must be >= 0")

    def backoff(self, retry: int) -> float:
        """Seconds to wait before retry number `retry` (0 for the first retry).

        "Equal jitter": half the exponential step is fixed, half random, so clients that failed
        together spread out, yet none retries at once."""
        step = min(self.max_delay, self.base_delay * 2.0**retry)
        return step / 2 + self.random() * step / 2

    def begin(self) -> Attempts:
        """The retry state of one call."""
        return Attempts(self)


class Attempts:
    """The retry state of one call. Each method returns the call's result, or how long to
    `Wait` before the next try, or raises the error for the caller when no try is left or
    retrying cannot help."""

    __slots__ = ("_policy", "_tries", "_until")

    def __init__(self, policy: RetryPolicy) -> None:
        self._policy = policy
        self._tries = 1
        self._until: float | None = None  # end of the failover allowance, once it started

    def outcome(self, call: Call[T], reply: Reply, cluster: bool = False) -> T | Wait:
        """`cluster`: the request goes to a cluster, so the failover allowance applies."""
        if reply.status in call.ok:
            return call.result(reply)
        error = error_for(reply.status, reply.content, reply.reason)
        return self._next(error, reply.headers.get("retry-after"), cluster)

    def failed(self, error: ConnectionFailed, cluster: bool = False) -> Wait:
        return self._next(error, None, cluster)

    def _next(self, error: LionMQError, retry_after: str | None, cluster: bool) -> Wait:
        policy = self._policy
        if not isinstance(error, ConnectionFailed | ServerError):
            raise error
        if self._tries < policy.attempts:
            delay = policy.backoff(self._tries - 1)
        else:
            delay = self._failover_delay(error, cluster)
        self._tries += 1
        if retry_after is not None and retry_after.isdigit():
            # The node knows best when it will be back, but never wait past the policy's bound.
            delay = min(max(delay, float(retry_after)), policy.max_delay)
        return Wait(delay)

    def _failover_delay(self, error: LionMQError, cluster: bool) -> float:
        """The wait before one more try past `attempts`, or `error` raised: only a cluster's
        failover signs (503, an unreachable node) earn more tries, for `failover_timeout`."""
        policy = self._policy
        if not (cluster and policy.failover_timeout and _failover_sign(error)):
            raise error
        now = policy.clock()
        if self._until is None:
            self._until = now + policy.failover_timeout
        left = self._until - now
        if left <= 0:
            raise error
        return min(policy.backoff(min(self._tries - 1, 32)), FAILOVER_POLL_S, left)


def _failover_sign(error: LionMQError) -> bool:
    return isinstance(error, ConnectionFailed | ServiceUnavailable)
