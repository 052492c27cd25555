"""The client in a cluster: each channel straight to its shard's owner, the view of the
cluster refreshed when a reply says it is out of date, failover invisible except as delay,
consumers following a channel whose owner changed, `cluster()` and `set_nodes()`; and a
single standalone node served exactly as before clusters."""

from __future__ import annotations

import asyncio
import json
import threading
from typing import Any

import httpx
import lionmq
import pytest
from cluster_fake import ADMIN, FakeCluster, Seen, channel_on
from lionmq import AsyncClient, Client, InvalidTopology, RetryPolicy, protocol
from lionmq_fake import FakeNode

N1, N2, N3, N4, N5 = (f"http://n{i}:800{i}" for i in range(1, 6))


class Ticker:
    """A clock that moves a quarter second each time it is read: topology refreshes are never
    held back by MIN_REFRESH_S, and a failover allowance runs out in a bounded number of
    reads, without any real waiting."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 0.25
        return self.now


def fast(attempts: int = 3) -> RetryPolicy:
    return RetryPolicy(attempts=attempts, base_delay=0.0, max_delay=0.0, clock=Ticker())


@pytest.fixture
def cluster() -> FakeCluster:
    """Two shards: s1 served by n1 (backup n3), s2 by n2 (backup n4)."""
    return FakeCluster({"s1": [N1, N3], "s2": [N2, N4]})


def on(cluster: FakeCluster, shard: str, skip: int = 0) -> str:
    return channel_on(shard, cluster.shard_ids, skip)


def client(cluster: FakeCluster, seeds: list[str] | str, **options: Any) -> Client:
    options.setdefault("retry", fast())
    return Client(seeds, transport=cluster.transport(), admin_token=ADMIN, **options)


def aclient(cluster: FakeCluster, seeds: list[str] | str, **options: Any) -> AsyncClient:
    options.setdefault("retry", fast())
    return AsyncClient(seeds, transport=cluster.transport(), admin_token=ADMIN, **options)


def where(seen: list[Seen]) -> list[tuple[str, str]]:
    return [(s.node, s.path) for s in seen]


# -- routing -------------------------------------------------------------------------------


def test_each_channel_goes_straight_to_its_owner(cluster: FakeCluster) -> None:
    a, b = on(cluster, "s1"), on(cluster, "s2")
    with client(cluster, [N1, N2]) as c:
        for _ in range(5):
            c.enqueue(a, "x")
            c.enqueue(b, "y")
        assert [m.body for m in c.dequeue(b, 10)] == ["y"] * 5
    # One topology fetch, then every request at the owner: none forwarded.
    assert where(cluster.seen[:1]) == [(N1, "/cluster")]
    assert len(cluster.seen) == 1 + 11
    assert {s.node for s in cluster.sent(f"{a}/enqueue")} == {N1}
    assert {s.node for s in cluster.sent(f"{b}/enqueue") + cluster.sent("dequeue")} == {N2}


async def test_async_client_routes_the_same_way(cluster: FakeCluster) -> None:
    a, b = on(cluster, "s1"), on(cluster, "s2")
    async with aclient(cluster, [N2, N1]) as c:
        await c.enqueue_many(a, [1, 2])
        await c.enqueue(b, 3)
        [message] = await c.dequeue(b)
        await message.ack()
    assert where(cluster.seen) == [
        (N2, "/cluster"),
        (N1, f"/channels/{a}/enqueue"),
        (N2, f"/channels/{b}/enqueue"),
        (N2, f"/channels/{b}/dequeue"),
        (N2, f"/channels/{b}/ack"),
    ]


def test_one_seed_learns_the_cluster_from_its_first_reply(cluster: FakeCluster) -> None:
    b = on(cluster, "s2")
    with client(cluster, N1) as c:
        for n in range(4):
            c.enqueue(b, n)
    # The first enqueue is forwarded by n1; the cluster API's header makes the client fetch
    # the topology once, and from then on it goes to n2 itself.
    assert where(cluster.seen[:3]) == [
        (N1, f"/channels/{b}/enqueue"),
        (N1, "/cluster"),
        (N2, f"/channels/{b}/enqueue"),
    ]
    assert len(cluster.seen) == 5


def test_a_forwarded_reply_refreshes_the_view(cluster: FakeCluster) -> None:
    a = on(cluster, "s1")
    with client(cluster, [N1, N2]) as c:
        c.enqueue(a, 1)
        # s1 moved to n3 (a set_nodes elsewhere, say): n1 now forwards.
        cluster.owner["s1"] = N3
        c.enqueue(a, 2)
        c.enqueue(a, 3)
    assert where(cluster.seen[-3:]) == [
        (N1, f"/channels/{a}/enqueue"),  # forwarded, and answered
        (N1, "/cluster"),
        (N3, f"/channels/{a}/enqueue"),
    ]
    assert [m.body for m in cluster.store.channel(a).ready] == [1, 2, 3]


def test_a_view_that_stays_stale_costs_one_fetch_per_interval(cluster: FakeCluster) -> None:
    """A node that forwards although the topology names it owner: replies keep saying
    'forwarded', yet the client fetches at most every MIN_REFRESH_S, not per request."""
    a = on(cluster, "s1")
    clock = [0.0]
    retry = RetryPolicy(attempts=1, clock=lambda: clock[0])
    with client(cluster, [N1, N2], retry=retry) as c:
        c.enqueue(a, 0)
        cluster.owner["s1"] = N3
        cluster.doc = lambda node: FakeCluster.doc(  # type: ignore[method-assign]
            FakeCluster({"s1": [N1, N3], "s2": [N2, N4]}), node
        )  # n1 still shown as the owner
        clock[0] = 1.0
        for n in range(20):
            c.enqueue(a, n)
        assert cluster.fetches() == 2
        clock[0] = 1.0 + protocol.MIN_REFRESH_S
        c.enqueue(a, 20)
        assert cluster.fetches() == 3


# -- failover --------------------------------------------------------------------------------


def test_a_503_during_failover_waits_and_refreshes(cluster: FakeCluster) -> None:
    a = on(cluster, "s1")
    answered_503 = 0

    def take_over(node: str, request: httpx.Request) -> None:
        nonlocal answered_503
        if request.url.path.endswith("/enqueue") and cluster.owner["s1"] is None:
            answered_503 += 1
        if request.url.path == "/cluster" and answered_503 >= 5:
            cluster.owner["s1"] = N3  # past the 3 attempts: the failover allowance carries on

    with client(cluster, [N1, N2]) as c:
        c.enqueue(a, "before")
        cluster.owner["s1"] = None  # n1 lost its lease; it answers 503 until n3 takes over
        cluster.before = take_over
        c.enqueue(a, "during")
    assert [m.body for m in cluster.store.channel(a).ready] == ["before", "during"]
    assert cluster.sent(f"{a}/enqueue")[-1].node == N3


def test_an_unreachable_owner_sends_the_call_to_the_shard_backup(cluster: FakeCluster) -> None:
    a, b = on(cluster, "s1"), on(cluster, "s2")
    with client(cluster, [N1, N2]) as c:
        c.enqueue(a, 1)
        cluster.fail_over("s1", N3)
        c.enqueue(a, 2)
        c.enqueue(b, 3)
        assert c.health()["status"] == "ok"  # the seed n1 is down: the next one answers
    assert [s.node for s in cluster.sent(f"{a}/enqueue")] == [N1, N1, N3]
    assert cluster.seen[-1].node == N2
    assert [m.body for m in cluster.store.channel(a).ready] == [1, 2]


async def test_async_follows_a_failover_after_a_connection_error(cluster: FakeCluster) -> None:
    a = on(cluster, "s1")
    async with aclient(cluster, [N1, N2]) as c:
        await c.enqueue(a, 1)
        cluster.fail_over("s1", N3)
        await c.enqueue(a, 2)
    assert [s.node for s in cluster.sent(f"{a}/enqueue")] == [N1, N1, N3]


def test_an_enqueue_retried_on_the_new_owner_keeps_its_dedup_ids(cluster: FakeCluster) -> None:
    """n1 stores the batch and dies before answering; the retry, on n3, sends the same dedup
    ids, so the shared store keeps one copy and answers with the first ids."""
    a = on(cluster, "s1")
    with client(cluster, [N1, N2]) as c:
        c.enqueue(a, "warm-up")
        cluster.store.faults.append("lost")
        cluster.before = lambda node, request: cluster.fail_over("s1", N3) if node == N3 else None
        ids = c.enqueue_many(a, ["x", "y"])
    first, second = (json.loads(s.request.content) for s in cluster.sent(f"{a}/enqueue")[1:])
    assert first == second
    assert [s.node for s in cluster.sent(f"{a}/enqueue")] == [N1, N1, N3]
    assert [m.body for m in cluster.store.channel(a).ready] == ["warm-up", "x", "y"]
    assert ids == [m.id for m in list(cluster.store.channel(a).ready)[1:]]


def test_a_failover_longer_than_the_attempts_is_waited_out(cluster: FakeCluster) -> None:
    a = on(cluster, "s1")
    with client(cluster, [N1, N2], retry=fast(attempts=2)) as c:
        c.enqueue(a, 0)
        cluster.fail_over("s1", None)
        answers = iter(range(10))
        cluster.before = lambda node, request: (
            None if next(answers, 10) < 8 else cluster.owner.update(s1=N3)
        )
        assert c.enqueue(a, 1)


def test_the_failover_allowance_has_an_end(cluster: FakeCluster) -> None:
    a = on(cluster, "s1")
    with client(cluster, [N1, N2], retry=fast(attempts=2)) as c:
        c.enqueue(a, 0)
        cluster.owner["s1"] = None  # the shard never gets a new owner
        before = len(cluster.seen)
        with pytest.raises(lionmq.ServiceUnavailable):
            c.enqueue(a, 1)
    # 10 s of allowance on a clock moving 0.25 s a read: bounded, and more than the attempts.
    assert 2 < len(cluster.sent(f"{a}/enqueue")) - 1 < len(cluster.seen) - before <= 100


# -- a standalone node, as before clusters -------------------------------------------------


def test_an_old_node_gets_exactly_the_requests_it_always_got() -> None:
    node = FakeNode()
    policy = RetryPolicy(attempts=2, base_delay=0.0, max_delay=0.0)
    with Client("http://node", transport=node.transport(), retry=policy) as c:
        for n in range(10):
            c.enqueue("jobs", n)
        node.faults.extend([503, 503])
        with pytest.raises(lionmq.ServiceUnavailable):  # no failover allowance for one node
            c.enqueue("jobs", "x")
    assert len(node.requests) == 12
    assert not [r for r in node.requests if r.url.path == "/cluster"]


def test_a_standalone_node_costs_one_topology_fetch_in_all() -> None:
    """A node with the cluster API (X-LionMQ-Node on its replies) answering one shard: one
    fetch after the first reply, then nothing more than the calls; the seed keeps getting
    them although the node advertises another URL (0.0.0.0 inside a container, say)."""
    cluster = FakeCluster({"s1": ["http://0.0.0.0:8000"]}, single=True)
    with client(cluster, "http://localhost:8000") as c:
        for n in range(50):
            c.enqueue("jobs", n)
        for message in c.dequeue("jobs", 50):
            message.ack()
    assert len(cluster.seen) == 50 + 1 + 50 + 1
    assert cluster.fetches() == 1
    assert {s.node for s in cluster.seen} == {"http://localhost:8000"}


def test_an_old_node_answering_404_to_cluster_is_asked_once() -> None:
    node = FakeNode()
    seen: list[str] = []

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(f"{request.url.host} {request.url.path}")
        if request.url.path == "/cluster":
            return httpx.Response(404, json={"title": "Not Found"})
        return node.respond(request)[0]

    with Client(
        ["http://a:1", "http://b:2"], transport=httpx.MockTransport(handle), retry=fast()
    ) as c:
        for n in range(5):
            c.enqueue("jobs", n)
    assert seen == ["a /cluster"] + ["a /channels/jobs/enqueue"] * 5


# -- consumers -----------------------------------------------------------------------------


def test_sync_consumer_follows_its_channel_to_the_new_owner(cluster: FakeCluster) -> None:
    a = on(cluster, "s1")
    handled: list[int] = []
    stop = threading.Event()
    with client(cluster, [N1, N2]) as c:
        c.enqueue_many(a, range(10))

        def handler(message: lionmq.Message) -> None:
            handled.append(message.body)
            if len(handled) == 5:
                cluster.fail_over("s1", N3)
                c.enqueue_many(a, range(10, 20))
            if len(handled) == 20:
                stop.set()

        worker = threading.Thread(
            target=c.consume, args=(a, handler), kwargs={"stop": stop, "wait_ms": 10}
        )
        worker.start()
        worker.join(10)
        assert not worker.is_alive()
    assert sorted(handled) == list(range(20))
    # Everything after the failover went to n3, acks included; nothing is left unacked.
    late = [s for s in cluster.seen if s.path.startswith(f"/channels/{a}/") and s.node != N1]
    assert {s.node for s in late} == {N3}
    assert cluster.sent(f"{a}/ack")[-1].node == N3
    assert not cluster.store.channel(a).leased
    assert not cluster.store.channel(a).ready


async def test_async_consumer_follows_its_channel_to_the_new_owner(
    cluster: FakeCluster,
) -> None:
    a = on(cluster, "s1")
    handled: list[int] = []
    stop = asyncio.Event()
    async with aclient(cluster, [N1, N2]) as c:
        await c.enqueue_many(a, range(10))

        async def handler(message: lionmq.AsyncMessage) -> None:
            handled.append(message.body)
            if len(handled) == 5:
                cluster.fail_over("s1", N3)
                await c.enqueue_many(a, range(10, 20))
            if len(handled) == 20:
                stop.set()

        async with asyncio.timeout(10):
            await c.consume(a, handler, stop=stop, wait_ms=10, concurrency=2)
    assert sorted(handled) == list(range(20))
    assert cluster.sent(f"{a}/ack")[-1].node == N3
    assert not cluster.store.channel(a).leased
    assert not cluster.store.channel(a).ready


# -- cluster() and set_nodes() ---------------------------------------------------------------


def test_cluster_returns_the_document_and_routes_by_it(cluster: FakeCluster) -> None:
    b = on(cluster, "s2")
    with client(cluster, N1) as c:
        info = c.cluster()
        c.enqueue(b, 1)
    assert info.version == 1
    assert [(s.id, s.primary, s.backups, s.owner) for s in info.shards] == [
        ("s1", N1, (N3,), N1),
        ("s2", N2, (N4,), N2),
    ]
    assert info.node is not None and info.node.url == N1
    assert {n.url: n.role for n in info.nodes} == {
        N1: "primary",
        N3: "backup",
        N2: "primary",
        N4: "backup",
    }
    assert where(cluster.seen) == [(N1, "/cluster"), (N2, f"/channels/{b}/enqueue")]


def test_set_nodes_with_shards_sends_them_with_the_admin_token(cluster: FakeCluster) -> None:
    with client(cluster, [N1, N2], token="api") as c:
        stored = c.set_nodes(
            [{"primary": N1, "backups": [N3]}, {"primary": N2, "backups": [N4]}, {"primary": N5}]
        )
    [put] = cluster.sent("/cluster/nodes")
    assert put.method == "PUT"
    assert put.request.headers["authorization"] == f"Bearer {ADMIN}"
    assert json.loads(put.request.content) == {
        "shards": [
            {"primary": N1, "backups": [N3]},
            {"primary": N2, "backups": [N4]},
            {"primary": N5, "backups": []},
        ]
    }
    assert isinstance(stored, lionmq.Topology)
    assert stored.version == 2
    assert [s.id for s in stored.shards] == ["s1", "s2", "s3"]


async def test_set_nodes_with_primaries_and_backups(cluster: FakeCluster) -> None:
    """The original client's setNodes(nodes, backupNodes): shards given by primary."""
    async with aclient(cluster, [N1], token="api") as c:
        stored = await c.set_nodes(primaries=[N1, N2, N3], backups={N1: [N4]})
        a = channel_on("s3", ["s1", "s2", "s3"])
        await c.enqueue(a, "moved")
    assert json.loads(cluster.sent("/cluster/nodes")[0].request.content) == {
        "shards": [
            {"primary": N1, "backups": [N4]},
            {"primary": N2, "backups": []},
            {"primary": N3, "backups": []},
        ]
    }
    assert [s.id for s in stored.shards] == ["s1", "s2", "s3"]
    # The client changed the topology, so it fetched it again before the next call.
    assert where(cluster.seen[-2:]) == [(N1, "/cluster"), (N3, f"/channels/{a}/enqueue")]


@pytest.mark.parametrize(
    ("args", "kwargs"),
    [
        ([[]], {}),  # no shard
        ([[{"primary": N1}, {"primary": N2, "backups": [N1]}]], {}),  # a node twice
        ([[{"primary": "n1:8001"}]], {}),  # not a URL
        ([[{"primary": N1, "replicas": [N2]}]], {}),  # unknown field
        ([[{"backups": [N2]}]], {}),  # no primary
        ([], {"primaries": [N1], "backups": {N2: [N3]}}),  # backups of no primary
        ([], {"primaries": [N1, N1]}),
    ],
)
def test_a_bad_set_nodes_fails_here_and_sends_nothing(
    cluster: FakeCluster, args: list[Any], kwargs: dict[str, Any]
) -> None:
    with client(cluster, [N1, N2]) as c, pytest.raises(InvalidTopology):
        c.set_nodes(*args, **kwargs)
    assert cluster.seen == []


def test_set_nodes_needs_one_form(cluster: FakeCluster) -> None:
    with client(cluster, [N1, N2]) as c:
        with pytest.raises(TypeError):
            c.set_nodes()
        with pytest.raises(TypeError):
            c.set_nodes([{"primary": N1}], primaries=[N1])
        with pytest.raises(TypeError):
            c.set_nodes([{"primary": N1}], backups={N1: [N2]})
    assert cluster.seen == []


def test_set_nodes_without_an_admin_token_fails_here_and_sends_nothing(
    cluster: FakeCluster,
) -> None:
    c = Client([N1, N2], transport=cluster.transport(), token="api", retry=fast())
    with c, pytest.raises(lionmq.Unauthorized) as refused:
        c.set_nodes([{"primary": N1}])
    assert "admin_token" in refused.value.detail
    assert [s for s in cluster.seen if s.path == "/cluster/nodes"] == []


def test_node_refusals_map_to_the_client_errors(cluster: FakeCluster) -> None:
    shards = [{"primary": N1}, {"primary": N2}]
    with Client([N1, N2], transport=cluster.transport(), admin_token="wrong", retry=fast()) as c:
        with pytest.raises(lionmq.Unauthorized) as wrong:
            c.set_nodes(shards)
        cluster.admin_token = None
        with pytest.raises(lionmq.Unauthorized) as unset:
            c.set_nodes(shards)
    assert wrong.value.status == 401
    assert unset.value.status == 403
    assert "ADMIN_TOKEN" in unset.value.detail
    # A node's own validation (a rule the client's copy does not know yet) comes back as 422.
    refused = _answer(422)
    with (
        Client([N1], transport=refused, admin_token=ADMIN, retry=fast()) as c,
        pytest.raises(lionmq.InvalidRequest) as invalid,
    ):
        c.set_nodes(shards)
    assert invalid.value.status == 422


def test_a_wrong_api_token_on_the_topology_fetch_is_raised(cluster: FakeCluster) -> None:
    cluster.token = "right"
    with client(cluster, [N1, N2], token="wrong") as c, pytest.raises(lionmq.Unauthorized):
        c.enqueue(on(cluster, "s1"), 1)
    assert where(cluster.seen) == [(N1, "/cluster")]


def _answer(status: int) -> httpx.MockTransport:
    body = {"title": "Invalid topology", "status": status, "detail": "rejected by the node"}
    return httpx.MockTransport(lambda request: httpx.Response(status, json=body))


def test_cluster_of_a_node_from_before_clusters_says_so() -> None:
    node = FakeNode()
    old = httpx.MockTransport(
        lambda request: (
            httpx.Response(404, json={"title": "Not Found"})
            if request.url.path == "/cluster"
            else node.respond(request)[0]
        )
    )
    with Client("http://node", transport=old, retry=fast()) as c:
        with pytest.raises(lionmq.UnexpectedResponse, match="predates clusters") as error:
            c.cluster()
        c.enqueue("jobs", 1)  # and the client goes on as before
    assert error.value.status == 404
