"""The bookkeeping of a consumer, shared by the threaded and the asyncio loops.

A `Tracker` knows which leases the consumer holds, which receipts wait to be acked or nacked,
and which leases are due for an extension; it turns that into `Op`s (ready-built calls) that
the loop sends its own way. It never does I/O, so both loops stay thin.
"""

from __future__ import annotations

import logging
import math
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import FrameType
from typing import Literal

from lionmq.errors import LionMQError
from lionmq.message import _Received
from lionmq.models import Delivery, Settled
from lionmq.options import ConsumeOptions
from lionmq.protocol import Call, Wire

log = logging.getLogger("lionmq.consume")

MAX_RECEIPTS = 1000
"""Receipts per ack/nack/extend request; larger sets are split."""


@dataclass(frozen=True, slots=True)
class ConsumeConfig:
    concurrency: int
    batch: int
    wait_ms: int = 2000
    visibility_ms: int = 30_000
    nack_delay_ms: int = 0
    drain_timeout: float | None = None
    flush_interval: float = 0.05
    error_pause: float = 1.0

    @classmethod
    def build(cls, concurrency: int, batch: int | None, options: ConsumeOptions) -> ConsumeConfig:
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        batch = min(concurrency, 1000) if batch is None else batch
        if not 1 <= batch <= 1000:
            raise ValueError("batch must be within 1..1000")
        return cls(concurrency, batch, **options)

    @property
    def limit(self) -> int:
        """Most messages held at once: running, plus fetched ahead when batch > concurrency."""
        return max(self.concurrency, self.batch)

    @property
    def tick(self) -> float:
        """How often pending acks are flushed and leases checked."""
        return min(self.flush_interval, self.visibility_ms / 4000)


@dataclass(frozen=True, slots=True)
class Op:
    kind: Literal["ack", "nack", "extend"]
    receipts: list[str]
    call: Call[Settled]
    since: float
    """When the op was made: an extension's new deadline counts from here (the safe side)."""


class Tracker:
    """Thread-safe: handlers finish on worker threads while the keeper flushes."""

    def __init__(
        self,
        wire: Wire,
        channel: str,
        config: ConsumeConfig,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._wire = wire
        self._channel = channel
        self._config = config
        self._clock = clock
        self._lock = threading.Lock()
        self._deadlines: dict[str, float] = {}  # receipt -> when its lease ends (by our clock)
        self._acks: list[str] = []
        self._nacks: list[str] = []
        self._fetched_at = 0.0

    @property
    def held(self) -> int:
        return len(self._deadlines)

    def free(self) -> int:
        return self._config.limit - len(self._deadlines)

    def fetch(self) -> Call[list[Delivery]]:
        """The next dequeue: as many messages as there is room for, up to a batch."""
        self._fetched_at = self._clock()
        config = self._config
        count = min(config.batch, self.free())
        return self._wire.dequeue(self._channel, count, config.wait_ms, config.visibility_ms)

    def fetch_failed(self, error: LionMQError) -> None:
        log.warning("dequeue from %s failed, trying again: %s", self._channel, error)

    def received(self, messages: Iterable[_Received], stopping: bool) -> bool:
        """Records the leases of fetched messages; True when they are to be handled, False
        when the consumer is stopping (then they are released at once).

        A lease started after the dequeue was sent, so a deadline counted from then errs
        early, which is the safe side."""
        receipts = [message.receipt for message in messages]
        deadline = self._fetched_at + self._config.visibility_ms / 1000
        with self._lock:
            self._deadlines.update(dict.fromkeys(receipts, deadline))
        if stopping:
            self.release(receipts)
        return not stopping

    def finish(self, message: _Received, error: Exception | None) -> bool:
        """Queues the ack (or, after an error, the nack) of a handled message. True when enough
        acks wait to fill a batch, so the caller wakes the flusher early."""
        if error is not None:
            log.error(
                "handler failed on %s message %s (attempt %d)",
                message.channel,
                message.id,
                message.attempt,
                exc_info=error,
            )
        with self._lock:
            # Not held any more: released at stop while the handler still ran, so the nack
            # already went out and the message will come again.
            if self._deadlines.pop(message.receipt, None) is None or message.settled:
                return False
            (self._acks if error is None else self._nacks).append(message.receipt)
            return len(self._acks) >= self._config.batch

    def release(self, receipts: Iterable[str] | None = None) -> None:
        """Queues a nack for held messages that will not be handled (all when None)."""
        with self._lock:
            chosen = list(self._deadlines) if receipts is None else list(receipts)
            for receipt in chosen:
                if self._deadlines.pop(receipt, None) is not None:
                    self._nacks.append(receipt)

    def due(self) -> list[Op]:
        """Everything to send now: all queued acks and nacks, and extensions of the leases that
        have less than half their time left."""
        now = self._clock()
        half = self._config.visibility_ms / 2000
        with self._lock:
            acks, self._acks = self._acks, []
            nacks, self._nacks = self._nacks, []
            extend = [r for r, deadline in self._deadlines.items() if deadline - now <= half]
        wire, channel, config = self._wire, self._channel, self._config
        return [
            *(Op("ack", chunk, wire.ack(channel, chunk), now) for chunk in _chunks(acks)),
            *(
                Op("nack", chunk, wire.nack(channel, chunk, config.nack_delay_ms, False), now)
                for chunk in _chunks(nacks)
            ),
            *(
                Op("extend", chunk, wire.extend(channel, chunk, config.visibility_ms), now)
                for chunk in _chunks(extend)
            ),
        ]

    def sent(self, op: Op, result: Settled) -> None:
        """Takes in the node's answer to an op."""
        if result.stale:
            # The lease ran out first: the node has redelivered, or will redeliver, the message.
            log.warning("%s: %d receipt(s) no longer held a lease", op.kind, len(result.stale))
        if op.kind == "extend":
            deadline = op.since + self._config.visibility_ms / 1000
            stale = set(result.stale)
            with self._lock:
                for receipt in op.receipts:
                    if receipt in self._deadlines:
                        # A lost lease cannot be won back: stop extending it.
                        self._deadlines[receipt] = math.inf if receipt in stale else deadline

    def failed(self, op: Op, error: Exception) -> None:
        # An ack or nack that failed even with retries is not repeated: its lease runs out
        # and the message is redelivered (at least once). A failed extension is simply due
        # again on the next tick.
        log.error(
            "%s of %d receipt(s) failed: %s",
            op.kind,
            len(op.receipts),
            error,
            exc_info=not isinstance(error, LionMQError),
        )


@contextmanager
def ctrl_c_stops(channel: str, stop: Callable[[], object]) -> Iterator[None]:
    """While a consumer runs in the main thread, the first Ctrl-C (SIGINT) stops it as its `stop`
    event would: one log line, the messages in hand are settled, and `consume` returns. Raising
    KeyboardInterrupt (or cancelling, under `asyncio.run`) at whatever line was running instead
    would print a long traceback, and could drop a fetched batch before it was tracked.

    The first Ctrl-C puts back the handler that was there before, so a second one does what it
    always did (KeyboardInterrupt by default: quit without waiting for running handlers). A
    SIGINT that is ignored, or not handled from Python, is left alone."""
    previous = signal.getsignal(signal.SIGINT)
    if threading.current_thread() is not threading.main_thread() or not callable(previous):
        yield
        return

    def on_sigint(signum: int, frame: FrameType | None) -> None:
        signal.signal(signal.SIGINT, previous)
        if getattr(previous, "_lionmq_consumer", False):
            previous(signum, frame)  # another consumer in this thread stops too
        log.warning("Ctrl-C: consumer of %r stopping (press it again to quit now)", channel)
        stop()

    on_sigint._lionmq_consumer = True  # type: ignore[attr-defined]
    signal.signal(signal.SIGINT, on_sigint)
    try:
        yield
    finally:
        if signal.getsignal(signal.SIGINT) is on_sigint:
            signal.signal(signal.SIGINT, previous)


def _chunks(receipts: list[str]) -> list[list[str]]:
    return [receipts[i : i + MAX_RECEIPTS] for i in range(0, len(receipts), MAX_RECEIPTS)]
