"""The cluster's HTTP surface attacked from outside, on a 2-shard cluster of real processes
(one SQLite file, API_TOKEN, ADMIN_TOKEN and CLUSTER_SECRET set): what a client sends to one
node and what reaches another, cluster control, and what GET /cluster and /metrics say."""

from __future__ import annotations

import httpx
import lionmq
import pytest
from lionmq import Client

from tests.cluster.nodes import (
    ADMIN_TOKEN,
    API_TOKEN,
    SECRET,
    Cluster,
    ClusterNode,
    api_auth,
    channels_on,
)
from tests.conftest import free_port, wait_until

pytestmark = pytest.mark.cluster

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
SECRET_HEADER = "X-LionMQ-Cluster-Secret"


def owner_and_other(cluster: Cluster, prefix: str) -> tuple[str, ClusterNode, ClusterNode]:
    """A channel of the first shard, its owner, and a node of the other shard (a forwarder)."""
    view = cluster.view()
    ids = [s["id"] for s in view["shards"]]
    owner = cluster.node_at(view["shards"][0]["owner"])
    other = cluster.node_at(view["shards"][1]["owner"])
    (channel,) = channels_on(ids[:1], 1, prefix, among=ids)
    return channel, owner, other


def names(r: httpx.Response) -> set[str]:
    assert r.status_code == 200, r.text
    return {c["name"] for c in r.json()["channels"]}


def served(method: str, url: str, **kwargs: object) -> httpx.Response:
    """The answer to a request, asked again while it is 503 + Retry-After (a shard without an
    owner for a moment on a loaded machine: the documented answer, retried as a client does)."""
    answers: list[httpx.Response] = []

    def answered() -> bool:
        r = httpx.request(method, url, timeout=15, **kwargs)  # type: ignore[arg-type]
        answers.append(r)
        return not (r.status_code == 503 and "retry-after" in r.headers)

    wait_until(answered, 15, f"{method} {url} served", 0.1)
    return answers[-1]


def listed(via: ClusterNode) -> set[str]:
    """GET /channels of the whole cluster from `via`: while a shard has no owner (a lease
    lapsed on a loaded machine) it answers 503 with Retry-After, never a part; then whole."""
    answers: list[httpx.Response] = []

    def answered() -> bool:
        r = httpx.get(via.url + "/channels", headers=api_auth(), timeout=15)
        assert r.status_code in (200, 503), r.text
        answers.append(r)
        return r.status_code == 200

    wait_until(answered, 15, f"GET /channels from {via.node_id}", 0.1)
    return names(answers[-1])


def test_the_channel_list_is_whole_or_refused_never_a_part(two_shards: Cluster) -> None:
    channel, owner, other = owner_and_other(two_shards, "list")
    assert served("PUT", f"{other.url}/channels/{channel}", headers=api_auth()).status_code == 200
    for via in two_shards.nodes:
        assert channel in listed(via)
    # The forwarded mark is node to node: a client sending it took the asked node's part
    # (here an empty one) for the whole list.
    spoofed = {**api_auth(), "X-LionMQ-Forwarded": "node-elsewhere"}
    r = httpx.get(other.url + "/channels", headers=spoofed)
    assert r.status_code == 401, r.text
    r = httpx.get(other.url + "/channels", headers={**spoofed, SECRET_HEADER: "wrong"})
    assert r.status_code == 401, r.text
    # A peer's fan-out (mark and secret) gets the node's own part.
    r = httpx.get(owner.url + "/channels", headers={**spoofed, SECRET_HEADER: SECRET})
    assert channel in names(r)


def test_set_nodes_refuses_a_topology_without_the_node_asked(two_shards: Cluster) -> None:
    n = two_shards.nodes
    version = two_shards.view()["version"]
    # Every running node left out (a typo in every URL): all shards would lose their owners.
    typo = {"shards": [{"primary": n[0].server_host + "1", "backups": []}]}
    # The node asked left out, other running nodes kept.
    without_asked = {"shards": [{"primary": n[0].server_host, "backups": [n[1].server_host]}]}
    for via, body in ((n[0], typo), (n[2], without_asked)):
        r = httpx.put(via.url + "/cluster/nodes", json=body, headers=ADMIN, timeout=5)
        assert r.status_code == 422, r.text
        assert via.server_host in r.json()["detail"]
    for via in n:
        assert two_shards.view(via)["version"] == version


def test_metrics_say_what_get_cluster_says(two_shards: Cluster) -> None:
    for node in two_shards.nodes:
        role = two_shards.view(node)["node"]["role"]
        assert role in ("primary", "backup"), role
        metrics = httpx.get(node.url + "/metrics", headers=api_auth(), timeout=5).text
        assert f'lionmq_cluster_role{{role="{role}"}} 1.0' in metrics, (node.node_id, role)
        for line in ("lionmq_failovers_total ", "lionmq_handoffs_total "):
            assert line in metrics


def test_a_page_of_a_foreign_origin_never_reaches_the_owner(two_shards: Cluster) -> None:
    channel, owner, other = owner_and_other(two_shards, "page")
    body = {"messages": [{"body": "csrf"}]}
    # The guard of the first hop judges Origin / Sec-Fetch-Site / Host; the peer's own origin
    # is a foreign one for this node too.
    for headers in (
        {"Origin": "http://evil.example"},
        {"Origin": owner.url},
        {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "cors"},
        {"Host": "evil.example"},
    ):
        r = httpx.post(
            f"{other.url}/channels/{channel}/enqueue", json=body, headers={**api_auth(), **headers}
        )
        assert r.status_code == 403, (headers, r.text)
        assert "x-lionmq-forwarded-by" not in r.headers
    # A page of the asked node's own origin is let through, and the owner serves it (the
    # forwarder does not pass the Origin on, which the owner would judge against its own).
    r = served(
        "POST",
        f"{other.url}/channels/{channel}/enqueue",
        json=body,
        headers={**api_auth(), "Origin": other.url},
    )
    assert r.status_code == 201, r.text
    assert r.headers["x-lionmq-forwarded-by"] == other.node_id
    assert r.headers["x-lionmq-node"] != other.node_id  # served by the owner, not here
    stats = served("GET", f"{other.url}/channels/{channel}", headers=api_auth()).json()
    assert stats["counts"]["ready"] == 1


def test_an_owner_exports_each_backups_lag(two_shards: Cluster) -> None:
    # GET /cluster shows a backup's lag from both ends; /metrics showed only the backup's own
    # count (on the backup), nothing on the owner that knows how far each backup acked.
    for shard, layout in zip(two_shards.view()["shards"], two_shards.layout, strict=True):
        owner = two_shards.node_at(shard["owner"])
        backup = two_shards.nodes[layout[1]]
        line = f'lionmq_backup_lag{{backup="{backup.server_host}",shard="{shard["id"]}"}}'

        def exported(owner: ClusterNode = owner, line: str = line) -> bool:
            text = httpx.get(owner.url + "/metrics", headers=api_auth(), timeout=5).text
            return line in text

        wait_until(exported, 10, f"{line} on {owner.node_id}", 0.1)


def test_the_client_against_real_nodes(two_shards: Cluster) -> None:
    n = two_shards.nodes
    dead = f"http://127.0.0.1:{free_port()}"
    layout = [
        {"primary": n[0].server_host, "backups": [n[1].server_host]},
        {"primary": n[2].server_host, "backups": [n[3].server_host]},
    ]
    with Client(
        [dead, n[1].url, n[2].url], token=API_TOKEN, admin_token=ADMIN_TOKEN, timeout=5
    ) as client:
        info = client.cluster()  # the first seed is down: the next one answers
        assert [s.id for s in info.shards] == two_shards.shard_ids()
        channel, _, _ = owner_and_other(two_shards, "client")
        client.enqueue(channel, {"n": 1})
        (got,) = client.dequeue(channel, 1)
        assert got.body == {"n": 1}
        assert client.ack(channel, [got.receipt]).acked == 1
        version = info.version
        # Both forms of set_nodes, with the layout the cluster has: stored, nothing changes.
        assert client.set_nodes(layout).version == version
        backups = {n[0].server_host: [n[1].server_host], n[2].server_host: [n[3].server_host]}
        primaries = [n[0].server_host, n[2].server_host]
        assert client.set_nodes(primaries=primaries, backups=backups).version == version
        # The admin token is not the API token, and a bad layout is refused before it is sent.
        with pytest.raises(lionmq.InvalidTopology):
            client.set_nodes([])
    with (
        Client(n[0].url, token=API_TOKEN, admin_token=API_TOKEN, timeout=5) as client,
        pytest.raises(lionmq.Unauthorized),
    ):
        client.set_nodes(layout)
    assert two_shards.view()["version"] == version


def test_heartbeats_only_from_a_member_for_a_shard_this_node_backs(two_shards: Cluster) -> None:
    """A heartbeat would make a node fetch a snapshot from the owner it names (sending the
    secret there) and hold off its failover: even with the secret, one for a shard the node does
    not back, or from a node outside the shard, is refused (403), and a huge one is 413."""
    view = two_shards.view()
    s1, s2 = view["shards"]
    backup = two_shards.node_at(s1["backups"][0])
    headers = {SECRET_HEADER: SECRET, **api_auth()}

    def beat(shard: str, owner_url: str) -> httpx.Response:
        body = {
            "shard": shard,
            "epoch": 10**6,
            "owner_id": "intruder",
            "owner_url": owner_url,
            "base": -1,
            "seq": 0,
            "deltas": [],
        }
        url = backup.url + "/cluster/internal/heartbeat"
        return httpx.post(url, json=body, headers=headers, timeout=5)

    for shard, owner in ((s2["id"], s2["primary"]), (s1["id"], "http://127.0.0.1:1"), ("zz", "")):
        r = beat(shard, owner)
        assert r.status_code == 403, (shard, owner, r.text)
    huge = b'{"shard": "' + b"x" * (17 << 20) + b'"}'
    r = httpx.post(
        backup.url + "/cluster/internal/heartbeat",
        content=huge,
        headers={**headers, "Content-Type": "application/json"},
        timeout=30,
    )
    assert r.status_code == 413, r.text
    # The real owner's beats still go through: the backup keeps following it.
    assert two_shards.owner(s1["id"]) == s1["owner"]
