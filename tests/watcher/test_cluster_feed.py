"""A real watcher fed by real pushers (tests/watcher/fake_node.py) that report a 2-shard cluster:
the browser feed carries the cluster section, and a `kill -9` of a primary whose backup takes
its shard over shows as a failed node and a failover in the timeline."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

from cluster_views import IDS, LEASE, A, B, C, cluster_doc, write_view
from watcher_harness import Feed, Proc, Processes, open_feed

INTERVAL_MS = 200
HEALTHY = {"s1": (A, 1, LEASE), "s2": (C, 1, LEASE)}
TAKEN = {"s1": (B, 2, LEASE), "s2": (C, 1, LEASE)}


def start_cluster(procs: Processes, watcher: Proc, tmp: Path) -> dict[str, tuple[Proc, Path]]:
    """A, B and C report their views (D, a backup, reports nothing: known from its peers)."""
    nodes = {}
    for url in (A, B, C):
        view = tmp / f"{IDS[url]}.json"
        write_view(view, cluster_doc(url, HEALTHY))
        proc = procs.fake_node(watcher.base_url, IDS[url], INTERVAL_MS, url, view)
        nodes[url] = (proc, view)
    return nodes


def card(feed: Feed, url: str) -> dict[str, Any]:
    return next((c for c in feed.cluster.get("nodes", []) if c["url"] == url), {})


def shard(feed: Feed, shard_id: str) -> dict[str, Any]:
    return next((s for s in feed.cluster.get("shards", []) if s["id"] == shard_id), {})


async def test_the_feed_shows_a_failover_when_a_primary_is_killed(
    procs: Processes, tmp_path: Path
) -> None:
    watcher = procs.watcher()
    nodes = start_cluster(procs, watcher, tmp_path)
    feed = await open_feed(watcher.base_url)
    # Each reports itself (a peer's word alone would make its card up too).
    await feed.until(
        lambda f: all(card(f, u).get("telemetry") == "up" for u in (A, B, C)), 20, "3 nodes up"
    )
    assert shard(feed, "s1")["owner"] == A and shard(feed, "s2")["channels"] == 20
    assert card(feed, A)["role"] == "primary" and card(feed, B)["role"] == "backup"
    assert card(feed, "http://127.0.0.1:7004")["status"] == "up"  # known from its peers
    assert feed.cluster["timeline"] == []

    proc_a, _ = nodes[A]
    proc_a.stop(signal.SIGKILL)
    await feed.until(lambda f: card(f, A).get("telemetry") == "down", 10, "A silent")
    for url in (B, C):
        write_view(nodes[url][1], cluster_doc(url, TAKEN, down=frozenset({A})))
    await feed.until(lambda f: bool(f.cluster["timeline"]), 10, "the failover")
    (event,) = feed.cluster["timeline"]
    assert (event["kind"], event["shard"], event["from"], event["to"], event["epoch"]) == (
        "failover",
        "s1",
        A,
        B,
        2,
    )
    assert event["to_id"] == "node-b" and 3 * INTERVAL_MS <= event["gap_ms"] < 30_000
    await feed.until(lambda f: card(f, A).get("status") == "failed", 5, "A failed")
    assert shard(feed, "s1")["owner"] == B and shard(feed, "s1")["epoch"] == 2
    assert card(feed, B)["owns"] == [{"shard": "s1", "epoch": 2}]
    # A page opened now gets it all in its first message.
    late = await open_feed(watcher.base_url)
    assert late.messages[0]["type"] == "hello"
    assert late.cluster["timeline"] == feed.cluster["timeline"]
    assert card(late, A)["status"] == "failed"
    for ws in (feed.ws, late.ws):
        await ws.close()
