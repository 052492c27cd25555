"""Races between a channel's writes and its purge, delete or a consumer hanging up.

`HeldStore` wraps a real store and can hold any of its calls open (before they reach the store)
until the test lets them go, so each interleaving is produced on purpose, not hoped for.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
from mongomock_motor import AsyncMongoMockClient

from app.api import messages
from app.api.deps import Node
from app.clock import ManualClock
from app.cluster.runtime import ClusterRuntime
from app.engine.ids import ReceiptSigner
from app.engine.maintenance import Maintenance
from app.engine.queue import EngineLimits, QueueEngine
from app.errors import ChannelNotFound, StoreUnavailable
from app.models import ChannelConfig
from app.settings import Settings
from app.store.mongo import MongoStore
from app.store.sqlite import SQLiteStore
from tests.test_engine import bodies, msg, receipts

PASSTHROUGH = {"open", "close", "kind"}


class HeldStore:
    """A real store whose calls to held methods wait for the test's go-ahead: before reaching
    the store, or (`after`) with the store's answer in hand; `fail` makes the call fail then."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.kind = inner.kind
        self.held: dict[str, tuple[asyncio.Event, bool, bool]] = {}
        self.entered: dict[str, asyncio.Event] = {}

    def hold(self, method: str, *, after: bool = False, fail: bool = False) -> None:
        self.held[method] = (asyncio.Event(), after, fail)
        self.entered[method] = asyncio.Event()

    def let_go(self, method: str) -> None:
        self.held.pop(method)[0].set()

    async def reached(self, method: str) -> None:
        await asyncio.wait_for(self.entered[method].wait(), 5)

    def __getattr__(self, name: str) -> Any:
        target = getattr(self.inner, name)
        if name in PASSTHROUGH or not callable(target):
            return target

        async def call(*args: Any, **kwargs: Any) -> Any:
            held = self.held.get(name)
            if held is None:
                return await target(*args, **kwargs)
            gate, after, fail = held
            result = await target(*args, **kwargs) if after else None
            self.entered[name].set()
            await asyncio.wait_for(gate.wait(), 5)
            if fail:
                raise StoreUnavailable("the store failed (simulated)")
            return result if after else await target(*args, **kwargs)

        return call


class Env:
    def __init__(self, make_store: Callable[[], Any]) -> None:
        self.make_store = make_store
        self.clock = ManualClock()
        self.limits = EngineLimits(
            defaults=ChannelConfig(visibility_ms=30_000, max_attempts=3),
        )
        self.store = HeldStore(make_store())
        self.engine = QueueEngine(self.store, self.clock, self.limits)  # type: ignore[arg-type]

    async def open(self) -> QueueEngine:
        await self.store.open()
        await self.engine.start()
        return self.engine

    async def restart(self) -> QueueEngine:
        await self.engine.stop()
        await self.store.close()
        self.store = HeldStore(self.make_store())
        self.engine = QueueEngine(self.store, self.clock, self.limits)  # type: ignore[arg-type]
        return await self.open()

    def stats(self, name: str) -> tuple[int, int, int]:
        """(ready, in flight, delayed), or zeros for a channel memory does not hold."""
        ch = self.engine.channels.get(name)
        if ch is None:
            return (0, 0, 0)
        s = ch.stats(self.clock.now_ms())
        return (s.ready, s.in_flight, s.delayed)


@pytest.fixture(params=["sqlite", "mongomock"])
async def env(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[Env]:
    if request.param == "sqlite":
        path = str(tmp_path / "q.db")
        e = Env(lambda: SQLiteStore(path))
    else:
        client = AsyncMongoMockClient()  # one "server" across restarts
        e = Env(lambda: MongoStore(database="lionmq", client=client))
    await e.open()
    yield e
    for gate in list(e.store.held):
        e.store.let_go(gate)
    await e.engine.stop()
    await e.store.close()


async def racing_purge(env: Env, method: str, completion: Awaitable[object]) -> None:
    """Run `completion` with its `method` write held open while the channel is purged."""
    env.store.hold(method)
    task = asyncio.ensure_future(completion)
    await env.store.reached(method)
    assert await env.engine.purge("jobs") == 1
    env.store.let_go(method)
    await task


# -- a purged message must not come back --------------------------------------------------------
async def test_nack_racing_purge_does_not_bring_the_message_back(env: Env) -> None:
    q = env.engine
    await q.enqueue("jobs", [msg("a")])
    got = await q.dequeue("jobs", 1, 0, None)
    await racing_purge(env, "release", q.nack("jobs", receipts(got), 0, False))
    assert await q.dequeue("jobs", 10, 0, None) == []
    assert env.stats("jobs") == (0, 0, 0)
    await q.enqueue("jobs", [msg("b")])  # the channel goes on working
    assert bodies(await q.dequeue("jobs", 10, 0, None)) == ["b"]


async def test_lease_expiry_racing_purge_does_not_bring_the_message_back(env: Env) -> None:
    q = env.engine
    await q.enqueue("jobs", [msg("a")])
    await q.dequeue("jobs", 1, 0, 1000)
    env.clock.advance(1001)
    await racing_purge(env, "release", q.tick(env.clock.now_ms()))
    assert await q.dequeue("jobs", 10, 0, None) == []
    assert env.stats("jobs") == (0, 0, 0)


async def test_extend_racing_purge_does_not_bring_the_message_back(env: Env) -> None:
    q = env.engine
    await q.enqueue("jobs", [msg("a")])
    got = await q.dequeue("jobs", 1, 0, 1000)
    await racing_purge(env, "extend", q.extend("jobs", receipts(got), 5000))
    assert env.stats("jobs") == (0, 0, 0)  # no lease left on a message the store dropped
    env.clock.advance(6000)
    await q.tick(env.clock.now_ms())
    assert await q.dequeue("jobs", 10, 0, None) == []


async def test_ack_failing_after_a_purge_restores_nothing(env: Env) -> None:
    q = env.engine
    await q.enqueue("jobs", [msg("a")])
    got = await q.dequeue("jobs", 1, 0, None)
    env.store.hold("delete", fail=True)
    task = asyncio.ensure_future(q.ack("jobs", receipts(got)))
    await env.store.reached("delete")
    assert await q.purge("jobs") == 1
    env.store.let_go("delete")
    with pytest.raises(StoreUnavailable):
        await task
    assert env.stats("jobs") == (0, 0, 0)


async def test_a_page_read_across_a_purge_is_dropped(env: Env) -> None:
    q = env.engine
    await q.enqueue("jobs", [msg("a")])
    ch = q.channels["jobs"]
    ch.ready.clear()  # as if the window had let it go: the next dequeue pages it in
    ch.cursor, ch.exhausted = 0, False
    env.store.hold("page_ready", after=True)
    task = asyncio.ensure_future(q.dequeue("jobs", 10, 0, None))
    await env.store.reached("page_ready")
    assert await q.purge("jobs") == 1
    env.store.let_go("page_ready")
    assert await task == []
    assert await q.dequeue("jobs", 10, 0, None) == []


# -- a channel DELETE racing its writes --------------------------------------------------------
async def test_delete_waits_for_an_enqueue_under_way(env: Env) -> None:
    q = env.engine
    await q.enqueue("jobs", [msg("first")])
    env.store.hold("insert")
    enqueue = asyncio.ensure_future(q.enqueue("jobs", [msg("racing")]))
    await env.store.reached("insert")
    delete = asyncio.ensure_future(q.delete_channel("jobs"))
    await asyncio.sleep(0.05)  # the delete would reach the store first, were it not waiting
    env.store.let_go("insert")
    await enqueue
    await delete
    # The enqueue came first, so the delete took its message with the channel: nothing is
    # left in the store that memory does not know of (a restart shows what the store holds).
    await q.enqueue("jobs", [msg("after")])
    assert bodies(await q.dequeue("jobs", 10, 0, None)) == ["after"]
    assert env.stats("jobs") == (0, 1, 0)
    await env.restart()
    assert env.stats("jobs") == (0, 1, 0)


async def test_enqueue_during_a_delete_lands_in_the_new_channel(env: Env) -> None:
    q = env.engine
    await q.enqueue("jobs", [msg("old")])
    env.store.hold("drop_channel")
    delete = asyncio.ensure_future(q.delete_channel("jobs"))
    await env.store.reached("drop_channel")
    enqueue = asyncio.ensure_future(q.enqueue("jobs", [msg("new")]))
    configure = asyncio.ensure_future(q.configure("jobs", {"max_attempts": 7}))
    await asyncio.sleep(0.05)  # they would reach the store first, were they not waiting
    env.store.let_go("drop_channel")
    await delete
    await enqueue
    await configure
    assert q.channels["jobs"].config.max_attempts == 7
    assert bodies(await q.dequeue("jobs", 10, 0, None)) == ["new"]
    q = await env.restart()
    assert q.channels["jobs"].config.max_attempts == 7
    assert env.stats("jobs") == (0, 1, 0)


async def test_dead_letter_into_a_channel_being_deleted(env: Env) -> None:
    q = env.engine
    await q.enqueue("jobs", [msg("a")])
    await q.enqueue("jobs.dlq", [msg("old")])
    got = await q.dequeue("jobs", 1, 0, None)
    env.store.hold("drop_channel")
    delete = asyncio.ensure_future(q.delete_channel("jobs.dlq"))
    await env.store.reached("drop_channel")
    nack = asyncio.ensure_future(q.nack("jobs", receipts(got), 0, True))
    await asyncio.sleep(0.05)
    env.store.let_go("drop_channel")
    await delete
    await nack
    assert env.stats("jobs.dlq") == (1, 0, 0)
    assert bodies(await q.dequeue("jobs.dlq", 10, 0, None)) == ["a"]
    await env.restart()
    assert env.stats("jobs.dlq") == (0, 1, 0)


async def test_enqueue_cancelled_mid_insert_leaves_nothing_hidden(env: Env) -> None:
    q = env.engine
    await q.enqueue("jobs", [msg("a")])
    env.store.hold("insert", after=True)  # stored, the answer not yet back
    task = asyncio.ensure_future(q.enqueue("jobs", [msg("b")]))
    await env.store.reached("insert")
    task.cancel()  # the producer hung up
    env.store.let_go("insert")
    with pytest.raises(asyncio.CancelledError):
        await task
    await wait_ready(env, "jobs", 2)
    assert bodies(await q.dequeue("jobs", 10, 0, None)) == ["a", "b"]


async def test_purge_racing_a_delete_finds_no_channel(env: Env) -> None:
    q = env.engine
    await q.enqueue("jobs", [msg("a")])
    env.store.hold("drop_channel")
    delete = asyncio.ensure_future(q.delete_channel("jobs"))
    await env.store.reached("drop_channel")
    with pytest.raises(ChannelNotFound):
        await q.purge("jobs")
    with pytest.raises(ChannelNotFound):
        await q.delete_channel("jobs")
    env.store.let_go("drop_channel")
    await delete
    assert "jobs" not in q.channels


async def test_a_failed_delete_leaves_the_channel_as_it_was(env: Env) -> None:
    q = env.engine
    await q.enqueue("jobs", [msg("a")])
    env.store.hold("drop_channel", fail=True)
    delete = asyncio.ensure_future(q.delete_channel("jobs"))
    await env.store.reached("drop_channel")
    enqueue = asyncio.ensure_future(q.enqueue("jobs", [msg("b")]))
    env.store.let_go("drop_channel")
    with pytest.raises(StoreUnavailable):
        await delete
    await enqueue
    assert bodies(await q.dequeue("jobs", 10, 0, None)) == ["a", "b"]


async def test_a_channel_is_built_from_what_the_store_holds(env: Env) -> None:
    """Whatever the store holds for a name is taken in when the channel enters memory."""
    q = env.engine
    await q.enqueue("jobs", [msg("a"), msg("b")])
    q.release("jobs")  # as a node letting go of a channel would
    assert "jobs" not in q.channels
    config = ChannelConfig(visibility_ms=30_000, max_attempts=3)
    await q.adopt("jobs", config)
    assert env.stats("jobs") == (2, 0, 0)
    assert bodies(await q.dequeue("jobs", 10, 0, None)) == ["a", "b"]


# -- dequeue does not create channels ----------------------------------------------------------
async def test_dequeue_does_not_create_a_channel(env: Env) -> None:
    q = env.engine
    for i in range(20):
        assert await q.dequeue(f"typo-{i}", 10, 0, None) == []
    assert await q.dequeue("typo-w", 10, 50, None) == []
    assert q.channels == {}
    await env.restart()
    assert env.engine.channels == {}


async def test_dequeues_to_typod_names_make_no_channels(app_client: httpx.AsyncClient) -> None:
    for i in range(30):
        r = await app_client.post(f"/channels/typo-{i}/dequeue", json={"max": 5})
        assert r.status_code == 200 and r.json() == {"messages": []}
    r = await app_client.post("/channels/typo-w/dequeue", json={"wait_ms": 20})
    assert r.status_code == 200 and r.json() == {"messages": []}
    assert (await app_client.get("/channels/typo-0")).status_code == 404
    assert (await app_client.get("/channels")).json()["channels"] == []


async def test_long_poll_on_a_missing_channel_wakes_on_its_first_enqueue(env: Env) -> None:
    q = env.engine
    poll = asyncio.ensure_future(q.dequeue("later", 10, 5000, None))
    await asyncio.sleep(0.05)
    assert not poll.done()
    await q.enqueue("later", [msg("hello")])
    assert bodies(await asyncio.wait_for(poll, 2)) == ["hello"]
    assert not q._absent  # no waiter left behind


# -- a consumer that hangs up while its lease is written ---------------------------------------
async def test_cancelled_dequeue_gives_its_lease_back(env: Env) -> None:
    q = env.engine
    await q.enqueue("jobs", [msg("a")])
    env.store.hold("lease")
    task = asyncio.ensure_future(q.dequeue("jobs", 1, 0, None))
    await env.store.reached("lease")
    task.cancel()
    env.store.let_go("lease")
    with pytest.raises(asyncio.CancelledError):
        await task
    await wait_ready(env, "jobs")
    got = await q.dequeue("jobs", 1, 0, None)
    assert bodies(got) == ["a"]
    assert got[0].attempt == 1  # the delivery no one saw spent no attempt
    await env.restart()  # and the store agrees
    env.clock.advance(31_000)
    await env.engine.tick(env.clock.now_ms())
    got = await env.engine.dequeue("jobs", 1, 0, None)
    assert got[0].attempt == 2


async def wait_ready(env: Env, name: str, count: int = 1) -> None:
    """Until the channel has `count` ready messages (the change finishing in the background)."""
    for _ in range(500):
        if env.stats(name)[0] >= count:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"nothing became ready in {name}")


def node_of(env: Env) -> Node:
    settings = Settings(_env_file=None, store_url="sqlite:///unused.db")  # type: ignore[call-arg]
    maintenance = Maintenance(env.engine, env.clock)
    receipts = ReceiptSigner(b"k" * 32)
    return Node(
        settings,
        env.clock,
        env.store,
        env.engine,
        0,
        maintenance,
        receipts,  # type: ignore[arg-type]
        ClusterRuntime(settings, env.store, env.engine, env.clock),  # type: ignore[arg-type]
    )


async def test_request_cancelled_mid_lease_gives_it_back(env: Env) -> None:
    """wait_ms=0: the server cancels the request task when the client disconnects."""
    q = env.engine
    await q.enqueue("jobs", [msg("a")])

    async def receive() -> dict[str, Any]:
        raise AssertionError("a dequeue without wait_ms does not listen for a hang-up")

    env.store.hold("lease")
    handler = asyncio.ensure_future(messages.dequeue(node_of(env), "jobs", b"", receive))
    await env.store.reached("lease")
    handler.cancel()
    env.store.let_go("lease")
    with pytest.raises(asyncio.CancelledError):
        await handler
    await wait_ready(env, "jobs")
    assert [lease.attempt for lease in await q.dequeue("jobs", 1, 0, None)] == [1]


async def test_long_poll_whose_consumer_leaves_mid_lease_gives_it_back(env: Env) -> None:
    q = env.engine
    node = node_of(env)
    hung_up = asyncio.Event()

    async def receive() -> dict[str, Any]:
        await hung_up.wait()
        return {"type": "http.disconnect"}

    env.store.hold("lease")
    body = msgspec.json.encode({"wait_ms": 5000})
    handler = asyncio.ensure_future(messages.dequeue(node, "jobs", body, receive))
    await asyncio.sleep(0.02)  # the poll waits on a channel that does not exist yet
    await q.enqueue("jobs", [msg("a")])
    await env.store.reached("lease")
    hung_up.set()
    status, payload = await asyncio.wait_for(handler, 2)
    assert (status, msgspec.json.decode(payload)) == (200, {"messages": []})
    env.store.let_go("lease")
    await wait_ready(env, "jobs")
    got = await q.dequeue("jobs", 1, 0, None)
    assert got[0].attempt == 1


async def test_dequeue_waiting_on_a_page_survives_a_delete(env: Env) -> None:
    """A delete lets go of the channel and cancels its page load; a dequeue that was waiting
    on that load finds nothing (no CancelledError, which the API would answer with a 500)."""
    q = env.engine
    await q.enqueue("jobs", [msg("a")])
    ch = q.channels["jobs"]
    ch.ready.clear()  # as if the window had let it go: the next dequeue pages it in
    ch.cursor, ch.exhausted = 0, False
    env.store.hold("page_ready")
    task = asyncio.ensure_future(q.dequeue("jobs", 10, 0, None))
    await env.store.reached("page_ready")
    await q.delete_channel("jobs")
    env.store.let_go("page_ready")
    assert await task == []
    assert "jobs" not in q.channels
    await q.enqueue("jobs", [msg("b")])
    assert bodies(await q.dequeue("jobs", 10, 0, None)) == ["b"]


async def test_ttl_expiry_does_not_take_a_message_being_delivered(env: Env) -> None:
    """A dequeue dead-letters the expired part of its batch before leasing the rest; while that
    move is written, the rest is held for this delivery, so a TTL sweep falling due meanwhile
    must not dead-letter one of them too (delivered and dead-lettered both, counted twice)."""
    q = env.engine
    await q.enqueue("jobs", [msg("a", ttl_ms=100), msg("b", ttl_ms=200)])
    env.clock.advance(150)  # a expired, b not yet
    env.store.hold("move")
    dequeue = asyncio.ensure_future(q.dequeue("jobs", 2, 0, None))
    await env.store.reached("move")  # a on its way to jobs.dlq; b popped for this delivery
    env.clock.advance(100)  # b's TTL runs out too
    tick = asyncio.ensure_future(q.tick(env.clock.now_ms()))
    await asyncio.sleep(0.05)
    env.store.let_go("move")
    got = await dequeue
    await tick
    dead = await q.dequeue("jobs.dlq", 10, 0, None)
    delivered = bodies(got) + bodies(dead)
    assert sorted(delivered) == ["a", "b"], delivered  # each exactly once
    if got:  # the delivery won: its receipt holds
        assert (await q.ack("jobs", receipts(got))).done == 1
    await q.ack("jobs.dlq", receipts(dead))
    assert env.stats("jobs") == (0, 0, 0)
    assert q.channels["jobs"].total == 0


async def test_purge_while_a_dequeue_dead_letters_part_of_its_batch(env: Env) -> None:
    """The purge takes the batch's deliverable part too: the dequeue must not lease it in
    memory afterwards (such a lease would, on expiry, make the purged message ready again)."""
    q = env.engine
    await q.enqueue("jobs", [msg("a", ttl_ms=100), msg("b")])
    env.clock.advance(150)  # a expired
    env.store.hold("move")
    dequeue = asyncio.ensure_future(q.dequeue("jobs", 2, 0, 1000))
    await env.store.reached("move")
    assert await q.purge("jobs") == 2
    env.store.let_go("move")
    assert await dequeue == []
    assert env.stats("jobs") == (0, 0, 0)
    env.clock.advance(2000)  # past any lease the dequeue might have left
    await q.tick(env.clock.now_ms())
    assert await q.dequeue("jobs", 10, 0, None) == []


async def test_dead_letter_written_after_a_purge_brings_nothing_back(env: Env) -> None:
    """A nack to the dead-letter channel whose move reaches the store after a purge: the purge
    took the message, so no copy of it may appear in the dead-letter channel."""
    q = env.engine
    await q.enqueue("jobs", [msg("a")])
    got = await q.dequeue("jobs", 1, 0, None)
    await racing_purge(env, "move", q.nack("jobs", receipts(got), 0, True))
    assert await q.dequeue("jobs.dlq", 10, 0, None) == []
    await env.restart()
    assert env.stats("jobs.dlq") == (0, 0, 0)
    assert env.stats("jobs") == (0, 0, 0)


async def test_batch_of_a_dequeue_abandoned_mid_dead_letter_wakes_a_long_poll(env: Env) -> None:
    """The consumer leaves while part of its batch is dead-lettered: the rest is ready again,
    and a long poll waiting meanwhile gets it at once, not at the end of its wait."""
    q = env.engine
    await q.enqueue("jobs", [msg("a", ttl_ms=100), msg("b")])
    env.clock.advance(150)  # a expired
    env.store.hold("move")
    first = asyncio.ensure_future(q.dequeue("jobs", 2, 0, None))
    await env.store.reached("move")
    waiting = asyncio.ensure_future(q.dequeue("jobs", 1, 10_000, None))
    await asyncio.sleep(0.05)  # the long poll waits: nothing is ready
    first.cancel()
    got = await asyncio.wait_for(waiting, 2)
    assert bodies(got) == ["b"]
    env.store.let_go("move")


# -- a delayed release racing the promotion of due delays --------------------------------------
async def test_promotion_answering_before_a_delayed_nack_loses_nothing(env: Env) -> None:
    """The nack's release is written (a delayed by 10 ms) but its answer is late; a promotion
    falling due meanwhile finds a due in the store and makes it ready there. The release's
    finish must then put a in the window, not count it delayed: the store will never promote
    it again, so counted as delayed it would stay hidden until a restart."""
    q = env.engine
    await q.enqueue("jobs", [msg("a")])
    got = await q.dequeue("jobs", 1, 0, None)
    env.store.hold("release", after=True)
    nack = asyncio.ensure_future(q.nack("jobs", receipts(got), 10, False))
    await env.store.reached("release")  # durable in the store; memory not finished yet
    await q.enqueue("jobs", [msg("b", delay_ms=15)])  # arms the channel's timer
    env.clock.advance(20)
    await q.tick(env.clock.now_ms())  # promotes a (from the store) and b
    env.store.let_go("release")
    assert (await nack).done == 1
    assert env.stats("jobs") == (2, 0, 0)
    first = bodies(await q.dequeue("jobs", 10, 0, None))  # a from the window (b paged in)
    assert sorted(first + bodies(await q.dequeue("jobs", 10, 0, None))) == ["a", "b"]


async def test_a_delayed_nack_whose_write_fails_after_a_promotion_is_redelivered(env: Env) -> None:
    """The same race with the release's answer lost: the lease is restored, and the message is
    delivered again once it expires, counted once."""
    q = env.engine
    await q.enqueue("jobs", [msg("a")])
    got = await q.dequeue("jobs", 1, 0, 5_000)
    env.store.hold("release", after=True, fail=True)
    nack = asyncio.ensure_future(q.nack("jobs", receipts(got), 10, False))
    await env.store.reached("release")
    await q.enqueue("jobs", [msg("b", delay_ms=15)])
    env.clock.advance(20)
    await q.tick(env.clock.now_ms())
    env.store.let_go("release")
    with pytest.raises(StoreUnavailable):
        await nack
    assert bodies(await q.dequeue("jobs", 10, 0, None)) == ["b"]
    assert env.stats("jobs") == (0, 2, 0)
    env.clock.advance(5_000)
    await q.tick(env.clock.now_ms())
    assert bodies(await q.dequeue("jobs", 10, 0, None)) == ["a"]
    assert env.stats("jobs") == (0, 2, 0)
