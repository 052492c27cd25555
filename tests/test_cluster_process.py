"""Real node processes on one SQLite file: the implicit shard's standby, and a 2-shard pair."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import msgspec

from tests.conftest import NodeProcess, wait_until

LEASE_MS = 1000
FAST = {"LEASE_MS": str(LEASE_MS), "HEARTBEAT_MS": "200"}


def enqueue(node: NodeProcess, channel: str, body: str) -> httpx.Response:
    return httpx.post(
        f"{node.url}/channels/{channel}/enqueue", json={"messages": [{"body": body}]}, timeout=5
    )


def cluster(node: NodeProcess) -> dict[str, object]:
    got: dict[str, object] = httpx.get(node.url + "/cluster", timeout=5).json()
    return got


def test_second_node_is_a_standby_and_takes_over_after_kill9(
    node_factory: type[NodeProcess], tmp_path: Path
) -> None:
    a = node_factory(tmp_path, **FAST).start()
    b = node_factory(tmp_path, **FAST).start()
    assert enqueue(a, "jobs", "one").status_code == 201
    # One owner: the standby takes no write of its own (the router, where present, forwards).
    route = httpx.get(f"{b.url}/cluster/route/jobs", timeout=5).json()
    assert route == {"channel": "jobs", "shard": "s0", "owner": a.url}
    a.kill9()
    killed = time.monotonic()
    wait_until(lambda: enqueue(b, "jobs", "two").status_code == 201, 10, "standby takes over")
    took = time.monotonic() - killed
    assert took < LEASE_MS / 1000 + 1.5, took
    got = httpx.post(f"{b.url}/channels/jobs/dequeue", json={"max": 10}, timeout=5).json()
    assert sorted(m["body"] for m in got["messages"]) == ["one", "two"]


def test_graceful_stop_hands_over_at_once(node_factory: type[NodeProcess], tmp_path: Path) -> None:
    a = node_factory(tmp_path, LEASE_MS="30000", HEARTBEAT_MS="200").start()
    b = node_factory(tmp_path, LEASE_MS="30000", HEARTBEAT_MS="200").start()
    assert enqueue(a, "jobs", "one").status_code == 201
    a.stop()  # releases the lease: no 30 s wait
    wait_until(lambda: enqueue(b, "jobs", "two").status_code == 201, 5, "standby takes over")


def test_two_shards_each_primary_serves_its_own_channels(
    node_factory: type[NodeProcess], tmp_path: Path
) -> None:
    a = node_factory(tmp_path)
    b = node_factory(tmp_path)
    init = msgspec.json.encode({"shards": [{"primary": a.url}, {"primary": b.url}]}).decode()
    env = {**FAST, "CLUSTER_INIT": init, "CLUSTER_SECRET": "shh"}
    a.env.update(env)
    b.env.update(env)
    a.start()
    b.start()
    # Each node reads the leases once a heartbeat: both must have seen both owners.
    wait_until(
        lambda: all(s["owner"] for n in (a, b) for s in cluster(n)["shards"]),  # type: ignore[index,union-attr]
        10,
        "both shards owned, as both nodes see it",
    )
    view = cluster(a)
    owners = {s["id"]: s["owner"] for s in view["shards"]}  # type: ignore[index,union-attr]
    assert owners == {"s1": a.url, "s2": b.url}
    by_node = {a.url: a, b.url: b}
    shards = set()
    for i in range(20):
        channel = f"ch{i}"
        # Routes come from each node's last reading of the leases (at most a heartbeat old).
        routes: list[object] = []

        def agreed(channel: str = channel, routes: list[object] = routes) -> bool:
            routes[:] = [
                httpx.get(f"{n.url}/cluster/route/{channel}", timeout=5).json() for n in (a, b)
            ]
            return routes[0] == routes[1] and routes[0]["owner"] is not None  # type: ignore[index]

        wait_until(agreed, 5, f"both nodes routing {channel} to its owner")
        route: dict[str, str] = routes[0]  # type: ignore[assignment]
        shards.add(route["shard"])
        assert enqueue(by_node[route["owner"]], channel, "m").status_code == 201
    assert shards == {"s1", "s2"}
    roles = {n["url"]: n["role"] for n in cluster(b)["nodes"]}  # type: ignore[index,union-attr]
    assert roles == {a.url: "primary", b.url: "primary"}


def test_dead_letters_cross_shards_and_are_dequeueable_on_the_target_at_once(
    node_factory: type[NodeProcess], tmp_path: Path
) -> None:
    a = node_factory(tmp_path)
    b = node_factory(tmp_path)
    init = msgspec.json.encode({"shards": [{"primary": a.url}, {"primary": b.url}]}).decode()
    env = {**FAST, "CLUSTER_INIT": init, "CLUSTER_SECRET": "shh"}
    a.env.update(env)
    b.env.update(env)
    a.start()
    b.start()

    def owner(channel: str) -> str:
        return str(httpx.get(f"{a.url}/cluster/route/{channel}", timeout=5).json()["owner"])

    wait_until(lambda: owner("x") in (a.url, b.url), 10, "shards owned")
    source = next(f"src{i}" for i in range(200) if owner(f"src{i}") == a.url)
    target = next(f"dlq{i}" for i in range(200) if owner(f"dlq{i}") == b.url)
    put = httpx.put(f"{a.url}/channels/{source}", json={"dead_letter": target}, timeout=5)
    assert put.status_code == 200, put.text
    assert enqueue(a, source, "bad").status_code == 201
    got = httpx.post(f"{a.url}/channels/{source}/dequeue", json={"max": 1}, timeout=5).json()
    receipt = got["messages"][0]["receipt"]
    r = httpx.post(
        f"{a.url}/channels/{source}/nack",
        json={"receipts": [receipt], "dead_letter": True},
        timeout=5,
    )
    assert r.status_code == 200, r.text
    # The poke makes the target's owner read it: dequeueable there without waiting for an audit.
    r = httpx.post(
        f"{b.url}/channels/{target}/dequeue", json={"max": 1, "wait_ms": 3000}, timeout=10
    )
    assert [m["body"] for m in r.json()["messages"]] == ["bad"]
