"""Rolling restarts: every node of a 2-shard cluster (primary + backup each) stopped with
SIGTERM and started again, one by one, under producers, consumers and a probe per channel.

Each stop of a shard's owner hands the shard to its up-to-date backup (app/cluster/handoff.py)
before the node exits; the node comes back as that shard's backup and catches up before the
next one goes. Judged by the books: no confirmed enqueue lost, no acked message delivered
again, no 5xx but 503, no refusal; and the longest time any channel answered no request,
measured from the probes' successes, printed and held to the 300 ms the issue promises.
"""

from __future__ import annotations

import time

import pytest

from tests.cluster.conftest import ClusterFactory
from tests.cluster.ledger import Ledger, problems, summary
from tests.cluster.rolling import describe, roll

pytestmark = pytest.mark.cluster

UNAVAILABLE_GOAL_S = 0.3  # the bound on a channel's unavailability in a hand-off


@pytest.mark.parametrize(
    ("rounds", "shards"),
    [
        # The default suite's version: both members of one shard (4 s of the ~20 a run takes
        # is each restart; the cluster's start is the rest), under load on both shards.
        (1, 1),
        # Every node of the cluster, three times over.
        pytest.param(3, 2, marks=pytest.mark.slow),
    ],
)
def test_rolling_restart_under_load(
    cluster_factory: ClusterFactory, ledger: Ledger, rounds: int, shards: int
) -> None:
    """2 shards x (primary + backup): each node restarted (SIGTERM) while it owns a shard, so
    every stop is a hand-off; nothing confirmed is lost, nothing acked comes back, and no
    channel is unavailable for more than 300 ms."""
    started = time.monotonic()
    cluster = cluster_factory([[0, 1], [2, 3]])
    print(f"\ncluster up in {time.monotonic() - started:.1f} s")
    stops = roll(cluster, ledger, rounds, shards)
    books = ledger.books()
    found = problems(books)
    assert found == [], f"{len(found)} broken promises ({summary(books)}):\n" + "\n".join(
        found[:30]
    )
    assert len({s.node for s in stops}) == 2 * shards, stops
    print(f"rolling restart, {len(stops)} stops ({summary(books)}):\n{describe(stops)}")
    worst = max(s.worst_s for s in stops)
    assert worst <= UNAVAILABLE_GOAL_S, [f"{s.node}: {s.worst_s * 1000:.0f} ms" for s in stops]
