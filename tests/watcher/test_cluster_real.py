"""The watcher fed by real cluster nodes (`python -m app`, tests/cluster's harness): the feed
shows each node's role and shard, and a `kill -9` of a primary as a failed node and a failover
to its backup in the timeline. (test_cluster_feed.py drives the same page from written views.)"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from watcher_harness import TOKEN, Feed, Processes, open_feed

from tests.cluster.nodes import Cluster


def card(feed: Feed, url: str) -> dict[str, Any]:
    return next((c for c in feed.cluster.get("nodes", []) if c["url"] == url), {})


def owner(feed: Feed, shard: str) -> str | None:
    found = next((s for s in feed.cluster.get("shards", []) if s["id"] == shard), {})
    return found.get("owner")


async def test_real_nodes_show_roles_and_a_failover(procs: Processes, tmp_path: Path) -> None:
    watcher = procs.watcher()
    cluster = Cluster.build(
        tmp_path,
        [[0, 1], [2, 3]],
        WATCHER_URL=watcher.base_url.replace("http://", "ws://") + "/ingest",
        WATCHER_TOKEN=TOKEN,
        METRICS_INTERVAL_MS="200",
    )
    try:
        cluster.start()
        primary, backup = cluster.nodes[0], cluster.nodes[1]
        s1 = cluster.shard_ids()[0]
        feed = await open_feed(watcher.base_url)
        urls = [n.server_host for n in cluster.nodes]
        await feed.until(
            lambda f: all(card(f, u).get("telemetry") == "up" for u in urls), 20, "4 nodes up"
        )
        assert owner(feed, s1) == primary.server_host
        assert card(feed, primary.server_host)["role"] == "primary"
        assert card(feed, backup.server_host)["role"] == "backup"

        primary.kill9()
        await feed.until(lambda f: owner(f, s1) == backup.server_host, 15, "the backup owns s1")
        await feed.until(
            lambda f: any(e["kind"] == "failover" for e in f.cluster["timeline"]),
            10,
            "the failover",
        )
        (event,) = (e for e in feed.cluster["timeline"] if e["kind"] == "failover")
        assert (event["kind"], event["shard"], event["from"], event["to"]) == (
            "failover",
            s1,
            primary.server_host,
            backup.server_host,
        )
        await feed.until(
            lambda f: card(f, primary.server_host).get("status") == "failed", 10, "failed card"
        )
        await feed.ws.close()
    finally:
        cluster.stop()
