"""The cluster's settings at the edges: no CLUSTER_SECRET with a topology, no ADMIN_TOKEN."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from tests.cluster.conftest import ClusterFactory
from tests.cluster.nodes import ADMIN_TOKEN, Cluster

pytestmark = pytest.mark.cluster


def test_a_node_with_a_topology_and_no_cluster_secret_refuses_to_start(tmp_path: Path) -> None:
    cluster = Cluster.build(tmp_path, [[0]], secret="")
    node = cluster.nodes[0]
    try:
        with pytest.raises(AssertionError, match="node exited"):
            node.start(timeout=20)
    finally:
        cluster.stop()
    assert node.proc is not None and node.proc.returncode != 0
    log = node.log.read_text()
    assert "CLUSTER_SECRET" in log and "Traceback" not in log, log


def test_set_nodes_without_an_admin_token_configured_is_forbidden(
    cluster_factory: ClusterFactory,
) -> None:
    cluster = cluster_factory([[0]], admin_token="")
    node = cluster.nodes[0]
    body = {"shards": [{"primary": node.server_host, "backups": []}]}
    for headers in ({}, {"Authorization": f"Bearer {ADMIN_TOKEN}"}, {"Authorization": "Bearer x"}):
        r = httpx.put(node.url + "/cluster/nodes", json=body, headers=headers, timeout=5)
        assert r.status_code == 403, (headers, r.text)
        assert "ADMIN_TOKEN" in r.json()["detail"]
