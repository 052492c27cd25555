"""Hand-off races found by attacking the hand-off machinery, each driven deterministically
in-process with a store call held open at the moment that matters (tests/test_cluster_keeper.py
style: fake clocks, both stores)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import httpx
import pytest

from app.clock import ManualClock
from app.cluster.handoff import Handover
from app.cluster.keeper import HandoffRecord
from app.cluster.route import Local, Remote
from app.errors import HandoffRefused
from app.store.base import ShardLease
from tests.test_cluster_keeper import Member, clock, make_store, members, two_shards  # noqa: F401

A, B, C = "http://127.0.0.1:9101", "http://127.0.0.1:9102", "http://127.0.0.1:9103"


class Held:
    """Holds a store method's answer until released: the call is made, its result kept back."""

    def __init__(self, target: object, name: str) -> None:
        self.real = getattr(target, name)
        self.reached = asyncio.Event()
        self.go = asyncio.Event()
        self.armed = True
        setattr(target, name, self)

    async def __call__(self, *args: object, **kwargs: object) -> object:
        result = await self.real(*args, **kwargs)
        if self.armed:
            self.armed = False
            self.reached.set()
            await self.go.wait()
        return result


async def test_a_tick_reading_the_leases_before_a_hand_off_keeps_the_shard_handed_in(
    members: Callable[..., Member],  # noqa: F811
    clock: ManualClock,  # noqa: F811
) -> None:
    """The new owner's tick read the leases (the old owner's, epoch 1) just before the shard
    was handed to it and adopted: that reading is older than what it now holds, so it must not
    make it stop serving the shard (it did: STOP_SERVING, a heartbeat or more unavailable)."""
    init = two_shards(A, B, C)
    a = members("a", 9101, cluster_init=init)
    b = members("b", 9102, cluster_init=init)
    c = members("c", 9103, cluster_init=init)
    for m in (a, b, c):
        await m.start()
    reading = Held(c.store, "leases")
    tick = asyncio.create_task(c.tick())
    await asyncio.wait_for(reading.reached.wait(), 5)
    moved = await a.store.transfer_lease("s1", "a", 1, "c", C, 2000)
    assert isinstance(moved, ShardLease) and moved.epoch == 2
    h = await c.runtime.keeper.adopt_given("s1", 2, c.mono.now)
    assert h is not None and h.adopting is not None
    await asyncio.wait_for(h.adopting, 5)
    assert c.runtime.owned() == {"s1": 2}
    reading.go.set()
    await asyncio.wait_for(tick, 5)
    assert c.runtime.owned() == {"s1": 2}
    channel = next(f"c{i}" for i in range(100) if c.runtime.shard_of(f"c{i}") == "s1")
    assert c.runtime.route(channel) == Local("s1")


async def test_a_tick_reading_the_leases_before_its_own_hand_off_routes_to_the_new_owner(
    members: Callable[..., Member],  # noqa: F811
    clock: ManualClock,  # noqa: F811
) -> None:
    """The old owner's tick read the leases just before it handed the shard on: its view must
    keep the new owner the hand-off told it of (it went back to its own lapsed holding, so its
    requests for the shard got 503 instead of being forwarded until the next tick)."""
    init = two_shards(A, B, C)
    a = members("a", 9101, cluster_init=init)
    b = members("b", 9102, cluster_init=init)
    c = members("c", 9103, cluster_init=init)
    for m in (a, b, c):
        await m.start()
    keeper = a.runtime.keeper
    reading = Held(a.store, "leases")
    tick = asyncio.create_task(a.tick())
    await asyncio.wait_for(reading.reached.wait(), 5)
    keeper.begin_handoff("s1")
    moved = await a.store.transfer_lease("s1", "a", 1, "c", C, 2000)
    assert moved is not None
    await keeper.handed("s1", moved, HandoffRecord("s1", A, C, moved.epoch, 0, 0))
    reading.go.set()
    await asyncio.wait_for(tick, 5)
    channel = next(f"c{i}" for i in range(100) if a.runtime.shard_of(f"c{i}") == "s1")
    assert a.runtime.route(channel) == Remote("s1", C, "c")
    assert a.runtime.owned() == {}


class Sender:
    """The owner's heartbeat side as a hand-off sees it: every backup up to date."""

    def behind(self, shard: str) -> dict[str, int | None]:
        return {C: 0}

    async def catch_up(self, shard: str, backup: str) -> bool:
        return True


def handover(owner: Member, http: httpx.AsyncClient, reports: object) -> Handover:
    rt = owner.runtime
    return Handover(
        keeper=rt.keeper,
        engine=owner.engine,
        store=owner.store,
        sender=Sender(),  # type: ignore[arg-type]
        http=http,
        secret="s3cret",
        members=reports,  # type: ignore[arg-type]
        backups_of=rt.backups_of,
        peers=lambda: [],
    )


async def test_two_hand_offs_of_one_shard_at_once_one_is_refused(
    members: Callable[..., Member],  # noqa: F811
    clock: ManualClock,  # noqa: F811
) -> None:
    """POST .../handoff twice at once: the second is refused (409: under way, or not held),
    whenever it reaches the owner. It used to pass the check while the first one read the
    member reports, then fail with a KeyError (a 500) once the first had handed the shard on,
    or serve the shard again under the first one's transfer when the first gave up."""
    init = two_shards(A, B, C)
    a = members("a", 9101, cluster_init=init)
    b = members("b", 9102, cluster_init=init)
    c = members("c", 9103, cluster_init=init)
    for m in (a, b, c):
        await m.start()
    await c.tick()  # a fresh member report

    def adopted(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"served": True})

    async with httpx.AsyncClient(transport=httpx.MockTransport(adopted)) as http:
        first_reading = Held(a.runtime, "members")
        ho = handover(a, http, a.runtime.members)
        second = asyncio.create_task(ho.hand_off("s1"))
        await asyncio.wait_for(first_reading.reached.wait(), 5)
        record = await asyncio.wait_for(ho.hand_off("s1"), 5)  # the first, all the way
        assert (record.to, record.epoch) == (C, 2)
        first_reading.go.set()
        with pytest.raises(HandoffRefused):
            await asyncio.wait_for(second, 5)
    assert (await a.store.leases())["s1"].owner == "c"
