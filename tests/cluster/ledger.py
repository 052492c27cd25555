"""The books a cluster test keeps of what its clients saw, and the checks that judge them.

Everything here is pure (no I/O), so the checks are tested on synthetic books. Times are the
host's wall clock in seconds (`time.time()`): the nodes run on the same host and compute lease
deadlines on that clock, so a consumer's times bound the nodes' from outside.

What counts as a confirmed fact, and only that is judged:
- an enqueue is confirmed by its 201 (the ids it returned);
- an ack is confirmed by a 200 whose `stale` does not list the receipt;
- a delivery is what a 200 to a dequeue handed out, with the node that served it.
An ack whose answer was lost may or may not have applied: the checks hold either way.
"""

from __future__ import annotations

import itertools
import math
import threading
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

# Lease deadlines are whole milliseconds and the two clocks are read at different instants.
CLOCK_SLACK_S = 0.05


@dataclass(frozen=True, slots=True)
class Enqueued:
    channel: str
    id: str
    token: str  # unique per message a producer made; also its dedup id
    at: float  # when the 201 arrived


@dataclass(frozen=True, slots=True)
class Delivery:
    channel: str
    id: str
    token: str | None  # None for a message no producer of the test made
    attempt: int
    receipt: str
    node: str | None  # X-LionMQ-Node of the response
    sent_at: float  # the dequeue request left: the lease began after this...
    received_at: float  # ...and before this
    visibility_s: float


@dataclass(frozen=True, slots=True)
class Ack:
    channel: str
    id: str
    receipt: str
    confirmed_at: float


@dataclass(frozen=True, slots=True)
class Op:
    """One HTTP request on a channel, whatever its outcome (status 0: no answer at all)."""

    channel: str
    verb: str
    target: str
    started: float
    ended: float
    status: int
    node: str | None = None

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300


@dataclass(frozen=True, slots=True)
class Books:
    enqueued: Sequence[Enqueued] = ()
    deliveries: Sequence[Delivery] = ()
    acks: Sequence[Ack] = ()
    ops: Sequence[Op] = ()


@dataclass
class Ledger:
    """Thread-safe books; `books()` copies them out for the checks."""

    _lock: threading.Lock = field(default_factory=threading.Lock)
    _enqueued: list[Enqueued] = field(default_factory=list)
    _deliveries: list[Delivery] = field(default_factory=list)
    _acks: list[Ack] = field(default_factory=list)
    _ops: list[Op] = field(default_factory=list)

    def enqueued(self, items: Iterable[Enqueued]) -> None:
        with self._lock:
            self._enqueued.extend(items)

    def delivered(self, items: Iterable[Delivery]) -> None:
        with self._lock:
            self._deliveries.extend(items)

    def acked(self, items: Iterable[Ack]) -> None:
        with self._lock:
            self._acks.extend(items)

    def op(self, op: Op) -> None:
        with self._lock:
            self._ops.append(op)

    def books(self) -> Books:
        with self._lock:
            return Books(
                tuple(self._enqueued), tuple(self._deliveries), tuple(self._acks), tuple(self._ops)
            )

    def confirmed_count(self) -> int:
        with self._lock:
            return len(self._enqueued)

    def delivered_count(self) -> int:
        with self._lock:
            return len(self._deliveries)


def lost(books: Books) -> list[str]:
    """Confirmed enqueues never delivered (judge after a drain)."""
    delivered = {d.id for d in books.deliveries}
    return [
        f"{e.channel}: message {e.id} ({e.token}) was confirmed at {e.at:.3f} and never delivered"
        for e in books.enqueued
        if e.id not in delivered
    ]


def acked_redelivered(books: Books) -> list[str]:
    """Deliveries of a message after a confirmed ack of it.

    A confirmed ack of attempt k settles the message for good, so any other delivery of it
    with a later attempt is wrong whenever it happened (before the ack, that ack should have
    been stale), and so is any delivery asked for after the ack was confirmed.
    """
    by_receipt = {d.receipt: d for d in books.deliveries}
    by_id: dict[str, list[Delivery]] = defaultdict(list)
    for d in books.deliveries:
        by_id[d.id].append(d)
    found = []
    for ack in books.acks:
        acked = by_receipt.get(ack.receipt)
        attempt = acked.attempt if acked is not None else math.inf
        for d in by_id[ack.id]:
            if d.receipt == ack.receipt:
                continue
            if d.attempt > attempt or d.sent_at > ack.confirmed_at:
                found.append(
                    f"{ack.channel}: message {ack.id} acked (attempt {attempt}, confirmed "
                    f"{ack.confirmed_at:.3f}) was delivered again: attempt {d.attempt} by "
                    f"{d.node} asked at {d.sent_at:.3f}"
                )
    return found


def overlapping(books: Books, slack_s: float = CLOCK_SLACK_S) -> list[str]:
    """Two deliveries of one message while the first one's lease surely still held.

    The first lease began after its request left (`sent_at`), so it held at least until
    `sent_at + visibility`; the second began before its answer came (`received_at`). An ack of
    the first (applied or not) does not excuse the second: then it redelivered an acked message.
    Two owners serving one shard at once show up here, whatever nodes they are.
    """
    by_id: dict[str, list[Delivery]] = defaultdict(list)
    for d in books.deliveries:
        by_id[d.id].append(d)
    found = []
    for deliveries in by_id.values():
        ordered = sorted(deliveries, key=lambda d: d.received_at)
        for i, first in enumerate(ordered):
            held_until = first.sent_at + first.visibility_s - slack_s
            for second in ordered[i + 1 :]:
                if second.receipt != first.receipt and second.received_at < held_until:
                    found.append(
                        f"{first.channel}: message {first.id} delivered by {first.node} "
                        f"(attempt {first.attempt}, lease held until >= {held_until:.3f}) and "
                        f"again by {second.node} (attempt {second.attempt}) at "
                        f"<= {second.received_at:.3f}"
                    )
    return found


def duplicated(books: Books) -> list[str]:
    """A producer's message stored twice (its retries keep the dedup id, so never)."""
    ids: dict[tuple[str, str], set[str]] = defaultdict(set)
    for e in books.enqueued:
        ids[e.channel, e.token].add(e.id)
    for d in books.deliveries:
        if d.token is not None:
            ids[d.channel, d.token].add(d.id)
    return [
        f"{channel}: {token} was stored as {len(found)} messages {sorted(found)}"
        for (channel, token), found in ids.items()
        if len(found) > 1
    ]


def server_errors(books: Books) -> list[str]:
    """Answers a cluster must never give: a 5xx other than 503 (a failover is 503 + retry)."""
    return [
        f"{op.verb} {op.channel} on {op.target} answered {op.status} at {op.ended:.3f}"
        for op in books.ops
        if op.status >= 500 and op.status != 503
    ]


def refused(books: Books) -> list[str]:
    """4xx answers to the test's well-formed requests, 429 aside: a receipt a new owner does
    not honour (400), a forwarded request that lost its credentials (401), a 404 or 422."""
    return [
        f"{op.verb} {op.channel} on {op.target} answered {op.status} at {op.ended:.3f}"
        for op in books.ops
        if 400 <= op.status < 500 and op.status != 429
    ]


def problems(books: Books) -> list[str]:
    """Every broken promise in `books`, after a drain: empty when the cluster kept them all."""
    return [
        *lost(books),
        *acked_redelivered(books),
        *overlapping(books),
        *duplicated(books),
        *server_errors(books),
        *refused(books),
    ]


def longest_outage(ops: Iterable[Op], channel: str, since: float, until: float) -> float:
    """The longest time `channel` answered no request successfully around [since, until].

    The gaps between consecutive successful answers (by arrival) that touch the window; the
    window's ends count as successes only if the channel had answered before and after it.
    A channel probed every few milliseconds measures its unavailability this way, a slow
    success counting as unavailable as a refusal does. Infinite if no success came after.
    """
    ends = sorted(op.ended for op in ops if op.channel == channel and op.ok)
    before = [t for t in ends if t < since]
    after = [t for t in ends if t >= since]
    if not after:
        return math.inf
    points = ([before[-1]] if before else [since]) + after
    worst = 0.0
    for a, b in itertools.pairwise(points):
        if a > until:
            break
        worst = max(worst, b - a)
    return worst


def summary(books: Books) -> dict[str, int]:
    """Counts for a report line."""
    statuses: dict[int, int] = defaultdict(int)
    for op in books.ops:
        statuses[op.status] += 1
    return {
        "confirmed": len(books.enqueued),
        "delivered": len(books.deliveries),
        "acked": len(books.acks),
        "ops": len(books.ops),
        **{f"status_{k}": v for k, v in sorted(statuses.items())},
    }
