"""A 2-shard cluster (2 primaries, 2 backups, 4 processes on one SQLite file): the layout every
node reports, channels spread over both shards, any node answering any channel, and the
secrets that guard node-to-node calls and cluster control. These tests only read the cluster
(or are refused), so they share one."""

from __future__ import annotations

import httpx
import pytest
from lionmq.placement import shard_for

from tests.cluster.nodes import (
    ADMIN_TOKEN,
    API_TOKEN,
    SECRET,
    Cluster,
    Json,
    api_auth,
    channels_on,
)
from tests.conftest import wait_until

pytestmark = pytest.mark.cluster

SPREAD = [f"spread-{i}" for i in range(40)]


def test_every_node_reports_the_layout(two_shards: Cluster) -> None:
    n = two_shards.nodes
    wanted = {n[i].server_host: role for i, role in enumerate(["primary", "backup"] * 2)}

    def reported() -> bool:  # a node's presence shows once it has reported to the store
        return all(
            {e["url"]: e["role"] for e in two_shards.view(via)["nodes"]} == wanted for via in n
        )

    wait_until(reported, 10, "every node listing all four with their roles", 0.1)
    for via in n:
        view = two_shards.view(via)
        assert view["version"] >= 1
        assert view["node"]["id"] == via.node_id and view["node"]["url"] == via.server_host
        shards = {s["primary"]: s for s in view["shards"]}
        assert set(shards) == {n[0].server_host, n[2].server_host}
        assert shards[n[0].server_host]["backups"] == [n[1].server_host]
        assert shards[n[2].server_host]["backups"] == [n[3].server_host]
        for s in view["shards"]:
            assert s["owner"] == s["primary"] and s["epoch"] >= 1
            assert s["lease_expires_in_ms"] is not None and s["lease_expires_in_ms"] > 0
        roles = {e["url"]: (e["role"], e["id"], e["status"]) for e in view["nodes"]}
        for i, role in enumerate(["primary", "backup", "primary", "backup"]):
            assert roles[n[i].server_host] == (role, n[i].node_id, "up")


def test_channels_spread_over_both_shards_and_every_node_routes_alike(
    two_shards: Cluster,
) -> None:
    view = two_shards.view()
    ids = [s["id"] for s in view["shards"]]
    owners = {s["id"]: s["owner"] for s in view["shards"]}
    expected = {c: shard_for(c, ids) for c in SPREAD}
    assert all(sum(1 for s in expected.values() if s == sid) >= 10 for sid in ids)
    with two_shards.http() as http:
        for via in two_shards.nodes:
            for channel in SPREAD:
                r = http.get(f"{via.url}/cluster/route/{channel}")
                assert r.status_code == 200, r.text
                shard = expected[channel]
                assert r.json() == {"channel": channel, "shard": shard, "owner": owners[shard]}


def test_any_node_answers_any_channel(two_shards: Cluster) -> None:
    view = two_shards.view()
    ids = [s["id"] for s in view["shards"]]
    owner_of = {s["id"]: two_shards.node_at(s["owner"]) for s in view["shards"]}
    nodes = two_shards.nodes
    with two_shards.http() as http:
        for channel in channels_on(ids, 2, "any"):
            owner = owner_of[shard_for(channel, ids)]
            for i, via in enumerate(nodes):
                r = http.post(
                    f"{via.url}/channels/{channel}/enqueue",
                    json={"messages": [{"body": {"via": via.node_id}}]},
                )
                assert r.status_code == 201, r.text
                assert r.headers["x-lionmq-node"] == owner.node_id
                forwarded_by = r.headers.get("x-lionmq-forwarded-by")
                assert forwarded_by == (None if via is owner else via.node_id)
                # dequeue through the next node, ack through the one after
                dq = nodes[(i + 1) % len(nodes)]
                r = http.post(f"{dq.url}/channels/{channel}/dequeue", json={"max": 10})
                assert r.status_code == 200 and r.headers["x-lionmq-node"] == owner.node_id
                (message,) = r.json()["messages"]
                assert message["body"] == {"via": via.node_id}
                ak = nodes[(i + 2) % len(nodes)]
                r = http.post(
                    f"{ak.url}/channels/{channel}/ack", json={"receipts": [message["receipt"]]}
                )
                assert r.status_code == 200 and r.json() == {"acked": 1, "stale": []}
            for via in nodes:
                r = http.get(f"{via.url}/channels/{channel}")
                assert r.status_code == 200
                assert r.json()["counts"] == {"ready": 0, "delayed": 0, "in_flight": 0}


def test_node_to_node_routes_need_the_cluster_secret(two_shards: Cluster) -> None:
    shard = two_shards.shard_ids()[0]
    calls = [
        ("POST", "/cluster/internal/poke", {"channel": "x"}),
        ("POST", "/cluster/internal/heartbeat", {"shard": shard}),
        ("GET", f"/cluster/internal/shards/{shard}/snapshot", None),
    ]
    refusals = [
        {},
        {"X-LionMQ-Cluster-Secret": "wrong"},
        {"X-LionMQ-Cluster-Secret": ""},
        {"X-LionMQ-Cluster-Secret": SECRET + "x"},
        api_auth(),  # the API token is not the cluster secret
        {**api_auth(), "X-LionMQ-Cluster-Secret": "wrong"},
    ]
    for via in two_shards.nodes:
        for method, path, body in calls:
            for headers in refusals:
                r = httpx.request(method, via.url + path, json=body, headers=headers, timeout=5)
                assert r.status_code == 401, (via.node_id, method, path, headers, r.text)


def test_set_nodes_needs_the_admin_token_and_a_valid_layout(two_shards: Cluster) -> None:
    n = two_shards.nodes
    version = two_shards.view()["version"]
    swap = {"shards": [{"primary": n[1].server_host, "backups": [n[0].server_host]}]}
    for headers in (
        {},
        api_auth(),  # the API token does not control the cluster
        {"Authorization": "Bearer wrong"},
        {"Authorization": ADMIN_TOKEN},  # not a bearer
    ):
        r = httpx.put(n[0].url + "/cluster/nodes", json=swap, headers=headers, timeout=5)
        assert r.status_code == 401, (headers, r.text)
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    invalid: list[Json] = [
        {"shards": []},
        {"shards": [{"primary": n[0].server_host, "backups": [n[0].server_host]}]},
        {
            "shards": [
                {"primary": n[0].server_host, "backups": []},
                {"primary": n[2].server_host, "backups": [n[0].server_host]},
            ]
        },
        {"shards": [{"primary": "not a url", "backups": []}]},
        {"shards": [{"primary": n[0].server_host + "/path", "backups": []}]},
    ]
    for body in invalid:
        r = httpx.put(n[2].url + "/cluster/nodes", json=body, headers=admin, timeout=5)
        assert r.status_code == 422, (body, r.text)
    for via in n:
        assert two_shards.view(via)["version"] == version


def test_cluster_routes_and_forwarded_requests_need_the_api_token(two_shards: Cluster) -> None:
    view = two_shards.view()
    ids = [s["id"] for s in view["shards"]]
    owner_of = {s["id"]: two_shards.node_at(s["owner"]) for s in view["shards"]}
    (channel,) = channels_on(ids[:1], 1, "auth", among=ids)
    owner = owner_of[ids[0]]
    other = next(n for n in two_shards.nodes if n is not owner)
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Bearer {SECRET}"}):
        for path in ("/cluster", f"/cluster/route/{channel}", f"/channels/{channel}"):
            assert httpx.get(other.url + path, headers=headers).status_code == 401, path
        r = httpx.post(
            f"{other.url}/channels/{channel}/enqueue",
            json={"messages": [{"body": "no"}]},
            headers=headers,
        )
        assert r.status_code == 401, r.text
    r = httpx.get(f"{owner.url}/channels/{channel}", headers=api_auth())
    assert r.status_code == 404 or r.json()["counts"]["ready"] == 0


def test_a_forwarded_request_is_never_forwarded_again(two_shards: Cluster) -> None:
    view = two_shards.view()
    ids = [s["id"] for s in view["shards"]]
    owner = two_shards.node_at(next(s["owner"] for s in view["shards"] if s["id"] == ids[0]))
    other = next(n for n in two_shards.nodes if n is not owner)
    (channel,) = channels_on(ids[:1], 1, "hop", among=ids)
    r = httpx.post(
        f"{other.url}/channels/{channel}/enqueue",
        json={"messages": [{"body": "loop"}]},
        headers={**api_auth(), "X-LionMQ-Forwarded": "node-elsewhere"},
    )
    assert r.status_code == 503 and "retry-after" in r.headers, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    r = httpx.get(
        f"{owner.url}/channels/{channel}", headers={"Authorization": f"Bearer {API_TOKEN}"}
    )
    assert r.status_code == 404 or r.json()["counts"]["ready"] == 0
