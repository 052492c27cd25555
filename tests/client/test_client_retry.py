"""Retries back off within bounds, and a retried enqueue never stores a message twice."""

from __future__ import annotations

import json
import os
import random
import time

import httpx
import lionmq
import pytest
from lionmq import AsyncClient, Client, NewMessage, RetryPolicy, protocol
from lionmq_fake import FakeNode


def test_backoff_grows_exponentially_within_bounds() -> None:
    policy = RetryPolicy(attempts=10, base_delay=0.1, max_delay=1.0)
    for retry, step in enumerate([0.1, 0.2, 0.4, 0.8, 1.0, 1.0]):
        delays = [policy.backoff(retry) for _ in range(200)]
        assert all(step / 2 <= d <= step for d in delays), (retry, min(delays), max(delays))
        assert len(set(delays)) > 1  # jittered


def test_waits_come_from_the_injected_random_source_and_sleep(node: FakeNode) -> None:
    slept: list[float] = []
    policy = RetryPolicy(
        attempts=4, base_delay=0.1, max_delay=0.3, random=lambda: 0.5, sleep=slept.append
    )
    node.faults.extend([503] * 10)
    with (
        Client("http://node", transport=node.transport(), retry=policy) as client,
        pytest.raises(lionmq.ServiceUnavailable),
    ):
        client.health()
    # Half of each step fixed, half jitter (here half of that): steps 0.1, 0.2, then 0.3 (capped).
    assert slept == pytest.approx([0.075, 0.15, 0.225])
    assert len(node.requests) == 4


async def test_async_waits_use_the_injected_sleep(node: FakeNode) -> None:
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    policy = RetryPolicy(
        attempts=3, base_delay=0.2, max_delay=1.0, random=lambda: 0.0, async_sleep=sleep
    )
    node.faults.extend([503, 502])
    async with AsyncClient("http://node", transport=node.async_transport(), retry=policy) as c:
        assert (await c.health())["status"] == "ok"
    assert slept == pytest.approx([0.1, 0.2])


def test_a_seeded_random_source_repeats_its_backoffs() -> None:
    def delays(seed: int) -> list[float]:
        policy = RetryPolicy(attempts=6, random=random.Random(seed).random)
        return [policy.backoff(retry) for retry in range(5)]

    assert delays(7) == delays(7)
    assert delays(7) != delays(8)


def test_policy_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        RetryPolicy(attempts=0)
    with pytest.raises(ValueError):
        RetryPolicy(base_delay=2.0, max_delay=1.0)


def test_total_wait_is_bounded_by_the_policy(node: FakeNode) -> None:
    policy = RetryPolicy(attempts=4, base_delay=0.02, max_delay=0.04)
    node.faults.extend([503] * 10)
    started = time.monotonic()
    with (
        Client("http://node", transport=node.transport(), retry=policy) as client,
        pytest.raises(lionmq.ServiceUnavailable),
    ):
        client.health()
    # Three waits of at most 0.02, 0.04, 0.04 seconds.
    assert time.monotonic() - started < 0.5
    assert len(node.requests) == 4


def test_retry_after_is_honoured_up_to_max_delay() -> None:
    calls: list[float] = []

    def handle(request: httpx.Request) -> httpx.Response:
        calls.append(time.monotonic())
        if len(calls) == 1:
            return httpx.Response(503, headers={"retry-after": "60"}, json={"title": "busy"})
        return httpx.Response(200, json={"status": "ok"})

    policy = RetryPolicy(attempts=2, base_delay=0.001, max_delay=0.05)
    with Client("http://x", transport=httpx.MockTransport(handle), retry=policy) as client:
        assert client.health() == {"status": "ok"}
    assert 0.04 <= calls[1] - calls[0] < 1.0


def test_no_retry_with_one_attempt(node: FakeNode) -> None:
    node.faults.append(httpx.ConnectError)
    retry = RetryPolicy(attempts=1)
    with (
        Client("http://node", transport=node.transport(), retry=retry) as client,
        pytest.raises(lionmq.ConnectionFailed),
    ):
        client.health()
    assert len(node.requests) == 1


@pytest.mark.parametrize("fault", ["lost", httpx.ReadTimeout, 502])
def test_retried_enqueue_sends_the_same_dedup_ids(
    client: Client, node: FakeNode, fault: object
) -> None:
    # "lost": the node stored the batch but the reply never came; the retry must not store it
    # again, and must return the ids of the first try.
    node.faults.append(fault)  # type: ignore[arg-type]
    ids = client.enqueue_many("jobs", ["a", "b", "c"])
    assert len(node.requests) == 2
    first, second = (r.content for r in node.requests)
    assert first == second
    assert len(node.channel("jobs").ready) == 3
    assert [m.id for m in node.channel("jobs").ready] == ids


def test_dedup_ids_share_a_prefix_per_call_and_differ_between_calls(
    client: Client, node: FakeNode
) -> None:
    client.enqueue_many("jobs", ["a", "b"])
    client.enqueue("jobs", "c")
    first, second = node.bodies("/enqueue")
    a, b = (m["dedup_id"] for m in first["messages"])
    (c,) = (m["dedup_id"] for m in second["messages"])
    assert a.rsplit("-", 1) == [b.rsplit("-", 1)[0], "0"]
    assert b.endswith("-1")
    assert c.rsplit("-", 1)[0] != a.rsplit("-", 1)[0]
    assert len(node.channel("jobs").ready) == 3


def test_callers_dedup_id_is_kept_and_their_messages_are_not_changed(
    client: Client, node: FakeNode
) -> None:
    mine = NewMessage({"x": 1}, headers={"k": "v"}, delay_ms=5)
    first = client.enqueue_many("jobs", [mine, NewMessage(2, dedup_id="order-7")])
    again = client.enqueue_many("jobs", [mine, NewMessage(3, dedup_id="order-7")])
    assert mine.dedup_id is None
    assert first[1] == again[1]  # the node deduplicated order-7
    assert first[0] != again[0]  # reusing `mine` enqueued it again
    sent = node.bodies("/enqueue")[0]["messages"]
    assert sent[0] == {
        "body": {"x": 1},
        "headers": {"k": "v"},
        "delay_ms": 5,
        "dedup_id": sent[0]["dedup_id"],
    }
    assert sent[1]["dedup_id"] == "order-7"


def test_options_apply_to_plain_bodies(client: Client, node: FakeNode) -> None:
    client.enqueue("jobs", [1, 2], headers={"h": "1"}, ttl_ms=100, dedup_id="d")
    client.enqueue_many("jobs", [None], delay_ms=50)
    one, many = (body["messages"] for body in node.bodies("/enqueue"))
    assert one == [{"body": [1, 2], "headers": {"h": "1"}, "ttl_ms": 100, "dedup_id": "d"}]
    assert many[0]["body"] is None and many[0]["delay_ms"] == 50
    assert set(many[0]) == {"body", "delay_ms", "dedup_id"}


def test_large_batches_are_split_and_ids_stay_in_order(node: FakeNode) -> None:
    with Client("http://node", transport=node.transport(), max_batch=100) as client:
        ids = client.enqueue_many("jobs", range(250))
    sizes = [len(body["messages"]) for body in node.bodies("/enqueue")]
    assert sizes == [100, 100, 50]
    assert ids == [m.id for m in node.channel("jobs").ready]
    assert [m.body for m in node.channel("jobs").ready] == list(range(250))
    dedup = {m["dedup_id"] for b in node.bodies("/enqueue") for m in b["messages"]}
    assert len(dedup) == 250


def test_enqueue_sends_json(client: Client, node: FakeNode) -> None:
    client.enqueue("jobs", {"é": "ü"})
    request = node.requests[0]
    assert request.headers["content-type"] == "application/json"
    assert json.loads(request.content)["messages"][0]["body"] == {"é": "ü"}


def test_dedup_prefixes_never_repeat_and_a_forked_child_draws_its_own() -> None:
    prefixes = [protocol._call_ids.prefix() for _ in range(1000)]
    assert len(set(prefixes)) == 1000
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child
        os.write(write, protocol._call_ids.prefix().encode())
        os._exit(0)
    os.close(write)
    child = os.read(read, 100).decode()
    os.close(read)
    os.waitpid(pid, 0)
    assert child.split(".")[0] != prefixes[0].split(".")[0]
