"""Faults the other cluster tests do not combine: the bundled client (enqueues, consume loop)
across a failover and a set_nodes, a long poll whose owner dies under it, dead letters crossing
into a shard that fails over, a NODE_ID in use; slow: every node of a 3-node shard killed -9 in
turn under load (its two backups racing), set_nodes swapping and moving a primary, removing a
shard held by the backup that took it over, set_nodes out of the implicit shard."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import httpx
import pytest
from lionmq import Client
from lionmq.placement import shard_for

from tests.cluster.conftest import ClusterFactory
from tests.cluster.ledger import Ledger, problems, summary
from tests.cluster.load import Load, drain
from tests.cluster.nodes import API_TOKEN, Cluster, ClusterNode, channels_on
from tests.cluster.scenarios import shard_doc
from tests.conftest import free_port, wait_until

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


@pytest.mark.slow
def test_every_node_killed_in_turn_under_load(
    cluster_factory: ClusterFactory, ledger: Ledger, rounds: int = 3
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


def test_a_long_poll_forwarded_to_an_owner_that_dies_mid_poll_answers_503(
    cluster_factory: ClusterFactory,
) -> None:
    """A long-poll dequeue sent to a node that forwards it to the owner; the owner is killed -9
    while it holds the poll: the forwarding node answers 503 with Retry-After (never a 500, never
    hangs past the poll), and after the failover the same poll is served by the new owner."""
    cluster = cluster_factory([[0, 1], [2]])
    shard = cluster.shard_of_node(0)
    (channel,) = channels_on([shard], 1, "poll", among=cluster.shard_ids())
    forwarder = cluster.nodes[2]
    headers = {"authorization": f"Bearer {API_TOKEN}"}
    url = f"{forwarder.url}/channels/{channel}/dequeue"
    answers: list[httpx.Response | BaseException] = []

    def poll() -> None:
        try:
            answers.append(
                httpx.post(url, json={"max": 1, "wait_ms": 8000}, headers=headers, timeout=20)
            )
        except httpx.HTTPError as exc:
            answers.append(exc)

    poller = threading.Thread(target=poll, daemon=True)
    started = time.monotonic()
    poller.start()
    # the poll waits at the owner; then the owner dies under it
    wait_until(lambda: time.monotonic() - started > 0.5, 2, "the poll under way", 0.05)
    cluster.nodes[0].kill9()
    poller.join(15)
    assert not poller.is_alive() and len(answers) == 1
    (answer,) = answers
    assert isinstance(answer, httpx.Response), answer
    assert answer.status_code == 503, (answer.status_code, answer.text)
    assert answer.headers.get("retry-after")
    assert time.monotonic() - started < 8.0 + 2.0
    with httpx.Client(headers=headers, timeout=10) as http:

        def served() -> bool:
            r = http.post(url, json={"max": 1, "wait_ms": 0})
            return r.status_code == 200

        wait_until(served, 15, "the poll served after the failover", 0.1)


@pytest.mark.slow
def test_set_nodes_swapping_then_moving_a_shards_primary_under_load(
    cluster_factory: ClusterFactory, ledger: Ledger
) -> None:
    """set_nodes swaps a shard's primary and backup (the acting owner stays a member: it keeps
    the shard, nothing moves), then gives the shard to a node outside it (the owner lets go, the
    new primary takes it): nothing lost, no ack redelivered, no two owners at once."""
    cluster = cluster_factory([[0, 1]], spare=1)
    n = cluster.nodes
    (shard,) = cluster.shard_ids()
    channels = channels_on([shard], 3, "swap")
    with Load(cluster.urls, channels, ledger, API_TOKEN, visibility_ms=VISIBILITY_MS):
        base = ledger.confirmed_count()
        wait_until(lambda: ledger.confirmed_count() >= base + 30, 20, "enqueues")
        assert cluster.set_nodes([[1, 0]]).status_code == 200
        base = ledger.confirmed_count()
        wait_until(lambda: ledger.confirmed_count() >= base + 30, 20, "enqueues after the swap")
        assert cluster.owner(shard) == n[0].server_host, "the swap moved the acting owner"
        assert cluster.set_nodes([[2, 1]], via=cluster.nodes[1]).status_code == 200
        wait_until(
            lambda: cluster.owner(shard, n[2]) == n[2].server_host, 20, "node2 owning the shard"
        )
        base = ledger.confirmed_count()
        wait_until(lambda: ledger.confirmed_count() >= base + 30, 20, "enqueues after the move")
    judge(cluster, channels, ledger)


@pytest.mark.slow
def test_removing_a_shard_held_by_the_backup_that_took_it_over(
    cluster_factory: ClusterFactory, ledger: Ledger
) -> None:
    """s2's primary is killed -9, its backup takes s2 over, then set_nodes removes s2 (its dead
    primary too): the acting owner hands s2's channels to s1 and lets go; nothing is lost."""
    cluster = cluster_factory([[0], [1, 2]])
    n = cluster.nodes
    ids = cluster.shard_ids()
    s2 = cluster.shard_of_node(1)
    channels = channels_on(ids, 3, "rm")
    with Load(cluster.urls, channels, ledger, API_TOKEN, visibility_ms=VISIBILITY_MS):
        base = ledger.confirmed_count()
        wait_until(lambda: ledger.confirmed_count() >= base + 30, 20, "enqueues")
        n[1].kill9()
        wait_until(lambda: cluster.owner(s2, n[0]) == n[2].server_host, 20, "node2 owning s2")
        base = ledger.confirmed_count()
        wait_until(lambda: ledger.confirmed_count() >= base + 30, 20, "enqueues after takeover")
        assert cluster.set_nodes([[0]], via=n[0]).status_code == 200
        wait_until(
            lambda: cluster.shard_ids(n[0]) == [ids[0] if s2 != ids[0] else ids[1]], 10, "s2 gone"
        )
        for name in channels:
            wait_until(
                lambda c=name: cluster.route(c, n[0])["owner"] == n[0].server_host,
                10,
                f"{name} served by node0",
                0.05,
            )
        base = ledger.confirmed_count()
        wait_until(lambda: ledger.confirmed_count() >= base + 30, 20, "enqueues after removal")
    judge(cluster, channels, ledger)


def test_a_node_started_with_a_node_id_in_use_refuses_to_start(
    cluster_factory: ClusterFactory,
) -> None:
    """A second process with the NODE_ID of a live member (another URL) exits with one clear
    line instead of joining: leases are held by node id, so it would pass for its twin."""
    cluster = cluster_factory([[0, 1]])
    live = cluster.nodes[0]
    port = free_port()
    skip = {"PORT", "NODE_ID", "SERVER_HOST"}
    env = {k: v for k, v in live.env.items() if k not in skip and k not in os.environ}
    twin = ClusterNode(cluster.data_dir, 9, port, f"http://127.0.0.1:{port}", **env)
    twin.env["NODE_ID"] = live.node_id
    with pytest.raises(AssertionError, match="NODE_ID"):
        twin.start(15)
    assert twin.proc is not None and twin.proc.returncode not in (None, 0)
    # the cluster goes on: its owner still serves
    assert cluster.owner(cluster.shard_ids()[0]) == live.server_host


def test_client_consume_loop_across_a_failover_and_a_set_nodes(
    cluster_factory: ClusterFactory,
) -> None:
    """Client.consume runs while the channel's owner is killed -9 (its backup takes over) and
    then set_nodes moves the channel to a new shard on another node: every message enqueued is
    handled, every one ends acked (nothing left), and none is handled twice."""
    cluster = cluster_factory([[0, 1]], spare=1)
    n = cluster.nodes
    (s1,) = cluster.shard_ids()
    channel = next(
        f"consume-{i}" for i in range(1000) if shard_for(f"consume-{i}", (s1, "s2")) == "s2"
    )
    handled: list[int] = []
    stop = threading.Event()
    total = 300
    with Client(cluster.urls(), token=API_TOKEN) as producer:
        producer.put_channel(channel, visibility_ms=VISIBILITY_MS)

        def consume() -> None:
            with Client(cluster.urls(), token=API_TOKEN) as consumer:
                consumer.consume(channel, lambda m: handled.append(m.body["n"]), stop=stop)

        worker = threading.Thread(target=consume, daemon=True)
        worker.start()
        try:
            for n_ in range(total):
                producer.enqueue(channel, {"n": n_})
                if n_ == 100:
                    n[0].kill9()
                if n_ == 200:
                    assert cluster.set_nodes([[1], [2]], via=n[1]).status_code == 200
            wait_until(lambda: len(set(handled)) >= total, 30, "every message handled", 0.05)
        finally:
            stop.set()
            worker.join(20)
        assert not worker.is_alive()
        assert cluster.route(channel, n[1])["shard"] == "s2", "the channel did not move"
        counts = producer.get_channel(channel).counts
        assert (counts.ready, counts.delayed, counts.in_flight) == (0, 0, 0), counts
    assert sorted(set(handled)) == list(range(total))
    assert len(handled) == total, (
        f"handled twice: {sorted({h for h in handled if handled.count(h) > 1})}"
    )


def test_dead_letters_sent_across_shards_while_the_target_shard_fails_over(
    cluster_factory: ClusterFactory,
) -> None:
    """Messages dead-lettered from s1 into the default `<name>.dlq` (never created by a request),
    placed on s2, just as s2's owner is killed -9: the poke to it is lost, yet the backup that
    takes s2 over serves them, well before the 30 s audit."""
    cluster = cluster_factory([[0, 1], [2, 3]])
    n = cluster.nodes
    ids = cluster.shard_ids()
    s1, s2 = cluster.shard_of_node(0), cluster.shard_of_node(2)
    source = next(
        f"dl-{i}"
        for i in range(1000)
        if shard_for(f"dl-{i}", ids) == s1 and shard_for(f"dl-{i}.dlq", ids) == s2
    )
    target = f"{source}.dlq"
    with Client(cluster.urls(), token=API_TOKEN) as client:
        client.enqueue_many(source, [{"n": i} for i in range(20)])
        got = client.dequeue(source, 20, visibility_ms=VISIBILITY_MS)
        assert len(got) == 20
        n[2].kill9()
        client.nack(source, [m.receipt for m in got], dead_letter=True)
        started = time.monotonic()
        seen: list[int] = []

        def all_dead_letters() -> bool:
            try:
                batch = client.dequeue(target, 20, visibility_ms=VISIBILITY_MS)
            except Exception:  # the shard may have no owner yet: the next round asks again
                return False
            seen.extend(m.body["n"] for m in batch)
            if batch:
                client.ack(target, [m.receipt for m in batch])
            return len(seen) >= 20

        wait_until(all_dead_letters, 15, "the dead letters served on the target", 0.1)
    assert sorted(seen) == list(range(20))
    assert time.monotonic() - started < 15


@pytest.mark.slow
def test_set_nodes_from_the_implicit_shard_into_two_shards_under_load(tmp_path: Path) -> None:
    """Two nodes on one store with no topology (an owner and its standby), then set_nodes makes
    them the primaries of two shards: the implicit shard's channels are handed over, half to the
    standby, with nothing lost or redelivered."""
    cluster = Cluster.build(tmp_path, [[0], [1]], CLUSTER_INIT="")
    first, second = cluster.nodes
    ledger = Ledger()
    channels = [f"implicit-{i}" for i in range(6)]
    try:
        first.start()
        second.start()
        wait_until(
            lambda: shard_doc(cluster.view(second), "s0")["owner"] == first.server_host,
            10,
            "the first node owning s0",
        )
        with Load(cluster.urls, channels, ledger, API_TOKEN, visibility_ms=VISIBILITY_MS):
            base = ledger.confirmed_count()
            wait_until(lambda: ledger.confirmed_count() >= base + 30, 20, "enqueues")
            assert cluster.set_nodes([[0], [1]], via=first).status_code == 200
            wait_until(
                lambda: (
                    [s["owner"] for s in cluster.view(first)["shards"]]  # one reading
                    == [n.server_host for n in cluster.nodes]
                ),
                15,
                "each primary owning its shard",
                0.1,
            )
            both = {first.server_host, second.server_host}
            wait_until(
                lambda: (
                    {cluster.route(c, n)["owner"] for c in channels for n in cluster.nodes} == both
                ),
                5,
                "every channel routed to its new owner by every node",
                0.05,
            )
            base = ledger.confirmed_count()
            wait_until(lambda: ledger.confirmed_count() >= base + 30, 20, "enqueues after")
        judge(cluster, channels, ledger)
    finally:
        cluster.stop()


def test_a_graceful_stop_of_a_primary_hands_its_shard_over_at_once(
    cluster_factory: ClusterFactory, ledger: Ledger
) -> None:
    """SIGTERM of a shard's owner under load (a rolling restart, default timings): its backup
    serves well within LEASE_MS (no crash to wait out); the node comes back as a backup; the
    books hold."""
    cluster = cluster_factory([[0, 1]], heartbeat_ms=500, lease_ms=2000)
    n = cluster.nodes
    (shard,) = cluster.shard_ids()
    channels = channels_on([shard], 3, "graceful")
    with Load(cluster.urls, channels, ledger, API_TOKEN, visibility_ms=VISIBILITY_MS):
        base = ledger.confirmed_count()
        wait_until(lambda: ledger.confirmed_count() >= base + 30, 20, "enqueues")
        started = time.monotonic()
        n[0].stop()
        stopped = time.monotonic() - started
        wait_until(lambda: cluster.owner(shard, n[1]) == n[1].server_host, 10, "node1 owning")
        handed = time.monotonic() - started
        assert handed - stopped < 1.0, (stopped, handed)
        n[0].restart()
        base = ledger.confirmed_count()
        wait_until(lambda: ledger.confirmed_count() >= base + 30, 20, "enqueues after")
        assert cluster.owner(shard, n[0]) == n[1].server_host, "taken back by the restarted node"
    judge(cluster, channels, ledger)
