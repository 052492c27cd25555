"""Browsing and redrive through any node of a cluster: 2 shards, 2 node processes on one SQLite
file; every call goes to the node that does not own the channel asked about, and is forwarded to
its owner. The dead letters cross shards both ways: dead-lettered from a channel of one shard
into a DLQ of the other, then redriven back."""

from __future__ import annotations

import httpx
import pytest

from tests.cluster.conftest import ClusterFactory
from tests.cluster.nodes import api_auth, channels_on

pytestmark = pytest.mark.cluster

FORWARDED_BY = "x-lionmq-forwarded-by"


def test_peek_and_redrive_through_a_node_that_does_not_own_the_channel(
    cluster_factory: ClusterFactory,
) -> None:
    cluster = cluster_factory([[0], [1]])
    n0, n1 = cluster.nodes
    # `dlq` is served by node0, `orders` by node1.
    dlq, orders = channels_on([cluster.shard_of_node(0), cluster.shard_of_node(1)], 1, "browse")

    def call(via: str, method: str, path: str, **kwargs: object) -> httpx.Response:
        r = httpx.request(method, via + path, headers=api_auth(), timeout=10, **kwargs)  # type: ignore[arg-type]
        assert r.status_code < 300, (method, path, r.text)
        return r

    settings = {"max_attempts": 1, "dead_letter": dlq}
    call(n0.url, "PUT", f"/channels/{orders}", json=settings)
    bodies = [{"body": {"n": i}} for i in range(3)]
    call(n0.url, "POST", f"/channels/{orders}/enqueue", json={"messages": bodies})
    got = call(n0.url, "POST", f"/channels/{orders}/dequeue", json={"max": 3}).json()
    receipts = [m["receipt"] for m in got["messages"]]
    call(
        n0.url, "POST", f"/channels/{orders}/nack", json={"receipts": receipts, "dead_letter": True}
    )

    # Peek at the DLQ through node1, which does not own it.
    peeked = call(n1.url, "GET", f"/channels/{dlq}/messages")
    assert peeked.headers[FORWARDED_BY] == n1.node_id
    page = peeked.json()
    assert page["channel"] == dlq and page["next"] is None
    assert [m["body"] for m in page["messages"]] == [{"n": 0}, {"n": 1}, {"n": 2}]
    assert {m["state"] for m in page["messages"]} == {"ready"}
    assert all(m["headers"]["x-dead-letter-channel"] == orders for m in page["messages"])
    first = page["messages"][0]
    one = call(n1.url, "GET", f"/channels/{dlq}/messages/{first['id']}")
    assert one.headers[FORWARDED_BY] == n1.node_id
    assert one.json() == {**first, "history": None}

    # Redrive through node1 as well: node0 moves them back into node1's shard.
    done = call(n1.url, "POST", f"/channels/{dlq}/redrive", json={})
    assert done.headers[FORWARDED_BY] == n1.node_id
    assert done.json() == {"moved": 3, "skipped": 0, "remaining": 0}
    back = call(n0.url, "POST", f"/channels/{orders}/dequeue", json={"max": 3, "wait_ms": 3000})
    messages = back.json()["messages"]
    assert [m["body"] for m in messages] == [{"n": 0}, {"n": 1}, {"n": 2}]
    assert all(m["attempt"] == 1 for m in messages)
    assert all(m["headers"]["x-redriven-from"] == dlq for m in messages)
    assert call(n0.url, "GET", f"/channels/{dlq}/messages").json()["messages"] == []
