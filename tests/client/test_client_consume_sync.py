"""`Client.consume`: acks on success (batched), nacks on error, extends slow handlers, stops
cleanly without losing a message."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest
from lionmq import Client, Message
from lionmq_fake import FakeNode

FAST: dict[str, Any] = {"wait_ms": 50, "flush_interval": 0.01}


@contextmanager
def consuming(
    client: Client, handler: Callable[[Message], object], **kwargs: Any
) -> Iterator[threading.Event]:
    """Runs consume on a thread; stops it on leaving and fails if it does not end in time."""
    stop = threading.Event()
    errors: list[BaseException] = []

    def run() -> None:
        try:
            client.consume("jobs", handler, stop=stop, **{**FAST, **kwargs})
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield stop
    finally:
        stop.set()
        thread.join(5)
    assert not thread.is_alive(), "consume did not stop"
    if errors:
        raise errors[0]


def test_acks_every_message_in_batches(client: Client, node: FakeNode) -> None:
    node.seed("jobs", 60)
    seen: list[Any] = []
    lock = threading.Lock()

    def handler(message: Message) -> None:
        with lock:
            seen.append(message.body["n"])

    with consuming(client, handler, concurrency=4, batch=20):
        node.wait_for(lambda: len(node.channel("jobs").acked) == 60)
    assert sorted(seen, key=int) == [str(n) for n in range(1, 61)]
    assert node.channel("jobs").leased == {}
    assert len(node.bodies("/ack")) < 20  # batched, not one request per message
    assert all(
        body["max"] <= 20 and body["visibility_ms"] == 30_000 for body in node.bodies("/dequeue")
    )


def test_nacks_when_the_handler_raises(client: Client, node: FakeNode) -> None:
    node.seed("jobs", 4)

    def handler(message: Message) -> None:
        if message.attempt == 1:
            raise RuntimeError("boom")

    with consuming(client, handler, concurrency=2, nack_delay_ms=7):
        node.wait_for(lambda: len(node.channel("jobs").acked) == 4)
    assert len(node.channel("jobs").nacked) == 4
    assert all(b["delay_ms"] == 7 and not b["dead_letter"] for b in node.bodies("/nack"))
    assert all(r.endswith(":2") for r in node.channel("jobs").acked)  # redelivered, then acked


def test_extends_the_lease_of_a_slow_handler(client: Client, node: FakeNode) -> None:
    node.seed("jobs", 1)
    channel = node.channel("jobs")

    def handler(message: Message) -> None:
        node.wait_for(lambda: len(channel.extended) >= 2)

    with consuming(client, handler, visibility_ms=200):
        node.wait_for(lambda: len(channel.acked) == 1)
    assert node.bodies("/extend")[0]["visibility_ms"] == 200
    assert channel.nacked == []


def test_stop_finishes_running_handlers_and_nacks_what_waited(
    client: Client, node: FakeNode
) -> None:
    node.seed("jobs", 5)
    started, release = threading.Event(), threading.Event()

    def handler(message: Message) -> None:
        started.set()
        assert release.wait(5)

    with consuming(client, handler, concurrency=1, batch=5) as stop:
        assert started.wait(5)
        stop.set()
        # The four not started go back while the first handler still runs.
        node.wait_for(lambda: len(node.channel("jobs").nacked) == 4)
        release.set()
    channel = node.channel("jobs")
    assert len(channel.acked) == 1 and len(channel.nacked) == 4
    assert channel.leased == {} and len(channel.ready) == 4


def test_drain_timeout_nacks_a_handler_that_overruns(client: Client, node: FakeNode) -> None:
    node.seed("jobs", 1)
    started, release = threading.Event(), threading.Event()

    def handler(message: Message) -> None:
        started.set()
        release.wait(5)

    with consuming(client, handler, drain_timeout=0.05) as stop:
        assert started.wait(5)
        stop.set()
    release.set()
    channel = node.channel("jobs")
    assert channel.acked == [] and len(channel.nacked) == 1 and len(channel.ready) == 1


def test_a_handler_may_settle_its_message_itself(client: Client, node: FakeNode) -> None:
    node.seed("jobs", 2)
    channel = node.channel("jobs")

    def handler(message: Message) -> None:
        if message.id == "1":
            message.nack(dead_letter=True)
        else:
            message.ack()

    with consuming(client, handler):
        node.wait_for(lambda: len(channel.acked) + len(channel.nacked) == 2)
    assert len(node.bodies("/ack")) == 1 and len(node.bodies("/nack")) == 1
    assert node.bodies("/nack")[0]["dead_letter"] is True


def test_keeps_consuming_when_the_node_fails_for_a_while(client: Client, node: FakeNode) -> None:
    node.faults.extend([httpx.ConnectError] * 3 + [503] * 3)  # two dequeues fail outright
    node.seed("jobs", 1)
    with consuming(client, lambda m: None, error_pause=0.01):
        node.wait_for(lambda: len(node.channel("jobs").acked) == 1)


def test_ctrl_c_drains_then_propagates(client: Client, node: FakeNode) -> None:
    node.seed("jobs", 1)
    handled = threading.Event()

    def interrupt(request: httpx.Request) -> None:
        # The second dequeue is interrupted: the first message's handler is done or running.
        if request.url.path.endswith("/dequeue") and len(node.bodies("/dequeue")) == 2:
            handled.wait(5)
            raise KeyboardInterrupt

    node.on_request = interrupt
    with pytest.raises(KeyboardInterrupt):
        client.consume("jobs", lambda m: handled.set(), **FAST)
    assert len(node.channel("jobs").acked) == 1


@pytest.mark.parametrize(
    "kwargs", [{"concurrency": 0}, {"batch": 0}, {"batch": 1001}, {"nonsense": 1}]
)
def test_rejects_bad_settings(client: Client, kwargs: dict[str, Any]) -> None:
    with pytest.raises((ValueError, TypeError)):
        client.consume("jobs", lambda m: None, **kwargs)
