"""Faults the other cluster tests do not combine: the bundled client across a failover (its
retried enqueues keep their dedup ids: exactly one copy), a 3-node shard whose two backups race
for it (exactly one wins), and every node killed -9 in turn under load."""

from __future__ import annotations

import threading
import time

import pytest
from lionmq import Client

from tests.cluster.conftest import ClusterFactory
from tests.cluster.ledger import Ledger, problems, summary
from tests.cluster.load import Load, drain
from tests.cluster.nodes import API_TOKEN, Cluster, channels_on
from tests.cluster.scenarios import shard_doc
from tests.conftest import wait_until

pytestmark = pytest.mark.cluster

VISIBILITY_MS = 4000


def judge(cluster: Cluster, channels: list[str], ledger: Ledger) -> None:
    drain(cluster.urls, channels, ledger, API_TOKEN, VISIBILITY_MS, 30)
    books = ledger.books()
    found = problems(books)
    assert found == [], f"{len(found)} broken promises ({summary(books)}):\n" + "\n".join(
        found[:30]
    )


def test_client_enqueues_across_a_failover_leave_exactly_one_copy(
    cluster_factory: ClusterFactory,
) -> None:
    """Client([seeds]) enqueues one message at a time while the shard's owner is killed -9:
    every enqueue returns (the client rides out the failover) and a drain finds each body once."""
    cluster = cluster_factory([[0, 1]])
    (channel,) = channels_on(cluster.shard_ids(), 1, "client")
    sent: list[int] = []
    failed: list[BaseException] = []
    stop = threading.Event()

    def produce() -> None:
        with Client(cluster.urls(), token=API_TOKEN) as client:
            for n in range(100_000):
                if stop.is_set():
                    return
                try:
                    client.enqueue(channel, {"n": n})
                except Exception as exc:  # reported by the test
                    failed.append(exc)
                    return
                sent.append(n)

    producer = threading.Thread(target=produce, daemon=True)
    producer.start()
    try:
        wait_until(lambda: len(sent) >= 30, 20, "30 enqueues before the kill")
        owner = cluster.node_at(shard_doc(cluster.view(), cluster.shard_ids()[0])["owner"])
        at_kill = len(sent)
        owner.kill9()
        wait_until(lambda: len(sent) >= at_kill + 30 or bool(failed), 20, "enqueues after it")
    finally:
        stop.set()
        producer.join(20)
    assert not producer.is_alive() and failed == []
    seen: list[int] = []
    with Client(cluster.urls(), token=API_TOKEN) as client:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            batch = client.dequeue(channel, 100, visibility_ms=VISIBILITY_MS)
            if not batch:
                break
            seen += [m.body["n"] for m in batch]
            client.ack(channel, [m.receipt for m in batch])
    copies = {n: seen.count(n) for n in set(seen)}
    assert sorted(copies) == sent, "a confirmed enqueue missing, or one never confirmed stored"
    assert [n for n, c in copies.items() if c > 1] == [], "enqueues stored twice"


@pytest.mark.parametrize("rounds", [1, pytest.param(3, marks=pytest.mark.slow)])
def test_every_node_killed_in_turn_under_load(
    cluster_factory: ClusterFactory, ledger: Ledger, rounds: int
) -> None:
    """One shard of three nodes: each node in turn (owner or backup) is killed -9 under load and
    restarted; when the owner dies its two backups race for the shard and exactly one serves it
    (the books find no delivery by two owners at once, no loss, no redelivery of an ack)."""
    cluster = cluster_factory([[0, 1, 2]])
    (shard,) = cluster.shard_ids()
    channels = channels_on([shard], 3, "turn")
    with Load(cluster.urls, channels, ledger, API_TOKEN, visibility_ms=VISIBILITY_MS):
        for _ in range(rounds):
            for node in cluster.nodes:
                base = ledger.confirmed_count()
                wait_until(lambda b=base: ledger.confirmed_count() >= b + 30, 20, "enqueues")
                epoch = shard_doc(cluster.view(), shard)["epoch"]
                node.kill9()
                node.restart()
                wait_until(
                    lambda e=epoch: (
                        (doc := shard_doc(cluster.view(), shard))["owner"] is not None
                        and doc["epoch"] >= e
                    ),
                    20,
                    "an owner again",
                )
                base = ledger.confirmed_count()
                wait_until(lambda b=base: ledger.confirmed_count() >= b + 30, 20, "enqueues after")
    judge(cluster, channels, ledger)
