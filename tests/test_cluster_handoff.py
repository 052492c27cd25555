"""Shard hand-offs: POST /cluster/shards/{id}/handoff on real node processes, and the keeper's
fallback (a lease handed over whose call never came) tick by tick on both stores.

The SIGTERM hand-off of a rolling restart is tested under load in tests/cluster/test_rolling.py.
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import msgspec
import pytest

from app.clock import ManualClock
from app.cluster.heartbeat import HeartbeatSender, Peer
from app.cluster.journal import Answer, Heartbeat, Journal
from app.cluster.liveness import Liveness
from app.cluster.mirror import Follower, Mirror, snapshot_path
from app.cluster.route import Local, Remote
from app.main import create_app
from app.settings import CLUSTER_SECRET_HEADER
from tests.cluster.nodes import ADMIN_TOKEN, Cluster, api_auth
from tests.cluster.rolling import backup_lag, wait_caught_up
from tests.conftest import NodeProcess, make_settings, wait_until
from tests.test_cluster_api import client_for
from tests.test_cluster_keeper import Member, clock, make_store, members, two_shards  # noqa: F401  (fixture)  # noqa: F401  (fixtures)
from tests.test_engine import Env, msg

SHARD = "s1"
_enc = msgspec.json.Encoder()
_hb = msgspec.json.Decoder(Heartbeat)
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
TIMEOUT = httpx.Timeout(10.0, connect=2.0)


# -- the keeper's fallback ---------------------------------------------------------------------


async def test_a_lease_handed_over_is_adopted_at_the_next_tick(
    members: Callable[..., Member],  # noqa: F811
    clock: ManualClock,  # noqa: F811
) -> None:
    """The old owner transferred the lease and died before telling the new one: its next
    tick adopts it at once (no expiry waited out, no failover counted), and the old owner,
    if it ticks again, follows."""
    init = two_shards("http://127.0.0.1:9101", "http://127.0.0.1:9102", "http://127.0.0.1:9103")
    a = members("a", 9101, cluster_init=init)
    b = members("b", 9102, cluster_init=init)
    c = members("c", 9103, cluster_init=init)
    for m in (a, b, c):
        await m.start()
    channel = next(f"c{i}" for i in range(100) if a.runtime.shard_of(f"c{i}") == "s1")
    await a.enqueue(channel, b"one")
    assert c.runtime.owned() == {}
    moved = await a.store.transfer_lease("s1", "a", 1, "c", c.url, 2000)
    assert moved is not None and moved.epoch == 2
    await c.tick()  # no clock moved: the lease is live, and c's by a transfer
    assert c.runtime.owned() == {"s1": 2}
    assert c.runtime.route(channel) == Local("s1")
    assert c.runtime.counters.failovers == 0
    assert c.engine.channels[channel].total == 1
    await a.tick()
    assert a.runtime.owned() == {}
    assert a.runtime.route(channel) == Remote("s1", c.url, "c")


async def test_a_restarted_node_does_not_adopt_its_previous_lives_lease(
    members: Callable[..., Member],  # noqa: F811
    clock: ManualClock,  # noqa: F811
) -> None:
    """A live lease under this node's id that was there at its first reading is a previous
    life's (kill -9, restart): waited out, as before, never adopted."""
    init = two_shards("http://127.0.0.1:9101", "http://127.0.0.1:9102")
    a = members("a", 9101, cluster_init=init)
    await a.start()
    assert a.runtime.owned() == {"s1": 1}
    again = members("a", 9101, cluster_init=init)  # the same id, a new process
    await again.start()
    assert again.runtime.owned() == {}
    await again.tick(100)
    assert again.runtime.owned() == {}


# -- the owner's last heartbeat -----------------------------------------------------------------


async def test_catch_up_tells_an_up_to_date_backup_from_one_that_never_confirmed(
    tmp_path: Path,
) -> None:
    """`catch_up` beats a backup until it holds the newest delta; one that only ever asks for
    a snapshot (resyncing, just met) is never "up to date": `behind` says None and the lag
    the owner reports is at least one beat, never the 0 of a peer just created."""
    env = Env(tmp_path / "owner.db")
    engine = await env.open()
    mirror = Mirror(Liveness(0))
    resyncing = {"http://slow"}

    async def route(request: httpx.Request) -> httpx.Response:
        if request.url.host == "slow":
            return httpx.Response(200, content=_enc.encode(Answer(snapshot=True)))
        if request.url.path == snapshot_path(SHARD):  # the fast backup's resync
            return httpx.Response(200, content=_enc.encode(sender.snapshot(SHARD)))
        answer = follower.heartbeat(_hb.decode(request.content))
        await follower.settle()
        return httpx.Response(200, content=_enc.encode(answer))

    async with httpx.AsyncClient(transport=httpx.MockTransport(route)) as http:
        follower = Follower(mirror, http, "secret", lambda: 0)
        sender = HeartbeatSender(
            engine=engine,
            journal=Journal(lambda name: SHARD),
            owned=lambda: {SHARD: 3},
            backups_of=lambda shard: ["http://fast", *resyncing],
            node_id="owner",
            node_url="http://owner",
            secret="secret",
            heartbeat_ms=100,
            http=http,
            monotonic_ms=lambda: 0,
        )
        try:
            await sender.tick(0)  # opens the shard's journal, meets both backups
            await engine.enqueue("jobs", [msg(1), msg(2)])
            assert await sender.catch_up(SHARD, "http://fast")
            assert await sender.catch_up(SHARD, "http://slow") is False
            assert sender.behind(SHARD) == {"http://fast": 0, "http://slow": None}
            lag = sender.lag()
            assert lag["http://fast"][SHARD] == 0 and lag["http://slow"][SHARD] >= 1
            assert await sender.catch_up("s9", "http://fast") is False  # not journaled here
            # A peer just met (its first beat under way, or a new epoch) is not caught up.
            sender.peers[("http://new", SHARD)] = Peer(epoch=3)
            assert sender.lag()["http://new"][SHARD] == 1
            assert sender.behind(SHARD)["http://new"] is None
        finally:
            await sender.stop()
            await follower.stop()
            await engine.stop()
            await env.store.close()


# -- the endpoint, on processes ----------------------------------------------------------------


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """One shard, primary + backup, fast timings."""
    cluster = Cluster.build(tmp_path_factory.mktemp("handoff"), [[0, 1]])
    try:
        yield cluster.start()
    except BaseException:
        print(cluster.log_tails())
        raise
    finally:
        cluster.stop()


def handoff(node: NodeProcess, shard: str, body: object = None, **kw: object) -> httpx.Response:
    headers = kw.pop("headers", ADMIN)
    return httpx.post(
        f"{node.url}/cluster/shards/{shard}/handoff",
        json=body,
        headers=headers,  # type: ignore[arg-type]
        timeout=TIMEOUT,
    )


def caught_up(cluster: Cluster, backup: int, shard: str) -> None:
    owner = cluster.node_at(cluster.view()["shards"][0]["owner"])
    wait_caught_up(owner, cluster.nodes[backup], shard, 15)


def metric(node: NodeProcess, name: str) -> float:
    text = httpx.get(node.url + "/metrics", headers=api_auth(), timeout=TIMEOUT).text
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


def test_handoff_moves_the_shard_with_its_messages_and_leases(pair: Cluster) -> None:
    """Asked of the backup (forwarded to the owner): the backup owns the shard at the next
    epoch at once, the messages and the lease of one in flight with it; GET /cluster shows the
    hand-off, /metrics counts it. Asked again by name, the shard goes back."""
    (shard,) = pair.shard_ids()
    owner, backup = pair.nodes
    before = int(pair.view()["shards"][0]["epoch"])
    http = pair.http(TIMEOUT)
    r = http.post(
        f"{owner.url}/channels/ho/enqueue", json={"messages": [{"body": i} for i in range(3)]}
    )
    assert r.status_code == 201, r.text
    got = http.post(f"{owner.url}/channels/ho/dequeue", json={"max": 1, "visibility_ms": 30000})
    (leased,) = got.json()["messages"]
    caught_up(pair, 1, shard)

    r = handoff(backup, shard)  # not the owner: forwarded to it
    assert r.status_code == 200, r.text
    doc = r.json()
    assert doc["shard"] == shard and doc["epoch"] == before + 1
    assert doc["from"] == owner.server_host and doc["to"] == backup.server_host
    assert 0 <= doc["took_ms"] < 2000
    for via in pair.nodes:  # both see it at once: no tick waited for
        view = pair.view(via)
        assert view["shards"][0]["owner"] == backup.server_host
        assert view["shards"][0]["epoch"] == before + 1
    assert {k: v for k, v in pair.view()["last_handoff"].items() if k != "at"} == doc
    assert metric(owner, "lionmq_handoffs_total") >= 1
    labels = f'{{shard="{shard}",to="{backup.server_host}"}}'
    assert metric(owner, "lionmq_last_handoff_seconds" + labels) == doc["took_ms"] / 1000
    assert metric(owner, "lionmq_last_handoff_timestamp_seconds" + labels) > 1.7e9
    # The lease in flight is honoured by the new owner; the rest is served there.
    r = http.post(f"{backup.url}/channels/ho/ack", json={"receipts": [leased["receipt"]]})
    assert r.status_code == 200 and r.json()["stale"] == [], r.text
    r = http.post(f"{owner.url}/channels/ho/dequeue", json={"max": 10})
    assert r.status_code == 200 and r.headers["x-lionmq-node"] == backup.node_id
    assert sorted(m["body"] for m in r.json()["messages"]) == [1, 2]

    caught_up(pair, 0, shard)
    r = handoff(owner, shard, {"to": owner.server_host + "/"})  # named (normalised)
    assert r.status_code == 200, r.text
    assert r.json()["to"] == owner.server_host and r.json()["epoch"] == before + 2
    http.close()


def test_handoff_refusals(pair: Cluster) -> None:
    (shard,) = pair.shard_ids()
    node = pair.nodes[0]
    owner = pair.node_at(pair.view()["shards"][0]["owner"])
    other = next(n for n in pair.nodes if n is not owner)
    r = handoff(node, "s9")
    assert r.status_code == 404 and "no shard 's9'" in r.json()["detail"]
    r = handoff(node, shard, headers={})
    assert r.status_code == 401 and "ADMIN_TOKEN" in r.json()["detail"]
    r = handoff(node, shard, headers=api_auth())  # the API token is not the admin token
    assert r.status_code == 401
    r = handoff(node, shard, {"to": "not a url"})
    assert r.status_code == 422
    r = handoff(node, shard, {"nope": 1})
    assert r.status_code == 422
    r = handoff(owner, shard, {"to": "http://127.0.0.1:1"})
    assert r.status_code == 409, r.text
    assert "http://127.0.0.1:1 is not a backup of this shard" in r.json()["detail"]
    # Nothing moved.
    assert pair.view()["shards"][0]["owner"] == owner.server_host
    # The backup frozen: it confirms no heartbeat, so it is not up to date; nothing moves.
    other.freeze_outside_store_lock()
    try:
        wait_until(lambda: (backup_lag(owner, other, shard) or 0) > 0, 10, "a lagging backup")
        r = handoff(owner, shard)
        assert r.status_code == 409, r.text
        assert "no backup is up to date" in r.json()["detail"], r.text
        assert pair.view(owner)["shards"][0]["owner"] == owner.server_host
        r = httpx.post(
            f"{owner.url}/channels/ho2/enqueue",
            json={"messages": [{"body": 1}]},
            headers=api_auth(),
            timeout=TIMEOUT,
        )
        assert r.status_code == 201, r.text  # served on, as if nothing was asked
    finally:
        other.resume()


def test_sigterm_without_an_up_to_date_backup_releases_the_shard(pair: Cluster) -> None:
    """The fallback (its owner is stopped; the next test starts it again). Its backup frozen,
    a SIGTERM makes no hand-off: the owner releases the lease before it exits, and the backup,
    woken, takes it at its next tick without waiting out any expiry."""
    (shard,) = pair.shard_ids()
    before = pair.view()
    owner = pair.node_at(before["shards"][0]["owner"])
    other = next(n for n in pair.nodes if n is not owner)
    caught_up(pair, other.index, shard)
    other.freeze_outside_store_lock()
    try:
        wait_until(lambda: (backup_lag(owner, other, shard) or 0) > 0, 10, "a lagging backup")
        owner.stop()  # SIGTERM, and wait for the exit
    finally:
        other.resume()
    # uvicorn ends a graceful stop by raising the signal it caught again (status -15).
    assert owner.proc is not None and owner.proc.returncode in (0, -signal.SIGTERM)
    assert "no hand-off" in owner.log.read_text()
    wait_until(lambda: pair.owners_are({shard: other.server_host}, other), 5, "the backup owns")
    view = pair.view(other)
    assert view["shards"][0]["epoch"] == before["shards"][0]["epoch"] + 1
    assert view["last_handoff"] == before["last_handoff"]  # no hand-off was made


def test_sigterm_waits_for_a_backup_still_catching_up(pair: Cluster) -> None:
    """After the test above: its stopped owner comes back (a backup, resyncing its mirror) and
    the shard's owner gets SIGTERM at once, as a rolling restart that does not wait for the
    backup's lag to reach 0 would do: the owner waits for it to catch up, then hands off."""
    before = pair.view()
    owner = pair.node_at(before["shards"][0]["owner"])
    back = next(n for n in pair.nodes if n is not owner)
    assert not back.running
    back.restart()
    owner.stop()
    view = pair.view(back)
    assert view["shards"][0]["owner"] == back.server_host
    assert view["shards"][0]["epoch"] == before["shards"][0]["epoch"] + 1
    last = view["last_handoff"]
    assert (last["from"], last["to"], last["epoch"]) == (
        owner.server_host,
        back.server_host,
        before["shards"][0]["epoch"] + 1,
    )


async def test_handoff_is_forbidden_without_an_admin_token(
    app_client: httpx.AsyncClient,
) -> None:
    r = await app_client.post("/cluster/shards/s0/handoff", headers=ADMIN)
    assert r.status_code == 403 and "ADMIN_TOKEN" in r.json()["detail"]


async def test_a_standalone_node_has_no_backup_to_hand_off_to(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, admin_token=ADMIN_TOKEN, cluster_secret="shh")
    async for client in client_for(create_app(settings)):
        r = await client.post("/cluster/shards/s0/handoff", headers=ADMIN)
        assert r.status_code == 409, r.text
        assert (
            r.json()["detail"]
            == "shard s0 is not handed off: the shard has no backup to hand it to"
        )
        # The node-to-node calls of a hand-off take the cluster secret, nothing else.
        for path in ("/cluster/internal/shards/s0/adopt", "/cluster/internal/shards/s0/look"):
            r = await client.post(path, json={"epoch": 2, "from": "http://x:1"}, headers=ADMIN)
            assert r.status_code == 401, r.text
        r = await client.post(
            "/cluster/internal/shards/s0/adopt",
            json={"epoch": 7, "from": "http://x:1"},
            headers={CLUSTER_SECRET_HEADER: "shh"},
        )
        assert r.status_code == 200 and r.json() == {"served": True}  # its own already
