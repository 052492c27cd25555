"""A real watcher process fed by a real node process (`python -m app`): what the browser feed
reports matches what was done to the node through its HTTP API, and a killed node turns down."""

from __future__ import annotations

import itertools
import signal
import time
from typing import Any

import httpx
import pytest
from watcher_harness import Feed, Processes, node_available, open_feed

pytestmark = pytest.mark.skipif(not node_available(), reason="the node (app/main.py) is missing")

INTERVAL_MS = 200


def channel(feed: Feed, node_id: str, name: str) -> dict[str, Any] | None:
    node = feed.nodes.get(node_id)
    if node is None:
        return None
    return next((c for c in node["channels"] if c["name"] == name), None)


def channel_updates(feed: Feed, node_id: str, name: str) -> list[tuple[int, dict[str, Any]]]:
    """(node time, channel) for every snapshot of `node_id` the feed delivered."""
    out = []
    for msg in feed.messages:
        if msg["type"] == "node" and msg["node"]["id"] == node_id:
            for ch in msg["node"]["channels"]:
                if ch["name"] == name:
                    out.append((msg["node"]["ts_ms"], ch))
    return out


async def test_the_feed_reports_a_real_nodes_channel_and_its_death(procs: Processes) -> None:
    watcher = procs.watcher()
    node = procs.node(watcher, "it-node-1", interval_ms=INTERVAL_MS)
    feed = await open_feed(watcher.base_url)
    await feed.until(lambda f: "it-node-1" in f.nodes, 5, "the node's first snapshot")
    view = feed.nodes["it-node-1"]
    assert view["status"] == "up" and view["url"] == node.base_url
    assert view["role"] == "standalone" and view["ip"] == "127.0.0.1"
    assert view["store"] == {"kind": "sqlite", "healthy": True}
    assert view["interval_ms"] == INTERVAL_MS and view["memory_rss_bytes"] > 0

    async with httpx.AsyncClient(base_url=node.base_url, timeout=5) as http:
        batch = {"messages": [{"body": {"n": i}} for i in range(10)]}
        assert (await http.post("/channels/work/enqueue", json=batch)).status_code == 201
        await feed.until(
            lambda f: (c := channel(f, "it-node-1", "work")) is not None and c["ready"] == 10,
            5,
            "10 ready messages",
        )
        got = (await http.post("/channels/work/dequeue", json={"max": 4})).json()["messages"]
        assert len(got) == 4
        receipts = [m["receipt"] for m in got]
        await feed.until(
            lambda f: (
                (c := channel(f, "it-node-1", "work")) is not None
                and (c["ready"], c["in_flight"]) == (6, 4)
            ),
            5,
            "4 in flight",
        )
        await http.post("/channels/work/ack", json={"receipts": receipts[:3]})
        await http.post("/channels/work/nack", json={"receipts": receipts[3:], "delay_ms": 60_000})

    def settled(f: Feed) -> bool:
        c = channel(f, "it-node-1", "work")
        return c is not None and (c["ready"], c["delayed"], c["in_flight"]) == (6, 1, 0)

    await feed.until(settled, 5, "the acks and the nack")
    ch = channel(feed, "it-node-1", "work")
    assert ch is not None
    assert (ch["enqueued_total"], ch["dequeued_total"]) == (10, 4)
    assert (ch["acked_total"], ch["nacked_total"]) == (3, 1)

    # Every rate the feed carried is that snapshot's counter delta over the node's time between
    # snapshots; together they account for every message.
    updates = channel_updates(feed, "it-node-1", "work")
    for (t0, before), (t1, after) in itertools.pairwise(updates):
        if t1 <= t0:
            continue
        for rate, total in [
            ("enqueue_rate", "enqueued_total"),
            ("dequeue_rate", "dequeued_total"),
            ("ack_rate", "acked_total"),
            ("nack_rate", "nacked_total"),
        ]:
            expected = (after[total] - before[total]) / ((t1 - t0) / 1000)
            assert after[rate] == pytest.approx(expected, rel=0.01, abs=0.01), (rate, t0, t1)
    assert any(c["enqueue_rate"] > 0 for _, c in updates)
    assert any(c["ack_rate"] > 0 for _, c in updates)
    assert any(c["ack_p50_ms"] is not None for _, c in updates)
    assert feed.history["it-node-1"], "history points reached the feed"

    # Kill the node outright: it turns down within three of its intervals (plus a sweep).
    node.stop(signal.SIGKILL)
    killed = time.monotonic()
    await feed.until(lambda f: f.nodes["it-node-1"]["status"] == "down", 5, "the node down")
    assert time.monotonic() - killed < 3 * INTERVAL_MS / 1000 + 1.0
    await feed.ws.close()
