"""End to end: a real node process on a free loopback port, driven through the bundled client."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

import httpx
import pytest
from lionmq import (
    BadRequest,
    ChannelFull,
    Client,
    InvalidRequest,
    Message,
    PayloadTooLarge,
    Unauthorized,
)

from tests.conftest import NodeProcess, wait_until


@pytest.fixture
def client(node: NodeProcess) -> Iterator[Client]:
    with Client(node.url) as c:
        yield c


def timed_dequeue(client: Client, channel: str, wait_ms: int) -> tuple[list[Message], float]:
    start = time.monotonic()
    got = client.dequeue(channel, 10, wait_ms=wait_ms)
    return got, time.monotonic() - start


def test_lifecycle(client: Client) -> None:
    one = client.enqueue("orders", {"sku": "A1", "qty": 2}, headers={"source": "web"})
    many = client.enqueue_many("orders", ["b", "c"])
    got = client.dequeue("orders", 10)
    assert [m.id for m in got] == [one, *many]
    assert got[0].body == {"sku": "A1", "qty": 2} and got[0].headers == {"source": "web"}
    assert all(m.attempt == 1 for m in got)
    for m in got:
        assert m.ack().acked == 1
    info = client.get_channel("orders")
    assert (info.counts.ready, info.counts.in_flight, info.totals.acked) == (0, 0, 3)
    assert client.ready()


@pytest.mark.parametrize("how", ["enqueue", "nack", "lease_expiry", "delay_due"])
def test_long_poll_wakes_at_once(client: Client, how: str) -> None:
    ch = f"wake-{how.replace('_', '-')}"
    if how == "nack":
        client.enqueue(ch, "x")
        held = client.dequeue(ch)
    elif how == "lease_expiry":
        client.enqueue(ch, "x")
        held = client.dequeue(ch, visibility_ms=1000)
    elif how == "delay_due":
        client.enqueue(ch, "x", delay_ms=700)
    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(timed_dequeue, client, ch, 10_000)
        time.sleep(0.2)  # let the dequeue start waiting: what is measured is its wake-up
        if how == "enqueue":
            client.enqueue(ch, "x")
        elif how == "nack":
            held[0].nack()
        got, took = waiting.result(timeout=15)
    assert [m.body for m in got] == ["x"]
    expected = {"enqueue": 0.2, "nack": 0.2, "lease_expiry": 1.0, "delay_due": 0.7}[how]
    assert expected - 0.05 <= took <= expected + 0.6, took


def test_long_poll_times_out_empty(client: Client) -> None:
    got, took = timed_dequeue(client, "quiet", 300)
    assert got == [] and 0.25 <= took < 2


def test_lease_expiry_and_redelivery(client: Client) -> None:
    client.enqueue("jobs", "work")
    first = client.dequeue("jobs", visibility_ms=1000)[0]
    assert client.dequeue("jobs") == []
    second = client.dequeue("jobs", wait_ms=5000)[0]
    assert (second.id, second.attempt) == (first.id, 2)
    assert first.ack().stale == [first.receipt]  # the old receipt acks nothing
    assert second.ack().acked == 1
    assert client.get_channel("jobs").totals.redelivered == 1


def test_extend_keeps_the_lease(client: Client) -> None:
    client.enqueue("slow", "work")
    m = client.dequeue("slow", visibility_ms=1000)[0]
    assert m.extend(10_000).extended == 1
    assert client.dequeue("slow", wait_ms=1500) == []
    assert m.ack().acked == 1


def test_dead_letter_after_max_attempts(client: Client) -> None:
    client.put_channel("pay", max_attempts=2)
    client.enqueue("pay", {"id": 7}, headers={"trace": "abc"})
    for attempt in (1, 2):
        m = client.dequeue("pay")[0]
        assert m.attempt == attempt
        m.nack()
    assert client.dequeue("pay") == []
    dead = client.dequeue("pay.dlq")[0]
    assert dead.body == {"id": 7}
    assert dead.headers["trace"] == "abc"
    assert dead.headers["x-dead-letter-channel"] == "pay"
    assert dead.headers["x-dead-letter-reason"] == "max_attempts"
    assert dead.headers["x-dead-letter-attempts"] == "2"
    assert client.get_channel("pay").totals.dead_lettered == 1


def test_nack_straight_to_dead_letter(client: Client) -> None:
    client.enqueue("bad", "poison")
    client.dequeue("bad")[0].nack(dead_letter=True)
    dead = client.dequeue("bad.dlq")[0]
    assert dead.headers["x-dead-letter-reason"] == "nack"


def test_delay_and_nack_delay(client: Client) -> None:
    client.enqueue("later", "d", delay_ms=600)
    assert client.get_channel("later").counts.delayed == 1
    assert client.dequeue("later") == []
    m = client.dequeue("later", wait_ms=5000)[0]
    m.nack(delay_ms=500)
    assert client.dequeue("later") == []
    again, took = timed_dequeue(client, "later", 5000)
    assert again[0].attempt == 2 and 0.3 <= took < 1.5


def test_dedup(client: Client) -> None:
    a = client.enqueue("once", "first", dedup_id="order-1")
    b = client.enqueue("once", "second", dedup_id="order-1")
    assert a == b
    assert [m.body for m in client.dequeue("once", 10)] == ["first"]
    assert client.get_channel("once").totals.enqueued == 1


def test_max_length(client: Client) -> None:
    client.put_channel("small", max_length=2)
    client.enqueue_many("small", [1, 2])
    with pytest.raises(ChannelFull) as err:
        client.enqueue("small", 3)
    assert err.value.status == 429 and "max_length" in err.value.detail
    assert client.get_channel("small").counts.ready == 2


def test_ttl_dead_letters(client: Client) -> None:
    client.enqueue("fresh", "stale soon", ttl_ms=300)
    client.enqueue("fresh", "keeps", ttl_ms=60_000)
    dead: list[Message] = []
    wait_until(lambda: dead.extend(client.dequeue("fresh.dlq")) or dead, 5, "the TTL dead letter")
    assert dead[0].body == "stale soon"
    assert dead[0].headers["x-dead-letter-reason"] == "ttl"
    assert [m.body for m in client.dequeue("fresh", 10)] == ["keeps"]


def test_channel_admin(client: Client) -> None:
    client.enqueue_many("admin", [1, 2, 3])
    assert any(c.name == "admin" for c in client.list_channels())
    assert client.purge("admin") == 3
    client.delete_channel("admin")
    assert all(c.name != "admin" for c in client.list_channels())


def test_bad_input_through_the_client(client: Client, node: NodeProcess) -> None:
    with pytest.raises(InvalidRequest) as bad_name:
        client.enqueue("no spaces allowed", 1)
    assert bad_name.value.status == 422 and "channel name" in bad_name.value.detail
    with pytest.raises(PayloadTooLarge):
        client.enqueue("big", "x" * (256 * 1024 + 1))
    with pytest.raises(BadRequest):
        client.ack("orders", ["not a receipt"])
    with pytest.raises(BadRequest):  # well formed, but not issued by this node: forged
        client.ack("orders", ["1a-1"])
    with pytest.raises(InvalidRequest):
        client.dequeue("orders", 0)
    raw = httpx.post(
        f"{node.url}/channels/x/enqueue",
        content=b'{"messages": [{"body": ',
        headers={"content-type": "application/json"},
    )
    assert raw.status_code == 400 and raw.headers["content-type"] == "application/problem+json"
    enqueue = f"{node.url}/channels/x/enqueue"
    wrong = httpx.post(enqueue, json={"messages": [{"body": 1, "delay_ms": "1"}]})
    assert wrong.status_code == 422 and "delay_ms" in wrong.json()["detail"]
    too_many = httpx.post(enqueue, json={"messages": [{"body": 1}] * 1001})
    assert too_many.status_code == 413 and "MAX_BATCH" in too_many.json()["detail"]


def test_auth(node_factory: type[NodeProcess], tmp_path_factory: pytest.TempPathFactory) -> None:
    secured = node_factory(tmp_path_factory.mktemp("auth"), API_TOKEN="t0p-s3cret").start()
    with Client(secured.url) as anonymous, pytest.raises(Unauthorized):
        anonymous.enqueue("a", 1)
    with Client(secured.url, token="wrong") as wrong, pytest.raises(Unauthorized):
        wrong.list_channels()
    with Client(secured.url, token="t0p-s3cret") as good:
        good.enqueue("a", 1)
        assert good.dequeue("a")[0].body == 1
    assert httpx.get(secured.url + "/health").status_code == 200


def test_consume_acks_nacks_and_stops(client: Client) -> None:
    client.put_channel("work", max_attempts=3)
    client.enqueue_many("work", [{"n": i, "fail": i == 3} for i in range(10)])
    done: list[int] = []
    failures: list[int] = []
    stop = threading.Event()

    def handle(m: Message) -> None:
        if m.body["fail"] and m.attempt == 1:
            failures.append(m.body["n"])
            raise RuntimeError("first try fails")
        done.append(m.body["n"])
        if len(done) == 10:
            stop.set()

    worker = threading.Thread(
        target=client.consume, args=("work", handle), kwargs={"concurrency": 3, "stop": stop}
    )
    worker.start()
    worker.join(timeout=20)
    assert not worker.is_alive()
    assert sorted(done) == list(range(10)) and failures == [3]
    wait_until(lambda: client.get_channel("work").totals.acked == 10, 5, "the last acks")
    info = client.get_channel("work")
    assert (info.counts.ready, info.counts.in_flight) == (0, 0)


def test_consumer_that_hangs_up_mid_poll_loses_nothing(client: Client, node: NodeProcess) -> None:
    """A dequeue whose connection closes while it waits must not lease to no one."""
    addr = urlsplit(node.url)
    body = b'{"max": 1, "wait_ms": 10000}'
    with socket.create_connection((addr.hostname, addr.port)) as s:
        s.sendall(
            b"POST /channels/gone/dequeue HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
        )
        time.sleep(0.2)  # the node is now waiting for a message on its behalf
    client.enqueue("gone", "for a live consumer")
    got = client.dequeue("gone", wait_ms=2000)
    assert [m.body for m in got] == ["for a live consumer"] and got[0].attempt == 1
