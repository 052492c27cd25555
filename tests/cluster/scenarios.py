"""The cluster's measured steps, one implementation for the tests and `python -m bench cluster`:
a kill -9 of a shard's owner and its takeover, a set_nodes and how long moved channels were
unavailable, a forwarded request against a direct one."""

from __future__ import annotations

import statistics
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

import httpx
import msgspec
from lionmq.placement import shard_for
from lionmq.topology import SetNodes, ShardSpec, Topology, next_topology

from tests.cluster.ledger import Ledger, longest_outage
from tests.cluster.load import Caller, Probe, first_served
from tests.cluster.nodes import API_TOKEN, Cluster, ClusterNode, Json
from tests.conftest import wait_until

REJOIN_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Takeover:
    shard: str
    victim: ClusterNode
    successor: ClusterNode
    seconds: float  # from the kill to the first enqueue the successor served itself


def shard_doc(view: Json, shard_id: str) -> Json:
    for s in view["shards"]:
        if s["id"] == shard_id:
            doc: Json = s
            return doc
    raise KeyError(shard_id)


def kill_owner(
    cluster: Cluster, shard_id: str, channel: str, ledger: Ledger, timeout: float = 15.0
) -> Takeover:
    """kill -9 the acting owner of `shard_id`; measure until a member that is left serves
    `channel` itself (asked directly, an enqueue booked in `ledger`), and until GET /cluster
    names it owner at a higher epoch."""
    before = shard_doc(cluster.view(), shard_id)
    victim = cluster.node_at(before["owner"])
    # the implicit shard (no topology) has no configured members: every node is a standby
    urls = [u for u in (before["primary"], *before["backups"]) if u is not None]
    members = [cluster.node_at(url) for url in urls] if urls else cluster.nodes
    left = [n for n in members if n is not victim and n.serving]
    assert left, f"{shard_id} has no member left to take over from {victim.node_id}"
    caller = Caller(ledger, API_TOKEN)
    try:
        started = time.monotonic()
        victim.kill9()
        answer = first_served(
            caller, left[0].url, channel, {n.node_id for n in left}, timeout, interval_s=0.01
        )
        seconds = time.monotonic() - started
    finally:
        caller.close()
    assert answer.node is not None
    successor = cluster.by_id(answer.node)

    def named_owner() -> bool:
        try:
            now = shard_doc(cluster.view(successor), shard_id)
        except httpx.HTTPError:
            return False
        return bool(now["owner"] == successor.server_host and now["epoch"] > before["epoch"])

    wait_until(named_owner, timeout, f"GET /cluster naming {successor.node_id} owner", 0.05)
    return Takeover(shard_id, victim, successor, seconds)


def rejoin(cluster: Cluster, takeover: Takeover, timeout: float = REJOIN_TIMEOUT_S) -> float:
    """Restart the killed node; wait until GET /cluster lists it with role `backup` while the
    successor still owns the shard (it never takes the shard back). Seconds from the restart."""
    started = time.monotonic()
    takeover.victim.restart()
    wait_role(cluster, takeover.victim, "backup", takeover.successor, timeout)
    owner = shard_doc(cluster.view(takeover.successor), takeover.shard)["owner"]
    assert owner == takeover.successor.server_host, f"{takeover.shard} taken back: {owner}"
    return time.monotonic() - started


def wait_role(
    cluster: Cluster, node: ClusterNode, role: str, via: ClusterNode, timeout: float
) -> None:
    """Wait until `via`'s GET /cluster lists `node` with `role`; on timeout, say what it showed."""
    seen: list[Json | None] = [None]

    def has_role() -> bool:
        try:
            view = cluster.view(via)
        except httpx.HTTPError:
            return False
        seen[0] = next((n for n in view["nodes"] if n["url"] == node.server_host), None)
        return seen[0] is not None and seen[0]["role"] == role

    try:
        wait_until(has_role, timeout, f"{node.node_id} listed as {role}", 0.1)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; {via.node_id} lists it as {seen[0]}") from None


def caught_up(cluster: Cluster, takeover: Takeover, beats: int = 10) -> float:
    """Wait until the returned node's mirror lag on the shard is 0 as the successor reports
    it, within `beats` heartbeats; seconds it took."""
    started = time.monotonic()
    wait_until(
        lambda: lag_of(cluster, takeover.victim, takeover.shard, takeover.successor) == 0,
        beats * cluster.heartbeat_ms / 1000,
        f"{takeover.victim.node_id}'s mirror lag at 0 within {beats} heartbeats",
        0.05,
    )
    return time.monotonic() - started


def lag_of(cluster: Cluster, node: ClusterNode, shard_id: str, via: ClusterNode) -> int | None:
    """The mirror lag (beats) of backup `node` on `shard_id` as `via` reports it."""
    for entry in cluster.view(via)["nodes"]:
        if entry["url"] == node.server_host and entry["lag"] is not None:
            lag = entry["lag"].get(shard_id)
            return None if lag is None else int(lag)
    return None


def current_topology(view: Json) -> Topology:
    """The stored topology as GET /cluster shows it (the fields a Topology has, nothing else)."""
    return msgspec.convert({"version": view["version"], "shards": view["shards"]}, Topology)


def planned(view: Json, hosts: Sequence[Sequence[str]]) -> Topology:
    """The topology a set_nodes of `hosts` (primary first per shard) will store."""
    request = SetNodes(tuple(ShardSpec(s[0], tuple(s[1:])) for s in hosts))
    return next_topology(current_topology(view), request)


def placements(channels: Sequence[str], shard_ids: Sequence[str]) -> dict[str, str]:
    return {c: shard_for(c, shard_ids) for c in channels}


def routes(cluster: Cluster, channels: Sequence[str], via: ClusterNode) -> dict[str, str]:
    """Each channel's shard as node `via` routes it (GET /cluster/route/{channel})."""
    with cluster.http() as http:
        out = {}
        for channel in channels:
            r = http.get(f"{via.url}/cluster/route/{channel}")
            r.raise_for_status()
            out[channel] = r.json()["shard"]
        return out


@dataclass(frozen=True)
class Reshape:
    version: int
    moved: dict[str, tuple[str, str]]  # channel -> (from shard, to shard), of `channels`
    outage: dict[str, float]  # probed channel -> longest time without a success
    settled_s: float  # from the PUT until every node routes as the new topology says


def reshape(
    cluster: Cluster,
    layout: Sequence[Sequence[int]],
    channels: Sequence[str],
    probed: Sequence[str],
    ledger: Ledger,
    timeout: float = 15.0,
    after_s: float = 1.0,
) -> Reshape:
    """PUT /cluster/nodes with `layout` while `probed` channels are enqueued to every few ms;
    wait until every serving node routes `channels` as the stored topology's placement says
    and the new shards are owned; then measure each probed channel's longest outage."""
    before_view = cluster.view()
    before = placements(channels, [s["id"] for s in before_view["shards"]])
    hosts = [[cluster.nodes[i].server_host for i in shard] for shard in layout]
    expected_topology = planned(before_view, hosts)
    expected = placements(channels, expected_topology.shard_ids)
    probes = [Probe(cluster.urls, c, ledger, API_TOKEN).start() for c in probed]
    try:
        wait_until(lambda: _probed_once(ledger, probed), timeout, "every probe answered once")
        put_at = time.time()
        started = time.monotonic()
        r = cluster.set_nodes(layout)
        assert r.status_code == 200, r.text
        stored = r.json()
        assert stored["version"] == expected_topology.version, stored
        first = cluster.serving()[0]

        def applied() -> bool:
            try:
                return all(owned(cluster, expected_topology, n) for n in cluster.serving()) and (
                    routes(cluster, channels, first) == expected
                )
            except httpx.HTTPError:
                return False

        wait_until(applied, timeout, "the new shards owned and routed", 0.1)
        settled_s = time.monotonic() - started
        settled_at = time.time()
        for node in cluster.serving():
            assert routes(cluster, channels, node) == expected, f"{node.node_id} routes astray"
        time.sleep(after_s)  # the probes go on: an outage that starts late shows too
    finally:
        for p in probes:
            p.stop()
    books = ledger.books()
    outage = {c: longest_outage(books.ops, c, put_at, settled_at + after_s) for c in probed}
    moved = {c: (before[c], expected[c]) for c in channels if before[c] != expected[c]}
    return Reshape(expected_topology.version, moved, outage, settled_s)


def owned(cluster: Cluster, topology: Topology, via: ClusterNode) -> bool:
    """Whether `via` shows every shard of `topology` owned by one of its members (a kept shard
    may be served by a backup after a failover: the primary does not take it back)."""
    shards = {s["id"]: s for s in cluster.view(via)["shards"]}
    for shard in topology.shards:
        doc = shards.get(shard.id)
        if doc is None or doc["owner"] not in shard.members:
            return False
    return True


def _probed_once(ledger: Ledger, channels: Sequence[str]) -> bool:
    ok = {op.channel for op in ledger.books().ops if op.ok}
    return all(c in ok for c in channels)


def moving_channels(
    view: Json, hosts: Sequence[Sequence[str]], count: int, prefix: str
) -> tuple[list[str], list[str]]:
    """`count` channel names that the set_nodes of `hosts` would move and `count` it would
    not, chosen by the placement function."""
    old = [s["id"] for s in view["shards"]]
    new = planned(view, hosts).shard_ids
    moving: list[str] = []
    staying: list[str] = []
    for i in range(100_000):
        name = f"{prefix}-{i}"
        bucket = moving if shard_for(name, old) != shard_for(name, new) else staying
        if len(bucket) < count:
            bucket.append(name)
        if len(moving) == len(staying) == count:
            return moving, staying
    raise AssertionError("no channel would move")


@dataclass(frozen=True)
class ForwardCost:
    direct_ms: float  # median latency of a one-message enqueue sent to the owner
    forwarded_ms: float  # the same sent to a node that forwards it
    requests: int


def forward_cost(cluster: Cluster, channel: str, requests: int = 200) -> ForwardCost:
    """Median latency of one-message enqueues to `channel`'s owner and to another node,
    interleaved so that load on the machine weighs on both alike."""
    owner_url = cluster.route(channel)["owner"]
    owner = cluster.node_at(owner_url)
    other = next(n for n in cluster.serving() if n is not owner)
    run = uuid.uuid4().hex[:8]
    samples: dict[str, list[float]] = {"direct": [], "forwarded": []}
    with cluster.http() as http:
        for i in range(requests):
            for kind, node in (("direct", owner), ("forwarded", other)):
                body = {"messages": [{"body": i, "dedup_id": f"{run}-{kind}-{i}"}]}
                started = time.perf_counter()
                r = http.post(f"{node.url}/channels/{channel}/enqueue", json=body)
                elapsed = time.perf_counter() - started
                assert r.status_code == 201, r.text
                assert r.headers.get("x-lionmq-node") == owner.node_id
                samples[kind].append(elapsed * 1000)
        http.post(f"{owner.url}/channels/{channel}/purge").raise_for_status()
    return ForwardCost(
        statistics.median(samples["direct"]), statistics.median(samples["forwarded"]), requests
    )
