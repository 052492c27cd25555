"""Rolling restarts of a cluster's nodes, as the tests (test_rolling.py) and `python -m bench
cluster` run them: each node stopped with SIGTERM while it owns a shard (so each stop is a
hand-off to its up-to-date backup, app/cluster/handoff.py), started again and waited for until
it is a caught-up backup, under producers, consumers and a probe on each channel every 20 ms.

A channel's unavailability is the longest gap between the probes' successes around a stop.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.cluster.ledger import Ledger, longest_outage
from tests.cluster.load import Load, Probe, drain
from tests.cluster.nodes import (
    API_TOKEN,
    HTTP_TIMEOUT,
    Cluster,
    ClusterNode,
    api_auth,
    channels_on,
)
from tests.cluster.scenarios import shard_doc, wait_role
from tests.conftest import wait_until

VISIBILITY_MS = 4000
STOP_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Stop:
    node: str
    shard: str
    handed_to: str
    stopped_in_s: float  # SIGTERM to the process's exit
    worst_s: float  # the longest any channel of the shard answered nothing around the stop
    epoch_before: int
    epoch_after: int
    back_in_s: float  # from the start again until it was a caught-up backup
    took_ms: int  # the hand-off as the old owner timed it (shard refused -> new owner serving)


def backup_lag(owner: ClusterNode, backup: ClusterNode, shard: str) -> float | None:
    """The beats `backup` is behind on `shard` by its owner's count (/metrics
    `lionmq_backup_lag`): the count a hand-off judges "up to date" by. None: not listed."""
    r = httpx.get(owner.url + "/metrics", headers=api_auth(), timeout=HTTP_TIMEOUT)
    r.raise_for_status()
    for family in text_string_to_metric_families(r.text):
        for sample in family.samples:
            wanted = {"shard": shard, "backup": backup.server_host}
            if sample.name == "lionmq_backup_lag" and sample.labels == wanted:
                return float(sample.value)
    return None


def wait_caught_up(owner: ClusterNode, backup: ClusterNode, shard: str, timeout: float) -> None:
    wait_until(
        lambda: backup_lag(owner, backup, shard) == 0,
        timeout,
        f"{backup.node_id} up to date on {shard} by {owner.node_id}'s count",
        0.05,
    )


def owned_shard(cluster: Cluster, node: ClusterNode) -> tuple[str, int] | None:
    """The shard `node` owns now and its epoch, as another node sees it."""
    via = next(n for n in cluster.serving() if n is not node)
    for s in cluster.view(via)["shards"]:
        if s["owner"] == node.server_host:
            return s["id"], int(s["epoch"])
    return None


def restart_gracefully(
    cluster: Cluster, node: ClusterNode, channels: dict[str, list[str]], ledger: Ledger
) -> Stop:
    """SIGTERM the node, wait for its exit, start it again and wait until it is a backup whose
    mirror lag is 0 (the next hand-off needs an up-to-date backup). The shard it owned must
    have gone to its other member at the next epoch, without waiting for the lease to lapse."""
    held = owned_shard(cluster, node)
    assert held is not None, f"{node.node_id} owns no shard: every stop here is a hand-off"
    shard, epoch = held
    began = time.time()
    assert node.proc is not None
    node.proc.terminate()
    node.proc.wait(timeout=STOP_TIMEOUT_S)
    ended = time.time()
    other = next(n for n in cluster.serving())
    doc = shard_doc(cluster.view(other), shard)
    # A hand-off, not a release then a take: the epoch moved once, and the new owner is the
    # shard's other member.
    assert doc["epoch"] == epoch + 1, (doc, epoch)
    assert doc["owner"] not in (None, node.server_host), doc
    successor = cluster.node_at(doc["owner"])
    # Handed over by the stopped node (its last member report says so), not released.
    last = cluster.view(other)["last_handoff"]
    assert last is not None and last["epoch"] == epoch + 1, last
    assert (last["from"], last["to"]) == (node.server_host, successor.server_host), last
    # Unavailability: the longest gap between successes of any channel of the shard, from
    # the SIGTERM until some probes answered after the exit.
    wait_until(
        lambda: all(
            any(op.ok and op.ended > ended for op in ledger.books().ops if op.channel == c)
            for c in channels[shard]
        ),
        10,
        "every probed channel answered after the stop",
        0.05,
    )
    ops = ledger.books().ops
    worst = max(longest_outage(ops, c, began, ended) for c in channels[shard])
    restarted = time.monotonic()
    node.restart()
    wait_role(cluster, node, "backup", successor, 20)
    wait_caught_up(successor, node, shard, 20)
    back = time.monotonic() - restarted
    return Stop(
        node.node_id,
        shard,
        successor.node_id,
        ended - began,
        worst,
        epoch,
        epoch + 1,
        back,
        int(last["took_ms"]),
    )


def roll(cluster: Cluster, ledger: Ledger, rounds: int, shards: int) -> list[Stop]:
    """Restart both members of the first `shards` shards `rounds` times under load (on every
    shard's channels), each one when it owns its shard; then drain every channel, so the
    caller can judge the books."""
    ids = cluster.shard_ids()
    probed = channels_on(ids, 2, "roll-probe")
    loaded = channels_on(ids, 2, "roll")
    by_shard = {s: probed[2 * i : 2 * i + 2] for i, s in enumerate(ids)}  # grouped by shard
    stops: list[Stop] = []
    probes = [Probe(cluster.urls, c, ledger, API_TOKEN).start() for c in probed]
    try:
        with Load(cluster.urls, loaded, ledger, API_TOKEN, visibility_ms=VISIBILITY_MS):
            wait_until(lambda: ledger.confirmed_count() >= 50, 20, "50 enqueues")
            # A backup started after its primary (as the cluster starts) catches up first.
            for shard in ids[:shards]:
                doc = shard_doc(cluster.view(), shard)
                owner = cluster.node_at(doc["owner"])
                for url in [doc["primary"], *doc["backups"]]:
                    if url != owner.server_host:
                        wait_caught_up(owner, cluster.node_at(url), shard, 20)
            for _ in range(rounds):
                # Per shard, its owner, then the member it handed the shard to: each node
                # once per round, and each stop a hand-off.
                for shard in ids[:shards]:
                    for _ in range(2):
                        owner = cluster.node_at(shard_doc(cluster.view(), shard)["owner"])
                        stops.append(restart_gracefully(cluster, owner, by_shard, ledger))
    finally:
        for p in probes:
            p.stop()
    drain(cluster.urls, probed + loaded, ledger, API_TOKEN, VISIBILITY_MS, 60)
    return stops


def describe(stops: Sequence[Stop]) -> str:
    """A line per stop and the worst unavailability, for a test's output or the benchmark."""
    lines = [
        f"  {s.node} ({s.shard}, epoch {s.epoch_before} -> {s.epoch_after}, to"
        f" {s.handed_to}): hand-off {s.took_ms} ms, exit {s.stopped_in_s * 1000:.0f} ms after"
        f" SIGTERM, longest unavailability {s.worst_s * 1000:.0f} ms; a caught-up backup again"
        f" {s.back_in_s:.1f} s after its start"
        for s in stops
    ]
    worst = max(s.worst_s for s in stops)
    lines.append(f"  longest unavailability of any channel: {worst * 1000:.0f} ms")
    return "\n".join(lines)
