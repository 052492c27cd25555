"""No topology stored: the store is one shard (s0). A node alone is `standalone`; a second node
started on the same store waits as its standby (never two nodes handing out one message) and
takes over when the first one dies."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from tests.cluster.ledger import Ledger, problems, summary
from tests.cluster.load import Load, drain
from tests.cluster.nodes import API_TOKEN, Cluster
from tests.cluster.scenarios import kill_owner, shard_doc
from tests.conftest import wait_until

pytestmark = pytest.mark.cluster

IMPLICIT_SHARD = "s0"
VISIBILITY_MS = 4000


def role(cluster: Cluster, index: int) -> str | None:
    try:
        entry = cluster.member(index, cluster.nodes[index])
    except httpx.HTTPError:
        return None
    return None if entry is None else str(entry["role"])


def test_a_second_node_on_the_same_store_is_a_standby_that_takes_over(tmp_path: Path) -> None:
    cluster = Cluster.build(tmp_path, [[0, 1]], CLUSTER_INIT="")
    first, second = cluster.nodes
    ledger = Ledger()
    channels = ["solo-a", "solo-b"]
    try:
        first.start()
        wait_until(lambda: role(cluster, 0) == "standalone", 10, "a lone node standalone", 0.1)
        view = cluster.view(first)
        assert view["version"] == 0
        assert [(s["id"], s["owner"]) for s in view["shards"]] == [
            (IMPLICIT_SHARD, first.server_host)
        ]
        second.start()
        wait_until(lambda: role(cluster, 1) == "backup", 10, "the second node a standby", 0.1)
        assert role(cluster, 0) == "primary"
        assert shard_doc(cluster.view(second), IMPLICIT_SHARD)["owner"] == first.server_host
        with Load(cluster.urls, channels, ledger, API_TOKEN, visibility_ms=VISIBILITY_MS):
            wait_until(lambda: ledger.delivered_count() >= 50, 20, "50 deliveries")
            served = {op.node for op in ledger.books().ops if op.ok}
            assert served == {first.node_id}, "only the owner serves"
            takeover = kill_owner(cluster, IMPLICIT_SHARD, channels[0], ledger)
            assert takeover.successor is second
            until = ledger.delivered_count() + 20
            wait_until(lambda: ledger.delivered_count() >= until, 20, "deliveries after")
        drain(cluster.urls, channels, ledger, API_TOKEN, VISIBILITY_MS, 30)
    finally:
        cluster.stop()
    books = ledger.books()
    found = problems(books)
    assert found == [], f"{len(found)} broken promises ({summary(books)}):\n" + "\n".join(
        found[:30]
    )
