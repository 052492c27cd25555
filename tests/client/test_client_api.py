"""Each operation of both clients: what goes out, what comes back."""

from __future__ import annotations

import json

import httpx
import lionmq
import pytest
from lionmq import AsyncClient, Client
from lionmq_fake import FakeNode


def test_enqueue_dequeue_and_settle_through_messages(client: Client, node: FakeNode) -> None:
    ids = client.enqueue_many("jobs", [{"n": 1}, {"n": 2}, {"n": 3}])
    assert client.enqueue("jobs", "four", headers={"trace": "t"}) not in ids

    one, two, three, four = client.dequeue("jobs", 10, wait_ms=0)
    assert [one.id, two.id, three.id] == ids
    assert (one.channel, one.body, one.attempt, one.headers) == ("jobs", {"n": 1}, 1, {})
    assert four.headers == {"trace": "t"} and four.enqueued_at == 1_700_000_000_000
    assert "jobs" in repr(one)

    assert one.ack().acked == 1 and one.settled
    assert two.nack(delay_ms=500, dead_letter=True).nacked == 1 and two.settled
    assert three.extend(60_000).extended == 1 and not three.settled
    assert one.ack().stale == [one.receipt]

    nack = node.bodies("/nack")[0]
    assert nack == {"receipts": [two.receipt], "delay_ms": 500, "dead_letter": True}
    assert node.bodies("/extend")[0] == {"receipts": [three.receipt], "visibility_ms": 60_000}


def test_settle_by_receipts(client: Client, node: FakeNode) -> None:
    node.seed("jobs", 3)
    a, b, c = (m.receipt for m in client.dequeue("jobs", 3))
    assert client.ack("jobs", [a, "nope"]) == lionmq.AckResult(stale=["nope"], acked=1)
    assert client.nack("jobs", [b]).nacked == 1
    assert client.extend("jobs", c, 2000).extended == 1  # a lone receipt is one receipt
    assert node.bodies("/nack")[0] == {"receipts": [b], "delay_ms": 0, "dead_letter": False}


def test_dequeue_long_poll_extends_the_read_timeout(client: Client, node: FakeNode) -> None:
    assert client.dequeue("jobs", 5, wait_ms=20_000, visibility_ms=5000) == []
    request = node.requests[0]
    assert json.loads(request.content) == {"max": 5, "wait_ms": 20_000, "visibility_ms": 5000}
    timeout = request.extensions["timeout"]
    assert timeout["read"] == pytest.approx(30.0) and timeout["connect"] == 10.0
    client.dequeue("jobs")
    assert json.loads(node.requests[1].content) == {"max": 1, "wait_ms": 0}
    assert node.requests[1].extensions["timeout"]["read"] == 10.0


def test_channel_operations(client: Client, node: FakeNode) -> None:
    info = client.put_channel("jobs", max_attempts=3, dead_letter=None)
    assert node.bodies("/jobs")[0] == {"max_attempts": 3, "dead_letter": None}
    assert isinstance(info, lionmq.ChannelInfo)
    assert (info.name, info.settings.max_attempts, info.settings.visibility_ms) == (
        "jobs",
        3,
        30000,
    )
    node.seed("jobs", 2)
    assert client.get_channel("jobs").counts.ready == 2
    assert [c.name for c in client.list_channels()] == ["jobs"]
    assert client.purge("jobs") == 2
    assert client.delete_channel("jobs") is None
    with pytest.raises(lionmq.ChannelNotFound):
        client.delete_channel("jobs")


def test_health_and_ready(client: Client, node: FakeNode) -> None:
    assert client.health() == {"status": "ok", "node": "fake"}
    assert client.ready() is True
    node.ready_status = 503
    assert client.ready() is False
    assert len(node.requests) == 3  # "not ready" is an answer, not retried


def test_channel_names_are_quoted(client: Client, node: FakeNode) -> None:
    with pytest.raises(lionmq.ChannelNotFound):
        client.get_channel("a/b")
    assert node.requests[0].url.raw_path == b"/channels/a%2Fb"


def test_tolerates_unknown_and_missing_fields() -> None:
    info = {"name": "x", "extra": 1, "counts": {"ready": 4, "new_counter": 9}}
    transport = httpx.MockTransport(lambda r: httpx.Response(200, json=info))
    with Client("http://node", transport=transport) as client:
        got = client.get_channel("x")
    assert got.counts.ready == 4 and got.totals.acked == 0 and got.oldest_ready_age_ms is None


async def test_async_client_mirrors_the_sync_one(aclient: AsyncClient, node: FakeNode) -> None:
    ids = await aclient.enqueue_many("jobs", range(5))
    assert await aclient.enqueue("jobs", "x", dedup_id="d") == await aclient.enqueue(
        "jobs", "y", dedup_id="d"
    )
    messages = await aclient.dequeue("jobs", 10, wait_ms=100)
    assert [m.id for m in messages][:5] == ids and len(messages) == 6
    assert isinstance(messages[0], lionmq.AsyncMessage)
    assert (await messages[0].ack()).acked == 1
    assert (await messages[1].nack(delay_ms=10)).nacked == 1
    assert (await messages[2].extend(5000)).extended == 1
    assert (await aclient.ack("jobs", [messages[3].receipt])).acked == 1
    assert (await aclient.nack("jobs", [messages[4].receipt], dead_letter=True)).nacked == 1
    assert (await aclient.extend("jobs", [messages[5].receipt], 1000)).extended == 1
    assert (await aclient.put_channel("jobs", ttl_ms=None)).settings.ttl_ms is None
    assert (await aclient.get_channel("jobs")).counts.ready == 1  # the dead-lettered one went
    assert len(await aclient.list_channels()) == 1
    assert await aclient.purge("jobs") == 1
    await aclient.delete_channel("jobs")
    assert (await aclient.health())["status"] == "ok"
    assert await aclient.ready()


async def test_async_errors_and_retries(aclient: AsyncClient, node: FakeNode) -> None:
    node.faults.extend([503, httpx.ConnectError])
    assert (await aclient.health())["status"] == "ok"
    node.faults.extend([httpx.ConnectError] * 3)
    with pytest.raises(lionmq.ConnectionFailed):
        await aclient.health()
    with pytest.raises(lionmq.ChannelNotFound):
        await aclient.get_channel("missing")
    node.faults.append("lost")
    await aclient.enqueue_many("jobs", [1, 2])
    assert len(node.channel("jobs").ready) == 2
