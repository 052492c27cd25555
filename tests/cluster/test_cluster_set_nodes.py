"""set_nodes under load: adding a third shard moves only its share of the channels, all onto
it, with nothing lost or redelivered and each moved channel unavailable at most 1 s; removing
it again brings exactly those channels back."""

from __future__ import annotations

import pytest
from lionmq.placement import shard_for

from tests.cluster.conftest import ClusterFactory
from tests.cluster.ledger import Ledger, problems, summary
from tests.cluster.load import Load, drain
from tests.cluster.nodes import API_TOKEN
from tests.cluster.scenarios import moving_channels, reshape, routes

pytestmark = pytest.mark.cluster

MOVE_GOAL_S = 1.0
VISIBILITY_MS = 4000
ROUTED = [f"routed-{i}" for i in range(150)]


def test_adding_then_removing_a_shard_under_load(
    cluster_factory: ClusterFactory, ledger: Ledger
) -> None:
    cluster = cluster_factory([[0], [1]], spare=1)
    n = cluster.nodes
    view = cluster.view()
    old_ids = [s["id"] for s in view["shards"]]
    assert routes(cluster, ROUTED, n[2]) == {c: shard_for(c, old_ids) for c in ROUTED}
    three = [[n[0].server_host], [n[1].server_host], [n[2].server_host]]
    moving, staying = moving_channels(view, three, 3, "move")
    channels = moving + staying
    with Load(cluster.urls, channels, ledger, API_TOKEN, visibility_ms=VISIBILITY_MS):
        added = reshape(cluster, [[0], [1], [2]], ROUTED + channels, moving, ledger)
        new_ids = [s["id"] for s in cluster.view()["shards"]]
        (new_id,) = set(new_ids) - set(old_ids)
        assert set(old_ids) < set(new_ids), "existing shards kept their ids"
        assert {to for _, to in added.moved.values()} == {new_id}, "moved only onto the new shard"
        share = sum(1 for c in ROUTED if c in added.moved) / len(ROUTED)
        assert 0.7 / 3 <= share <= 1.3 / 3, share
        assert set(moving) <= set(added.moved) and not set(staying) & set(added.moved)
        assert max(added.outage.values()) <= MOVE_GOAL_S, added.outage

        removed = reshape(cluster, [[0], [1]], ROUTED + channels, moving, ledger)
        assert removed.moved == {c: (to, frm) for c, (frm, to) in added.moved.items()}
        assert sorted(s["id"] for s in cluster.view()["shards"]) == sorted(old_ids)
        assert max(removed.outage.values()) <= MOVE_GOAL_S, removed.outage
    drain(cluster.urls, channels, ledger, API_TOKEN, VISIBILITY_MS, 30)
    books = ledger.books()
    found = problems(books)
    assert found == [], f"{len(found)} broken promises ({summary(books)}):\n" + "\n".join(
        found[:30]
    )
    # the unassigned node served the shard while it had it
    served = {op.node for op in books.ops if op.ok and op.channel in moving}
    assert n[2].node_id in served
