"""Producers and consumers over plain HTTP against any node of a cluster, keeping the books.

Each client thread sends every request to the next node of `targets()` (the nodes a client can
reach now), so most requests are forwarded, and moves on to the next one on a refusal (503,
429) or no answer, as a client of a failing cluster does. A producer retries a batch with the
same dedup ids; a consumer acks what it got at once, retrying the ack until its lease would end.
Everything is bounded: thread count, batches, each retry loop by time, the whole run by `stop()`.
"""

from __future__ import annotations

import itertools
import threading
import time
import uuid
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any

import httpx

from tests.cluster.ledger import Ack, Delivery, Enqueued, Ledger, Op

Targets = Callable[[], Sequence[str]]
RETRY_AFTER_CAP_S = 0.5
REQUEST_TIMEOUT = httpx.Timeout(3.0, connect=1.0)


@dataclass(frozen=True)
class Answer:
    status: int  # 0: no answer (refused, reset, timed out)
    body: Any
    node: str | None
    forwarded_by: str | None


class Caller:
    """One thread's HTTP client: every call is booked as an `Op`."""

    def __init__(
        self,
        ledger: Ledger,
        token: str,
        timeout: httpx.Timeout = REQUEST_TIMEOUT,
    ) -> None:
        self.ledger = ledger
        self.http = httpx.Client(headers={"Authorization": f"Bearer {token}"}, timeout=timeout)

    def post(self, url: str, channel: str, verb: str, body: Any) -> Answer:
        started = time.time()
        try:
            r = self.http.post(f"{url}/channels/{channel}/{verb}", json=body)
        except httpx.HTTPError:
            self.ledger.op(Op(channel, verb, url, started, time.time(), 0))
            return Answer(0, None, None, None)
        node = r.headers.get("x-lionmq-node")
        self.ledger.op(Op(channel, verb, url, started, time.time(), r.status_code, node))
        body_json = r.json() if r.headers.get("content-type", "").endswith("json") else None
        return Answer(r.status_code, body_json, node, r.headers.get("x-lionmq-forwarded-by"))

    def close(self) -> None:
        self.http.close()


def retry_delay(attempt: int) -> float:
    return float(min(0.02 * 2**attempt, RETRY_AFTER_CAP_S))


class Rotation:
    """The next target URL, skipping none: the caller moves on after a failure. With no node
    serving at all (all killed or frozen for a moment), it waits up to `NO_TARGET_S`."""

    NO_TARGET_S = 30.0

    def __init__(self, targets: Targets, start: int = 0) -> None:
        self.targets = targets
        self.counter = itertools.count(start)

    def next(self) -> str:
        deadline = time.monotonic() + self.NO_TARGET_S
        while not (urls := self.targets()):
            if time.monotonic() > deadline:
                raise AssertionError(f"no node of the cluster served for {self.NO_TARGET_S}s")
            time.sleep(0.05)
        return urls[next(self.counter) % len(urls)]


def enqueue(
    caller: Caller,
    rotation: Rotation,
    channel: str,
    tokens: Sequence[str],
    within_s: float,
    stop: threading.Event | None = None,
) -> Answer:
    """Enqueue one message per token (dedup id = token), retrying on refusals until `within_s`
    passes; the confirmed ids are booked. The last answer (a 201 if it was confirmed)."""
    messages = [{"body": {"t": t}, "dedup_id": t} for t in tokens]
    deadline = time.monotonic() + within_s
    for attempt in itertools.count():
        answer = caller.post(rotation.next(), channel, "enqueue", {"messages": messages})
        if answer.status == 201:
            ids = [str(i) for i in answer.body["ids"]]
            now = time.time()
            caller.ledger.enqueued(
                Enqueued(channel, i, t, now) for i, t in zip(ids, tokens, strict=True)
            )
            return answer
        if answer.status not in (0, 429, 503):
            return answer  # booked as an Op: the checks report it
        if time.monotonic() > deadline or (stop is not None and stop.is_set()):
            return answer
        time.sleep(retry_delay(attempt))
    raise AssertionError("unreachable")


def dequeue_and_ack(
    caller: Caller,
    rotation: Rotation,
    channel: str,
    visibility_ms: int,
    max_messages: int = 20,
    wait_ms: int = 0,
) -> Answer:
    """One dequeue; whatever it delivered is booked and acked (retried until the lease would
    end, on any node: a receipt must stay ackable across a failover)."""
    sent = time.time()
    answer = caller.post(
        rotation.next(),
        channel,
        "dequeue",
        {"max": max_messages, "wait_ms": wait_ms, "visibility_ms": visibility_ms},
    )
    received = time.time()
    if answer.status != 200 or not answer.body["messages"]:
        return answer
    delivered = [
        Delivery(
            channel,
            str(m["id"]),
            m["body"].get("t") if isinstance(m["body"], dict) else None,
            int(m["attempt"]),
            m["receipt"],
            answer.node,
            sent,
            received,
            visibility_ms / 1000,
        )
        for m in answer.body["messages"]
    ]
    caller.ledger.delivered(delivered)
    ack(caller, rotation, channel, delivered, sent + visibility_ms / 1000 - 0.2)
    return answer


def ack(
    caller: Caller, rotation: Rotation, channel: str, delivered: Sequence[Delivery], until: float
) -> None:
    pending = {d.receipt: d for d in delivered}
    for attempt in itertools.count():
        answer = caller.post(rotation.next(), channel, "ack", {"receipts": list(pending)})
        if answer.status == 200:
            stale = set(answer.body["stale"])
            now = time.time()
            caller.ledger.acked(
                Ack(channel, d.id, r, now) for r, d in pending.items() if r not in stale
            )
            return
        if answer.status not in (0, 429, 503) or time.time() > until:
            return
        time.sleep(retry_delay(attempt))


class Load:
    """`producers` + `consumers` threads over `channels` until `stop()` (or `max_batches` each).

    Tokens carry a run id, so two loads on one cluster never share a dedup id.
    """

    def __init__(
        self,
        targets: Targets,
        channels: Sequence[str],
        ledger: Ledger,
        token: str,
        *,
        producers: int = 2,
        consumers: int = 2,
        batch: int = 5,
        visibility_ms: int = 5000,
        pace_s: float = 0.01,
        max_batches: int = 100_000,
        retry_s: float = 15.0,
    ) -> None:
        assert channels, "a load needs channels"
        self.targets = targets
        self.channels = list(channels)
        self.ledger = ledger
        self.token = token
        self.batch = batch
        self.visibility_ms = visibility_ms
        self.pace_s = pace_s
        self.max_batches = max_batches
        self.retry_s = retry_s
        self.run = uuid.uuid4().hex[:8]
        self._stop = threading.Event()
        self.failures: list[BaseException] = []
        self._threads = [
            threading.Thread(target=self._guard, args=(self._produce, i), daemon=True)
            for i in range(producers)
        ] + [
            threading.Thread(target=self._guard, args=(self._consume, i), daemon=True)
            for i in range(consumers)
        ]

    def start(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def stop(self, timeout: float = 20.0) -> None:
        """Stop and join every thread; a thread that died of an exception fails the test."""
        self._stop.set()
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        alive = [t.name for t in self._threads if t.is_alive()]
        assert not alive, f"load threads still running after {timeout}s: {alive}"
        if self.failures:
            raise AssertionError(f"load threads failed: {self.failures!r}")

    def __enter__(self) -> Load:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _guard(self, work: Callable[[int], None], index: int) -> None:
        try:
            work(index)
        except BaseException as exc:  # reported by stop(): a thread must not die silently
            self.failures.append(exc)

    def _produce(self, index: int) -> None:
        caller = Caller(self.ledger, self.token)
        rotation = Rotation(self.targets, index)
        try:
            for n in range(self.max_batches):
                if self._stop.is_set():
                    return
                channel = self.channels[(index + n) % len(self.channels)]
                tokens = [f"{self.run}-p{index}-{n}-{j}" for j in range(self.batch)]
                enqueue(caller, rotation, channel, tokens, self.retry_s, self._stop)
                time.sleep(self.pace_s)
        finally:
            caller.close()

    def _consume(self, index: int) -> None:
        caller = Caller(self.ledger, self.token)
        rotation = Rotation(self.targets, index + 1)
        try:
            for n in range(self.max_batches):
                if self._stop.is_set():
                    return
                channel = self.channels[(index + n) % len(self.channels)]
                answer = dequeue_and_ack(caller, rotation, channel, self.visibility_ms)
                if answer.status in (0, 429, 503):
                    time.sleep(retry_delay(2))
                else:
                    time.sleep(self.pace_s)
        finally:
            caller.close()


class Probe:
    """One thread enqueueing a message on `channel` every `interval_s` (booked as any other):
    the gaps between its successes measure how long the channel was unavailable."""

    def __init__(
        self,
        targets: Targets,
        channel: str,
        ledger: Ledger,
        token: str,
        interval_s: float = 0.02,
        max_requests: int = 20_000,
    ) -> None:
        self.targets = targets
        self.channel = channel
        self.ledger = ledger
        self.token = token
        self.interval_s = interval_s
        self.max_requests = max_requests
        self.run = uuid.uuid4().hex[:8]
        self._stop = threading.Event()
        self.failures: list[BaseException] = []
        self._thread = threading.Thread(target=self._probe, daemon=True)

    def start(self) -> Probe:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        assert not self._thread.is_alive(), f"probe of {self.channel} still running"
        if self.failures:
            raise AssertionError(f"probe of {self.channel} failed: {self.failures!r}")

    def _probe(self) -> None:
        caller = Caller(self.ledger, self.token, httpx.Timeout(2.0, connect=0.5))
        rotation = Rotation(self.targets)
        try:
            for n in range(self.max_requests):
                if self._stop.is_set():
                    return
                token = f"{self.run}-probe-{n}"
                enqueue(caller, rotation, self.channel, [token], 0.0)
                time.sleep(self.interval_s)
        except BaseException as exc:
            self.failures.append(exc)
        finally:
            caller.close()


def first_served(
    caller: Caller,
    url: str,
    channel: str,
    by: Collection[str] | None,
    timeout: float,
    interval_s: float = 0.02,
) -> Answer:
    """Enqueue on `channel` through `url` until a 201 comes (served by one of the node ids
    `by`, if given); fails after `timeout` s. Measures a takeover: call it right after a kill."""
    deadline = time.monotonic() + timeout
    run = uuid.uuid4().hex[:8]
    single = Rotation(lambda: [url])
    for n in itertools.count():
        answer = enqueue(caller, single, channel, [f"{run}-first-{n}"], 0.0)
        if answer.status == 201 and (by is None or answer.node in by):
            return answer
        if time.monotonic() > deadline:
            raise AssertionError(f"{channel} not served through {url} by {by} within {timeout}s")
        time.sleep(interval_s)
    raise AssertionError("unreachable")


def drain(
    targets: Targets,
    channels: Sequence[str],
    ledger: Ledger,
    token: str,
    visibility_ms: int,
    timeout: float,
) -> None:
    """Consume and ack every channel until each one is empty (ready, delayed and in flight all
    0 as its owner counts them), or fail after `timeout` s. Deliveries are booked."""
    caller = Caller(ledger, token)
    rotation = Rotation(targets)
    left = list(channels)
    deadline = time.monotonic() + timeout
    try:
        while left:
            if time.monotonic() > deadline:
                raise AssertionError(f"{left} not drained within {timeout}s")
            channel = left[0]
            answer = dequeue_and_ack(caller, rotation, channel, visibility_ms, 200, 200)
            if answer.status == 200 and answer.body["messages"]:
                continue
            if answer.status == 200 and _empty(caller, rotation.next(), channel):
                left.pop(0)
            else:
                left.append(left.pop(0))  # leases still held elsewhere: come back later
                time.sleep(0.05)
    finally:
        caller.close()


def _empty(caller: Caller, url: str, channel: str) -> bool:
    try:
        r = caller.http.get(f"{url}/channels/{channel}")
    except httpx.HTTPError:
        return False
    if r.status_code == 404:
        return True
    if r.status_code != 200:
        return False
    counts = r.json()["counts"]
    return int(counts["ready"]) + int(counts["delayed"]) + int(counts["in_flight"]) == 0
