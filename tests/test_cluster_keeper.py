"""The ownership keeper driven tick by tick with fake clocks, on both stores.

Two "nodes" (a runtime and an engine each, over their own store instance on the same data) share
one store clock (which judges lease expiry) and each has its own monotonic clock.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest
from lionmq.placement import shard_for
from lionmq.topology import SetNodes, ShardSpec, decode_topology, next_topology
from mongomock_motor import AsyncMongoMockClient

from app.clock import ManualClock
from app.cluster.route import Local, NoOwner, Remote
from app.cluster.runtime import ClusterRuntime
from app.engine.ids import id_slot
from app.engine.queue import EngineLimits, NewMessage, QueueEngine
from app.errors import Fenced
from app.settings import Settings
from app.store.base import ShardLease, Store
from app.store.mongo import MongoStore
from app.store.sqlite import SQLiteStore

NOW = 1_700_000_000_000
LEASE = 2000
HEARTBEAT = 500

MakeStore = Callable[[], Store]


class Mono:
    def __init__(self) -> None:
        self.now = 10_000

    def __call__(self) -> int:
        return self.now


class Member:
    """One node: its store instance, engine, runtime and monotonic clock."""

    def __init__(self, name: str, port: int, store: Store, clock: ManualClock, **env: Any):
        env.setdefault("cluster_secret", "s3cret")
        self.mono = Mono()
        self.store = store
        self.settings = Settings(
            _env_file=None,  # type: ignore[call-arg]
            node_id=name,
            port=port,
            server_host=f"http://127.0.0.1:{port}",
            lease_ms=LEASE,
            heartbeat_ms=HEARTBEAT,
            **env,
        )
        self.engine = QueueEngine(store, clock, EngineLimits(window_size=100))
        self.runtime = ClusterRuntime(self.settings, store, self.engine, clock, mono=self.mono)

    @property
    def url(self) -> str:
        return self.runtime.url

    async def start(self) -> None:
        await self.store.open()
        await self.engine.start()
        await self.runtime.start(loop=False)

    async def tick(self, advance: int = 0) -> None:
        self.mono.now += advance
        await self.runtime.keeper.tick(self.mono.now)

    async def enqueue(self, channel: str, *bodies: bytes) -> list[int]:
        batch = [NewMessage(body=msgspec.Raw(b'"' + b + b'"')) for b in bodies]
        return await self.engine.enqueue(channel, batch)

    async def close(self) -> None:
        await self.runtime.stop()
        await self.engine.stop()
        await self.store.close()


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(NOW)


@pytest.fixture(params=["sqlite", "mongomock"])
def make_store(request: pytest.FixtureRequest, tmp_path: Path, clock: ManualClock) -> MakeStore:
    if request.param == "sqlite":
        path = str(tmp_path / "lionmq.db")
        return lambda: SQLiteStore(path, clock=clock)
    client: Any = AsyncMongoMockClient()
    return lambda: MongoStore(client=client, database="lionmq_keeper", clock=clock)


@pytest.fixture
async def members(
    make_store: MakeStore, clock: ManualClock
) -> AsyncIterator[Callable[..., Member]]:
    made: list[Member] = []

    def member(name: str, port: int, **env: Any) -> Member:
        m = Member(name, port, make_store(), clock, **env)
        made.append(m)
        return m

    yield member
    for m in reversed(made):
        await m.close()


def two_shards(a: str, b: str, *backups_of_a: str) -> str:
    shards = [{"primary": a, "backups": list(backups_of_a)}, {"primary": b}]
    return msgspec.json.encode({"shards": shards}).decode()


async def test_first_node_serves_the_implicit_shard_second_waits(
    members: Callable[..., Member],
) -> None:
    a, b = members("a", 9101), members("b", 9102)
    await a.start()
    await b.start()
    assert a.runtime.route("jobs") == Local("s0")
    assert b.runtime.route("jobs") == Remote("s0", a.url, "a")
    assert a.runtime.owned() == {"s0": 1} and b.runtime.owned() == {}
    await a.enqueue("jobs", b"x")
    with pytest.raises(Fenced):
        await b.enqueue("jobs", b"y")  # the standby never takes a request itself
    assert a.runtime.role() == "primary" and b.runtime.role() == "backup"


async def test_standby_takes_over_a_lapsed_lease_and_the_old_owner_is_fenced(
    members: Callable[..., Member], clock: ManualClock
) -> None:
    a, b = members("a", 9101), members("b", 9102)
    await a.start()
    await b.start()
    await a.enqueue("jobs", b"one")
    # a stops renewing (frozen); the store's clock passes its lease.
    clock.advance(LEASE + 1)
    await b.tick(LEASE + 1)
    assert b.runtime.owned() == {"s0": 2}
    assert b.runtime.counters.failovers == 1
    leases = await b.engine.dequeue("jobs", 1, 0, None)
    assert [lease.message.body for lease in leases] == [b'"one"']
    # a, frozen for LEASE on its own clock, has stopped serving without any tick...
    a.mono.now += LEASE
    assert isinstance(a.runtime.route("jobs"), NoOwner | Remote)
    with pytest.raises(Fenced):
        await a.enqueue("jobs", b"late")
    # ...and once it ticks it follows b, its old channels let go.
    await a.tick()
    assert a.runtime.route("jobs") == Remote("s0", b.url, "b")
    assert "jobs" not in a.engine.channels


async def test_a_write_under_a_deposed_epoch_is_refused_by_the_store(
    members: Callable[..., Member], clock: ManualClock
) -> None:
    a, b = members("a", 9101), members("b", 9102)
    await a.start()
    await b.start()
    await a.enqueue("jobs", b"one")
    clock.advance(LEASE + 1)
    await b.tick(LEASE + 1)
    # a still believes it serves (its monotonic clock did not move): the store refuses it.
    assert a.runtime.route("jobs") == Local("s0")
    with pytest.raises(Fenced):
        await a.enqueue("jobs", b"late")
    counts = await b.store.counts("jobs", clock.now_ms())
    assert counts.total == 1


async def test_graceful_stop_hands_the_shard_over_at_once(
    members: Callable[..., Member],
) -> None:
    a, b = members("a", 9101), members("b", 9102)
    await a.start()
    await b.start()
    await a.enqueue("jobs", b"one")
    await a.runtime.stop()
    await b.tick()  # no clock moved: the lease was released
    assert b.runtime.owned() == {"s0": 2}
    assert b.runtime.counters.failovers == 0
    assert b.engine.channels["jobs"].total == 1


async def test_not_renewed_in_time_stops_serving(members: Callable[..., Member]) -> None:
    a = members("a", 9101)
    await a.start()
    await a.tick(LEASE - LEASE // 4 - 1)
    assert a.runtime.route("c") == Local("s0")  # renewed by that tick
    a.mono.now += LEASE - LEASE // 4
    assert isinstance(a.runtime.route("c"), NoOwner)
    assert a.runtime.problem() is not None


async def test_two_shards_each_primary_serves_its_own(members: Callable[..., Member]) -> None:
    init = two_shards("http://127.0.0.1:9101", "http://127.0.0.1:9102")
    a = members("a", 9101, cluster_init=init)
    b = members("b", 9102, cluster_init=init)
    await a.start()
    await b.start()
    await a.tick()
    assert a.runtime.owned() == {"s1": 1} and b.runtime.owned() == {"s2": 1}
    names = [f"ch{i}" for i in range(40)]
    mine = {n: a.runtime.shard_of(n) for n in names}
    assert set(mine.values()) == {"s1", "s2"}
    for name in names:
        owner = a if mine[name] == "s1" else b
        other = b if owner is a else a
        assert owner.runtime.route(name) == Local(mine[name])
        assert other.runtime.route(name) == Remote(mine[name], owner.url, owner.settings.node_id)
        (msg_id,) = await owner.enqueue(name, b"m")
        assert id_slot(msg_id) == (1 if owner is a else 2)
        with pytest.raises(Fenced):
            await other.enqueue(name, b"m")


async def test_backup_takes_over_only_after_heartbeat_silence_and_expiry(
    members: Callable[..., Member], clock: ManualClock
) -> None:
    init = two_shards("http://127.0.0.1:9101", "http://127.0.0.1:9102", "http://127.0.0.1:9103")
    a = members("a", 9101, cluster_init=init)
    b = members("b", 9102, cluster_init=init)
    c = members("c", 9103, cluster_init=init)
    for m in (a, b, c):
        await m.start()
    assert c.runtime.role() == "backup" and c.runtime.owned() == {}
    assert c.runtime.backups_of("s1") == ("http://127.0.0.1:9101",)
    assert a.runtime.backups_of("s1") == ("http://127.0.0.1:9103",)
    clock.advance(LEASE + 1)  # a's lease on s1 lapsed in the store...
    c.runtime.liveness.beat("s1", c.mono.now)
    await c.tick(100)  # ...but heartbeats came (the store path alone is cut): no takeover
    assert c.runtime.owned() == {}
    await c.tick(LEASE)  # silent for LEASE_MS and expired: take it
    assert c.runtime.owned() == {"s1": 2}
    assert c.runtime.counters.failovers == 1
    # a comes back: it finds a higher epoch held live and follows as a backup.
    await a.tick(LEASE)
    assert a.runtime.owned() == {}
    channel = next(f"c{i}" for i in range(100) if a.runtime.shard_of(f"c{i}") == "s1")
    assert a.runtime.route(channel) == Remote("s1", c.url, "c")


async def test_set_nodes_hands_channels_off_and_the_new_owner_adopts_them(
    members: Callable[..., Member],
) -> None:
    a = members("a", 9101, cluster_init='{"shards": [{"primary": "http://127.0.0.1:9101"}]}')
    b = members("b", 9102)
    await a.start()
    await b.start()
    names = [f"ch{i}" for i in range(30)]
    for name in names:
        await a.enqueue(name, b"m")
    stored = await a.store.topology()
    assert stored is not None
    new = next_topology(
        decode_topology(stored[1]),
        SetNodes((ShardSpec("http://127.0.0.1:9101"), ShardSpec("http://127.0.0.1:9102"))),
    )
    assert await a.store.swap_topology(stored[0], new.version, msgspec.json.encode(new))
    await b.tick()  # b sees the new shard, takes it, but waits for a to let go
    moved = [n for n in names if b.runtime.shard_of(n) == "s2"]
    assert moved and len(moved) < len(names)
    assert all(isinstance(b.runtime.route(n), NoOwner) for n in moved)
    await a.tick()  # a drains and releases what moved, reports version 2
    assert not set(moved) & set(a.engine.channels)
    assert a.runtime.keeper.applied_version == new.version
    await b.tick()
    for name in moved:
        assert b.runtime.route(name) == Local("s2")
        assert b.engine.channels[name].total == 1
        assert a.runtime.route(name) == Remote("s2", b.url, "b")
    stay = [n for n in names if n not in moved]
    assert all(a.runtime.route(n) == Local("s1") for n in stay)


async def test_dead_letter_across_shards_reaches_the_target_owner(
    members: Callable[..., Member],
) -> None:
    init = two_shards("http://127.0.0.1:9101", "http://127.0.0.1:9102")
    a = members("a", 9101, cluster_init=init)
    b = members("b", 9102, cluster_init=init)
    await a.start()
    await b.start()
    source = next(f"src{i}" for i in range(100) if a.runtime.shard_of(f"src{i}") == "s1")
    target = next(f"dlq{i}" for i in range(100) if a.runtime.shard_of(f"dlq{i}") == "s2")
    await a.enqueue(source, b"bad")
    await a.engine.configure(source, {"dead_letter": target})
    (lease,) = await a.engine.dequeue(source, 1, 0, None)
    from app.engine.ids import receipt

    await a.engine.nack(source, [receipt(lease.message.id, lease.attempt)], 0, True)
    assert a.engine.channels[source].total == 0
    # The poke has no HTTP here; the target's owner finds it when poked (or on its audit).
    assert await b.runtime.poked(target)
    (moved,) = await b.engine.dequeue(target, 1, 0, None)
    assert moved.message.body == b'"bad"'
    assert moved.message.headers is not None and b"x-dead-letter-channel" in moved.message.headers


async def test_same_node_id_from_another_url_refuses_to_start(
    members: Callable[..., Member],
) -> None:
    a = members("a", 9101)
    await a.start()
    twin = members("a", 9109)
    from app.errors import ConfigError

    with pytest.raises(ConfigError, match="NODE_ID"):
        await twin.start()


async def test_a_topology_without_cluster_secret_refuses_to_start(
    members: Callable[..., Member],
) -> None:
    from app.errors import ConfigError

    a = members("a", 9101, cluster_init='{"shards": [{"primary": "http://127.0.0.1:9101"}]}')
    await a.start()
    b = members("b", 9102, cluster_secret="")
    with pytest.raises(ConfigError, match="CLUSTER_SECRET"):
        await b.start()


# -- interleavings: set_nodes racing a failover -------------------------------------------

A, B, C = "http://127.0.0.1:9101", "http://127.0.0.1:9102", "http://127.0.0.1:9103"


async def set_nodes(m: Member, *specs: ShardSpec) -> None:
    stored = await m.store.topology()
    assert stored is not None
    new = next_topology(decode_topology(stored[1]), SetNodes(specs))
    assert await m.store.swap_topology(stored[0], new.version, msgspec.json.encode(new))


async def test_set_nodes_landing_while_a_backup_takes_over_gives_a_channel_one_owner(
    members: Callable[..., Member], clock: ManualClock
) -> None:
    """A backup reads topology n, a set_nodes stores n+1 moving channel X to a new shard, the
    new shard's owner finds X's source lease expired (its primary is dead) and adopts X, then the
    backup's take of the source shard succeeds: it must place channels by n+1, not by the n it
    read before its take, or X has two owners (each fenced by its own shard's epoch)."""
    init = msgspec.json.encode({"shards": [{"primary": A, "backups": [C]}]}).decode()
    a = members("a", 9101, cluster_init=init)
    b, c = members("b", 9102), members("c", 9103)
    for m in (a, b, c):
        await m.start()
    names = [f"ch{i}" for i in range(40)]
    for name in names:
        await a.enqueue(name, b"m")
    clock.advance(LEASE + 1)  # a dies: its lease on s1 lapses in the store
    take = c.store.take_lease

    async def set_nodes_then_take(*args: Any, **kwargs: Any) -> ShardLease | None:
        # between c's reading of topology n and its take: set_nodes, and b's whole tick
        await set_nodes(b, ShardSpec(A, (C,)), ShardSpec(B))
        await b.tick()
        return await take(*args, **kwargs)

    c.store.take_lease = set_nodes_then_take  # type: ignore[method-assign]
    await c.tick(LEASE + 1)
    c.store.take_lease = take  # type: ignore[method-assign]
    assert c.runtime.owned() and b.runtime.owned()
    moved = [n for n in names if b.runtime.shard_of(n) == "s2"]
    assert moved
    for name in moved:
        owners = [m.settings.node_id for m in (b, c) if isinstance(m.runtime.route(name), Local)]
        assert owners == ["b"], (name, owners)
        assert name not in c.engine.channels


async def test_a_new_owner_judges_the_sources_of_a_move_on_leases_read_after_the_topology(
    members: Callable[..., Member], clock: ManualClock
) -> None:
    """b reads the leases (s1's expired: its primary died), then c takes s1 and serves its
    channels under topology n, then set_nodes stores n+1 moving X to b's new shard, then b reads
    n+1: b must not adopt X on the strength of the leases it read before (c holds s1 live by
    now and has not let X go)."""
    init = msgspec.json.encode({"shards": [{"primary": A, "backups": [C]}]}).decode()
    a = members("a", 9101, cluster_init=init)
    b, c = members("b", 9102), members("c", 9103)
    for m in (a, b, c):
        await m.start()
    names = [f"ch{i}" for i in range(40)]
    for name in names:
        await a.enqueue(name, b"m")
    clock.advance(LEASE + 1)  # a dies: its lease on s1 lapses in the store
    read = b.store.leases
    done: list[bool] = []

    async def read_then_failover_and_set_nodes() -> dict[str, ShardLease]:
        leases = await read()
        if not done:
            done.append(True)
            await c.tick(LEASE + 1)  # c takes s1 and adopts its channels (topology n)
            await set_nodes(c, ShardSpec(A, (C,)), ShardSpec(B))
        return leases

    b.store.leases = read_then_failover_and_set_nodes  # type: ignore[method-assign]
    await b.tick()
    b.store.leases = read  # type: ignore[method-assign]
    moved = [n for n in names if shard_for(n, ("s1", "s2")) == "s2"]
    assert moved and c.runtime.owned()
    for name in moved:
        owners = [m.settings.node_id for m in (b, c) if isinstance(m.runtime.route(name), Local)]
        assert len(owners) <= 1, (name, owners)
    # and the hand-off completes: c lets go of X, then b adopts it
    await c.tick()
    await b.tick()
    for name in moved:
        assert isinstance(b.runtime.route(name), Local) and name not in c.engine.channels


async def test_a_channel_entering_memory_while_set_nodes_moves_it_is_let_go_too(
    members: Callable[..., Member],
) -> None:
    """A channel being built in memory (its first request) when set_nodes moves it away is not
    among the channels the keeper saw at the hand-off; once built it must be let go as well, or
    its stale memory stays behind and is served again if the channel ever moves back."""
    a = members("a", 9101, cluster_init=msgspec.json.encode({"shards": [{"primary": A}]}).decode())
    b = members("b", 9102)
    await a.start()
    await b.start()
    name = next(f"x{i}" for i in range(100) if shard_for(f"x{i}", ("s1", "s2")) == "s2")
    counts = a.store.counts
    entered, go_on = asyncio.Event(), asyncio.Event()

    async def held_counts(channel: str, now: int) -> Any:
        if channel == name:
            entered.set()
            await go_on.wait()
        return await counts(channel, now)

    a.store.counts = held_counts  # type: ignore[method-assign]
    building = asyncio.ensure_future(a.engine.ensure(name))
    await asyncio.wait_for(entered.wait(), 5)
    await set_nodes(a, ShardSpec(A), ShardSpec(B))
    ticking = asyncio.ensure_future(a.tick())
    for _ in range(100):  # the tick reaches the hand-off's wait for writes under way
        if a.runtime.keeper.topology is not None and a.runtime.keeper.topology.version == 2:
            break
        await asyncio.sleep(0)
    go_on.set()
    await asyncio.wait_for(ticking, 5)
    with pytest.raises(Fenced):  # its first request is told to retry (at its new owner)
        await asyncio.wait_for(building, 5)
    a.store.counts = counts  # type: ignore[method-assign]
    assert name not in a.engine.channels


async def test_a_dead_letter_into_a_never_created_channel_of_another_shard_survives_a_lost_poke(
    members: Callable[..., Member], clock: ManualClock
) -> None:
    """The poke to the target's owner is lost (here: nothing listens on its URL, as when the
    target's shard fails over); its owner's audit must still find the dead letter, and so must
    the node that takes the target's shard over next, though the target channel was never
    created by a request (the default `<name>.dlq`)."""
    init = two_shards(A, B)
    a = members("a", 9101, cluster_init=init)
    b = members("b", 9102, cluster_init=init)
    await a.start()
    await b.start()
    source = next(
        f"src{i}"
        for i in range(500)
        if a.runtime.shard_of(f"src{i}") == "s1" and a.runtime.shard_of(f"src{i}.dlq") == "s2"
    )
    target = f"{source}.dlq"
    await a.enqueue(source, b"bad")
    (lease,) = await a.engine.dequeue(source, 1, 0, None)
    from app.engine.ids import receipt

    await a.engine.nack(source, [receipt(lease.message.id, lease.attempt)], 0, True)
    assert a.engine.channels[source].total == 0
    pokes = list(a.runtime._pokes)
    if pokes:
        await asyncio.wait(pokes, timeout=5)  # every try fails: nobody listens at b's URL
    await b.runtime.keeper.audit()
    (moved,) = await b.engine.dequeue(target, 1, 0, None)
    assert moved.message.body == b'"bad"'


async def test_a_long_poll_on_a_channel_handed_off_ends_at_once_with_fenced(
    members: Callable[..., Member],
) -> None:
    """A long poll waiting at the old owner when set_nodes moves its channel away must not sit
    out its wait_ms on a channel this node no longer serves (the messages are at the new owner):
    it ends with Fenced (503, so the client goes to the owner)."""
    a = members("a", 9101, cluster_init=msgspec.json.encode({"shards": [{"primary": A}]}).decode())
    b = members("b", 9102)
    await a.start()
    await b.start()
    name = next(f"p{i}" for i in range(100) if shard_for(f"p{i}", ("s1", "s2")) == "s2")
    await a.enqueue(name, b"first")
    await a.engine.dequeue(name, 1, 0, None)  # the channel is empty now, and in memory
    absent = next(f"q{i}" for i in range(100) if shard_for(f"q{i}", ("s1", "s2")) == "s2")
    poll = asyncio.ensure_future(a.engine.dequeue(name, 1, 10_000, None))
    waiting = asyncio.ensure_future(a.engine.dequeue(absent, 1, 10_000, None))  # never created
    await asyncio.sleep(0)
    await set_nodes(a, ShardSpec(A), ShardSpec(B))
    await a.tick()
    assert name not in a.engine.channels
    for polling in (poll, waiting):
        with pytest.raises(Fenced):
            await asyncio.wait_for(polling, 2)


async def test_settling_receipts_at_a_node_that_let_go_of_the_channel_is_refused_not_stale(
    members: Callable[..., Member],
) -> None:
    """The router let an ack, nack and extend in while the node served the channel (Local), and
    the hand-off of set_nodes ran while their bodies were read: the engine, without the channel
    any more, answered every receipt stale (200), so the consumer dropped a handled message's
    ack and it stayed in flight at the new owner until redelivered. Only the owner may call a
    receipt stale; here the answer is Fenced (503), retried at the owner, where it takes effect."""
    from app.engine.ids import receipt

    a = members("a", 9101, cluster_init=msgspec.json.encode({"shards": [{"primary": A}]}).decode())
    b = members("b", 9102)
    await a.start()
    await b.start()
    name = next(f"c{i}" for i in range(100) if shard_for(f"c{i}", ("s1", "s2")) == "s2")
    await a.enqueue(name, b"acked", b"nacked", b"extended")
    leases = await a.engine.dequeue(name, 3, 0, None)
    acked, nacked, extended = (receipt(lease.message.id, lease.attempt) for lease in leases)
    assert a.runtime.route(name) == Local("s1")  # the router lets the three requests in ...
    await set_nodes(a, ShardSpec(A), ShardSpec(B))
    await a.tick()  # ... and the hand-off runs while they are on their way to the engine
    assert name not in a.engine.channels
    with pytest.raises(Fenced):
        await a.engine.ack(name, [acked])
    with pytest.raises(Fenced):
        await a.engine.nack(name, [nacked], 0, False)
    with pytest.raises(Fenced):
        await a.engine.extend(name, [extended], 60_000)
    with pytest.raises(Fenced):  # nor "does not exist" (404) to a GET, a purge or a DELETE
        a.engine.get(name)
    await b.tick()  # the client's retries reach the new owner
    assert b.runtime.route(name) == Local("s2")
    assert (await b.engine.ack(name, [acked])).done == 1
    assert (await b.engine.nack(name, [nacked], 0, False)).done == 1
    assert (await b.engine.extend(name, [extended], 60_000)).done == 1
    ch = b.engine.channels[name]
    assert (ch.total, ch.in_flight) == (2, 1)


async def test_settling_receipts_at_an_owner_deposed_by_a_failover_is_refused_not_stale(
    members: Callable[..., Member], clock: ManualClock
) -> None:
    """The same gap on a failover: an ack let in while the node still served its shard reaches
    the engine after the node found its lease taken over and let its channels go (or while it
    keeps their memory, no longer serving): Fenced, never stale, and acked at the new owner."""
    from app.engine.ids import receipt

    a, b = members("a", 9101), members("b", 9102)
    await a.start()
    await b.start()
    await a.enqueue("jobs", b"one", b"two")
    leases = await a.engine.dequeue("jobs", 2, 0, None)
    one, two = (receipt(lease.message.id, lease.attempt) for lease in leases)
    clock.advance(LEASE + 1)  # a froze; b takes the lapsed lease, the leases in flight with it
    await b.tick(LEASE + 1)
    assert b.runtime.owned() == {"s0": 2}
    a.mono.now += LEASE  # a stopped serving by its own clock, its memory still there
    assert "jobs" in a.engine.channels
    bogus = receipt(leases[0].message.id, leases[0].attempt + 1)  # stale in a's memory
    with pytest.raises(Fenced):
        await a.engine.ack("jobs", [bogus])
    await a.tick()  # a follows b: its channels let go
    assert "jobs" not in a.engine.channels
    with pytest.raises(Fenced):
        await a.engine.ack("jobs", [one, two])
    assert (await b.engine.ack("jobs", [one, two])).done == 2
    assert b.engine.channels["jobs"].total == 0


async def test_two_backups_racing_for_a_lapsed_shard_exactly_one_wins(
    members: Callable[..., Member], clock: ManualClock
) -> None:
    """A 3-node shard: its primary dies, both backups find the lease expired and ask the store
    for it in the same instant; the store's compare-and-set gives it to one, the other follows
    it (routes there, its writes refused), on both stores."""
    init = msgspec.json.encode({"shards": [{"primary": A, "backups": [B, C]}]}).decode()
    a = members("a", 9101, cluster_init=init)
    b, c = members("b", 9102, cluster_init=init), members("c", 9103, cluster_init=init)
    for m in (a, b, c):
        await m.start()
    await a.enqueue("jobs", b"one")
    clock.advance(LEASE + 1)
    for m in (b, c):
        m.mono.now += LEASE
    await asyncio.gather(b.runtime.keeper.tick(b.mono.now), c.runtime.keeper.tick(c.mono.now))
    owners = [m for m in (b, c) if m.runtime.owned()]
    assert len(owners) == 1, [m.runtime.owned() for m in (b, c)]
    (winner,) = owners
    loser = c if winner is b else b
    assert winner.runtime.owned() == {"s1": 2} and winner.runtime.counters.failovers == 1
    await loser.tick()
    assert loser.runtime.route("jobs") == Remote("s1", winner.url, winner.settings.node_id)
    with pytest.raises(Fenced):
        await loser.enqueue("jobs", b"loser")
    (lease,) = await winner.engine.dequeue("jobs", 1, 0, None)
    assert lease.message.body == b'"one"'


async def test_graceful_stop_of_a_topology_primary_hands_its_shard_to_a_backup_at_once(
    members: Callable[..., Member],
) -> None:
    """A primary stopped gracefully (rolling restart) releases its lease: its backup takes the
    shard at its next tick, without sitting out LEASE_MS of heartbeat silence as after a crash."""
    init = msgspec.json.encode({"shards": [{"primary": A, "backups": [B]}]}).decode()
    a = members("a", 9101, cluster_init=init)
    b = members("b", 9102, cluster_init=init)
    await a.start()
    await b.start()
    await a.enqueue("jobs", b"one")
    b.runtime.liveness.beat("s1", b.mono.now)  # heartbeats came until the stop
    await a.runtime.stop()
    await b.tick(HEARTBEAT)  # no store clock moved, a heartbeat's silence only
    assert b.runtime.owned() == {"s1": 2}
    assert b.runtime.counters.failovers == 0
    assert b.engine.channels["jobs"].total == 1


async def test_channels_arriving_with_set_nodes_are_not_served_while_the_node_drains_its_writes(
    members: Callable[..., Member],
) -> None:
    """set_nodes removes shard s2: its channels move to a's s1. While a drains its own writes
    under way (the hand-off's quiesce), a channel arriving from s2 must not route as served
    here: a request would build it in memory from the store while b still writes to it, and b's
    next confirmed enqueue would never be counted by a (a lost delivery, seen once in CI)."""
    a = members("a", 9101, cluster_init=msgspec.json.encode({"shards": [{"primary": A}]}).decode())
    b = members("b", 9102)
    await a.start()
    await b.start()
    await set_nodes(a, ShardSpec(A), ShardSpec(B))
    await a.tick()
    await b.tick()
    staying = next(f"x{i}" for i in range(100) if shard_for(f"x{i}", ("s1", "s2")) == "s1")
    arriving = next(f"y{i}" for i in range(100) if shard_for(f"y{i}", ("s1", "s2")) == "s2")
    assert a.runtime.route(staying) == Local("s1")
    assert b.runtime.route(arriving) == Local("s2")
    await a.enqueue(staying, b"first")

    insert = a.store.insert
    entered, go_on = asyncio.Event(), asyncio.Event()

    def held_insert(*args: Any, **kwargs: Any) -> Any:
        async def held() -> Any:
            entered.set()
            await go_on.wait()
            return await insert(*args, **kwargs)

        return held()

    a.store.insert = held_insert  # type: ignore[method-assign]
    writing = asyncio.ensure_future(a.enqueue(staying, b"held"))
    await asyncio.wait_for(entered.wait(), 5)
    await set_nodes(a, ShardSpec(A))  # s2 goes: its channels move onto s1, a's shard
    ticking = asyncio.ensure_future(a.tick())
    for _ in range(200):  # the tick reaches the hand-off's wait for a's writes under way
        if a.runtime.keeper.topology is not None and a.runtime.keeper.topology.version == 3:
            break
        await asyncio.sleep(0)
    assert a.runtime.keeper.topology is not None and a.runtime.keeper.topology.version == 3
    assert not ticking.done()  # still draining: the window this test is about
    try:
        assert not isinstance(a.runtime.route(arriving), Local)
        assert not a.runtime.admits(arriving)
        assert a.runtime.route(staying) == Local("s1")
    finally:
        go_on.set()
        await asyncio.wait_for(writing, 5)
        await asyncio.wait_for(ticking, 5)
        a.store.insert = insert  # type: ignore[method-assign]
    # Once b has let go (it applies version 3 and reports it), a adopts what arrived.
    await b.tick()
    await a.tick()
    assert a.runtime.route(arriving) == Local("s1")


async def test_a_new_shard_goes_to_its_primary_not_to_a_backup_that_learned_of_it_first(
    members: Callable[..., Member],
) -> None:
    """set_nodes adds s2 (primary b, backup c). c, running for long, reads the new topology
    before b: it must leave s2 to b for LEASE_MS (silence counts from when c began to back it),
    and take it only if b never comes."""
    a = members("a", 9101, cluster_init=msgspec.json.encode({"shards": [{"primary": A}]}).decode())
    b, c = members("b", 9102), members("c", 9103)
    for m in (a, b, c):
        await m.start()
    await c.tick(advance=10 * LEASE)  # c has been up for long, never heard of s2
    await set_nodes(a, ShardSpec(A), ShardSpec(B, (C,)))
    await c.tick()
    await c.tick(advance=HEARTBEAT)
    assert "s2" not in c.runtime.keeper.held
    await b.tick()
    assert "s2" in b.runtime.keeper.held

    # Without its primary (d never starts), the backup e takes the new shard after LEASE_MS.
    d, e = "http://127.0.0.1:9104", members("e", 9105)
    await e.start()
    await e.tick(advance=10 * LEASE)
    await set_nodes(a, ShardSpec(A), ShardSpec(B, (C,)), ShardSpec(d, (e.url,)))
    await e.tick()
    assert "s3" not in e.runtime.keeper.held
    await e.tick(advance=LEASE)
    assert "s3" in e.runtime.keeper.held
