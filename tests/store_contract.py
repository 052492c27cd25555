"""The store contract (`app/store/base.py`) as one suite every backend must pass.

Subclass `StoreContract` in a test module that provides three fixtures:

- `store`: an opened, empty `Store` (with a small `max_message_bytes`, so that the size limit is
  cheap to reach);
- `reopen`: an async callable that closes a store and returns a new opened one over the same data
  (same SQLite file, same MongoDB database);
- `outage`: an async context manager factory: `async with outage(store):` makes the store's
  writes fail the way a retry can fix (a full disk, a dropped connection);
- `clock`: the `ManualClock` that `store` (and `twin`) use as the store's clock, which judges
  lease expiry;
- `twin`: a second opened store over the same data with the same clock, as another node sees it
  (another SQLiteStore on the same file with its own connections, another MongoStore on the
  same database).

Times are plain integers (milliseconds); ids are chosen by the tests, as the engine would.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import replace
from typing import Any

import pytest

from app.clock import ManualClock
from app.errors import Fenced, StoreError, StoreTooLarge, StoreUnavailable
from app.models import (
    DEAD_LETTER_HEADROOM,
    HISTORY_LIMIT,
    ChannelConfig,
    ChannelCounts,
    EnqueueResult,
    Event,
    Message,
)
from app.store.base import SECRET_BYTES, MessageState, Page, Resolve, ShardLease, Store, state_of

Reopen = Callable[[Store], Awaitable[Store]]
Outage = Callable[[Store], AbstractAsyncContextManager[None]]

NOW = 1_000_000
CH = "orders"
OTHER = "other"
SHARD = "s1"
TTL = 2_000
A = ("node-a", "http://a:7100")
B = ("node-b", "http://b:7100")
C = ("node-c", "http://c:7100")


def at(shard: str, epoch: int) -> Resolve:
    """A fence that puts every channel in one shard."""
    return lambda channel: (shard, epoch)


def by_channel(fences: dict[str, tuple[str, int]]) -> Resolve:
    """A fence from a table; a channel not in it belongs to no shard this node owns."""
    return fences.get


def msg(id: int, body: bytes | None = None, **fields: Any) -> Message:
    fields.setdefault("enqueued_at", NOW)
    fields.setdefault("headers", None)
    return Message(id=id, body=b'{"n": %d}' % id if body is None else body, **fields)


def _event(name: str, **details: int | str | None) -> Event:
    """A history event as the engine makes one (the stores keep them as given)."""
    return {"at": NOW, "event": name, **details}


def ids(messages: Sequence[Message]) -> list[int]:
    return [m.id for m in messages]


def stored(m: Message) -> Message:
    """A message as read back: stores keep the dedup id in their dedup records only."""
    return replace(m, dedup_id=None)


async def all_ids(store: Store, channel: str = CH, now: int = 2**62) -> list[int]:
    """Every message of the channel (leases and delays included), by id."""
    return ids(await store.page_ready(channel, 0, now, 1_000_000))


class StoreContract:
    # -- basics -----------------------------------------------------------------------------
    async def test_ping_and_kind(self, store: Store) -> None:
        await store.ping()
        assert isinstance(store.kind, str) and store.kind

    async def test_empty_store(self, store: Store) -> None:
        assert await store.max_id() == 0
        assert await store.load_channels() == {}
        assert await store.page_ready(CH, 0, NOW, 10) == []
        assert await store.leased(CH, NOW) == []
        assert await store.expired(CH, NOW, 10) == []
        assert await store.promote_due(CH, NOW, 10) == []
        assert await store.counts(CH, NOW) == ChannelCounts(0, 0, None, None)
        assert await store.next_due(CH) is None
        assert await store.next_expiry(CH, NOW) is None
        assert await store.purge(CH) == 0
        assert await store.prune_dedup(NOW, 100) == 0
        await store.drop_channel(CH)  # unknown channel: nothing to do, no error

    # -- insert -----------------------------------------------------------------------------
    async def test_insert_stores_batch_in_order(self, store: Store) -> None:
        batch = [msg(1), msg(2), msg(3)]
        result = await store.insert(CH, batch, dedup_since=0)
        assert result.ids == [1, 2, 3]
        assert result.new == batch
        assert await store.page_ready(CH, 0, NOW, 10) == batch

    async def test_insert_empty_batch(self, store: Store) -> None:
        result = await store.insert(CH, [], dedup_since=0)
        assert result.ids == [] and result.new == []
        assert await store.counts(CH, NOW) == ChannelCounts(0, 0, None, None)

    async def test_fields_round_trip(self, store: Store) -> None:
        big = 2**62 + 7  # int64 ids
        full = Message(
            id=big,
            body=b"\x00\xff binary \x80 not utf-8",
            headers=b'{"trace": "abc"}',
            enqueued_at=NOW - 5,
            available_at=0,
            expires_at=NOW + 60_000,
            attempt=3,
            leased=False,
            dedup_id="d-1",
        )
        bare = msg(5, body=b"")
        await store.insert(CH, [bare, full], dedup_since=0)
        assert await store.page_ready(CH, 0, NOW, 10) == [bare, stored(full)]
        assert await store.max_id() == big

    async def test_page_ready_is_in_id_order(self, store: Store) -> None:
        await store.insert(CH, [msg(30), msg(10)], dedup_since=0)
        await store.insert(CH, [msg(20)], dedup_since=0)
        assert ids(await store.page_ready(CH, 0, NOW, 10)) == [10, 20, 30]

    async def test_insert_is_all_or_nothing(self, store: Store) -> None:
        await store.insert(CH, [msg(3)], dedup_since=0)
        # The last message reuses a stored id: the store refuses the batch as a whole.
        batch = [msg(1, dedup_id="a"), msg(2, dedup_id="b"), msg(3, body=b"clash")]
        with pytest.raises(StoreError) as failed:
            await store.insert(CH, batch, dedup_since=0)
        # A constraint a retry cannot fix: not the retryable kind.
        assert not isinstance(failed.value, StoreUnavailable)
        assert failed.value.status == 500
        assert await store.page_ready(CH, 0, NOW, 10) == [msg(3)]
        # Nor were its dedup ids recorded: a retry with fresh ids stores them.
        retry = await store.insert(CH, [msg(4, dedup_id="a"), msg(5, dedup_id="b")], 0)
        assert retry.ids == [4, 5] and ids(retry.new) == [4, 5]

    # -- dedup ------------------------------------------------------------------------------
    async def test_dedup_within_one_batch(self, store: Store) -> None:
        batch = [
            msg(1, dedup_id="x"),
            msg(2, dedup_id="x"),
            msg(3),
            msg(4, dedup_id="y"),
            msg(5, dedup_id="x"),
        ]
        result = await store.insert(CH, batch, dedup_since=0)
        assert result.ids == [1, 1, 3, 4, 1]
        assert ids(result.new) == [1, 3, 4]
        assert await all_ids(store) == [1, 3, 4]

    async def test_dedup_across_batches(self, store: Store) -> None:
        await store.insert(CH, [msg(1, dedup_id="x", enqueued_at=1000)], dedup_since=0)
        result = await store.insert(
            CH, [msg(2, dedup_id="x", enqueued_at=1500), msg(3, dedup_id="z")], dedup_since=500
        )
        assert result.ids == [1, 3]
        assert ids(result.new) == [3]
        assert await all_ids(store) == [1, 3]

    async def test_dedup_window_boundary_and_expiry(self, store: Store) -> None:
        await store.insert(CH, [msg(1, dedup_id="x", enqueued_at=1000)], dedup_since=0)
        # Used exactly at dedup_since: still a duplicate.
        at_edge = await store.insert(CH, [msg(2, dedup_id="x", enqueued_at=1100)], 1000)
        assert at_edge.ids == [1] and at_edge.new == []
        # Used before dedup_since: out of the window, so a new message is stored ...
        late = await store.insert(CH, [msg(3, dedup_id="x", enqueued_at=2000)], 1001)
        assert late.ids == [3] and ids(late.new) == [3]
        # ... and the record now points to it, used at its enqueue time.
        again = await store.insert(CH, [msg(4, dedup_id="x", enqueued_at=2500)], 2000)
        assert again.ids == [3] and again.new == []
        assert await all_ids(store) == [1, 3]

    async def test_dedup_outlives_ack(self, store: Store) -> None:
        await store.insert(CH, [msg(1, dedup_id="x")], dedup_since=0)
        await store.delete(CH, [1])
        result = await store.insert(CH, [msg(2, dedup_id="x")], dedup_since=0)
        assert result.ids == [1] and result.new == []
        assert await store.counts(CH, NOW) == ChannelCounts(0, 0, None, None)

    async def test_dedup_is_per_channel(self, store: Store) -> None:
        await store.insert(CH, [msg(1, dedup_id="x")], dedup_since=0)
        result = await store.insert(OTHER, [msg(2, dedup_id="x")], dedup_since=0)
        assert result.ids == [2] and ids(result.new) == [2]

    async def test_prune_dedup(self, store: Store) -> None:
        await store.insert(CH, [msg(1, dedup_id="old", enqueued_at=1000)], dedup_since=0)
        await store.insert(CH, [msg(2, dedup_id="edge", enqueued_at=2000)], dedup_since=0)
        await store.insert(OTHER, [msg(3, dedup_id="old", enqueued_at=1000)], dedup_since=0)
        assert await store.prune_dedup(2000, 100) == 2  # used before 2000, in every channel
        # Pruned ids are forgotten even inside the window; "edge" (used at 2000) is kept.
        result = await store.insert(
            CH, [msg(4, dedup_id="old"), msg(5, dedup_id="edge")], dedup_since=0
        )
        assert result.ids == [4, 2]
        assert ids(result.new) == [4]
        assert await store.prune_dedup(2000, 100) == 0

    async def test_prune_dedup_goes_at_most_limit_at_a_time(self, store: Store) -> None:
        batch = [msg(i, dedup_id=f"d{i}", enqueued_at=1000) for i in range(1, 8)]
        await store.insert(CH, batch, dedup_since=0)
        assert await store.prune_dedup(2000, 3) == 3
        assert await store.prune_dedup(2000, 3) == 3
        assert await store.prune_dedup(2000, 3) == 1
        assert await store.prune_dedup(2000, 3) == 0

    # -- leases -----------------------------------------------------------------------------
    async def test_lease_hides_until_deadline(self, store: Store) -> None:
        await store.insert(CH, [msg(1), msg(2), msg(3)], dedup_since=0)
        deadline = NOW + 100
        await store.lease(CH, [(1, 1), (2, 4)], deadline)
        assert ids(await store.page_ready(CH, 0, NOW, 10)) == [3]
        in_flight = await store.leased(CH, NOW)
        assert in_flight == [
            replace(msg(1), leased=True, attempt=1, available_at=deadline),
            replace(msg(2), leased=True, attempt=4, available_at=deadline),
        ]
        # At the deadline the lease has lapsed: deliverable again without any write.
        assert ids(await store.page_ready(CH, 0, deadline, 10)) == [1, 2, 3]
        assert await store.leased(CH, deadline) == []
        assert await store.counts(CH, NOW) == ChannelCounts(3, 0, None, None)

    async def test_lease_empty_is_a_no_op(self, store: Store) -> None:
        await store.insert(CH, [msg(1)], dedup_since=0)
        await store.lease(CH, [], NOW + 100)
        await store.release(CH, [], 0)
        await store.extend(CH, [], NOW + 100)
        await store.delete(CH, [])
        await store.move(CH, [], None, [])
        assert await store.page_ready(CH, 0, NOW, 10) == [msg(1)]

    async def test_release_now_and_later(self, store: Store) -> None:
        await store.insert(CH, [msg(1), msg(2)], dedup_since=0)
        await store.lease(CH, [(1, 1), (2, 1)], NOW + 100)
        await store.release(CH, [1], 0)
        await store.release(CH, [2], NOW + 50)
        assert await store.page_ready(CH, 0, NOW, 10) == [replace(msg(1), attempt=1)]
        assert await store.leased(CH, NOW) == []
        assert await store.counts(CH, NOW) == ChannelCounts(2, 1, NOW + 50, None)
        assert await store.page_ready(CH, 1, NOW + 50, 10) == [
            replace(msg(2), attempt=1, available_at=NOW + 50)
        ]

    async def test_extend(self, store: Store) -> None:
        await store.insert(CH, [msg(1), msg(2)], dedup_since=0)
        await store.lease(CH, [(1, 1), (2, 1)], NOW + 100)
        await store.extend(CH, [1], NOW + 500)
        assert ids(await store.leased(CH, NOW + 100)) == [1]
        assert ids(await store.page_ready(CH, 0, NOW + 100, 10)) == [2]
        assert ids(await store.page_ready(CH, 0, NOW + 500, 10)) == [1, 2]
        assert (await store.leased(CH, NOW))[0].available_at == NOW + 500

    async def test_delete(self, store: Store) -> None:
        await store.insert(CH, [msg(1), msg(2), msg(3)], dedup_since=0)
        await store.lease(CH, [(2, 1)], NOW + 100)
        await store.delete(CH, [1, 2, 99])  # unknown ids are ignored
        assert await all_ids(store) == [3]
        assert await store.leased(CH, NOW) == []
        assert (await store.counts(CH, NOW)).total == 1

    # -- reads ------------------------------------------------------------------------------
    async def test_page_ready_paging(self, store: Store) -> None:
        await store.insert(CH, [msg(i) for i in range(1, 11)], dedup_since=0)
        await store.insert(OTHER, [msg(i) for i in range(11, 14)], dedup_since=0)
        await store.lease(CH, [(3, 1)], NOW + 10)
        seen: list[int] = []
        after = 0
        while page := await store.page_ready(CH, after, NOW, 4):
            assert len(page) <= 4
            seen += ids(page)
            after = page[-1].id
        assert seen == [1, 2, 4, 5, 6, 7, 8, 9, 10]
        assert ids(await store.page_ready(CH, 5, NOW, 2)) == [6, 7]
        assert await store.page_ready(CH, 10, NOW, 4) == []

    async def test_delayed_versus_due(self, store: Store) -> None:
        delayed = msg(1, available_at=NOW + 100)
        await store.insert(CH, [delayed, msg(2)], dedup_since=0)
        assert ids(await store.page_ready(CH, 0, NOW, 10)) == [2]
        assert await store.page_ready(CH, 0, NOW + 100, 10) == [delayed, msg(2)]
        assert await store.counts(CH, NOW) == ChannelCounts(2, 1, NOW + 100, None)
        assert await store.counts(CH, NOW + 100) == ChannelCounts(2, 0, NOW + 100, None)
        assert await store.leased(CH, NOW) == []

    async def test_promote_due(self, store: Store) -> None:
        await store.insert(
            CH,
            [
                msg(1, available_at=NOW - 10),  # due later than 2
                msg(2, available_at=NOW - 20),
                msg(3, available_at=NOW + 10),  # not yet due
                msg(4, available_at=NOW),  # due exactly now
                msg(5),  # ready already
                msg(6),
            ],
            dedup_since=0,
        )
        await store.lease(CH, [(6, 1)], NOW - 5)  # a lapsed lease is not a delay
        promoted = await store.promote_due(CH, NOW, 10)
        assert promoted == [msg(1), msg(2), msg(4)]  # by id, available_at now 0
        assert await store.promote_due(CH, NOW, 10) == []
        assert await store.next_due(CH) == NOW + 10
        assert await store.counts(CH, NOW) == ChannelCounts(6, 1, NOW + 10, None)
        assert [m.available_at for m in await store.page_ready(CH, 0, 0, 10)] == [0, 0, 0, 0]
        assert ids(await store.page_ready(CH, 0, 0, 10)) == [1, 2, 4, 5]

    async def test_promote_due_limit_takes_earliest_due(self, store: Store) -> None:
        await store.insert(
            CH,
            [
                msg(1, available_at=NOW - 1),
                msg(2, available_at=NOW - 3),
                msg(3, available_at=NOW - 2),
            ],
            dedup_since=0,
        )
        assert ids(await store.promote_due(CH, NOW, 2)) == [2, 3]
        assert ids(await store.promote_due(CH, NOW, 2)) == [1]

    async def test_expired_excludes_in_flight(self, store: Store) -> None:
        await store.insert(
            CH,
            [
                msg(1, expires_at=NOW - 1),
                msg(2, expires_at=NOW - 1),  # leased, lease runs: in flight
                msg(3, expires_at=NOW - 1),  # leased, lease lapsed: not in flight
                msg(4, expires_at=NOW),  # expires exactly now
                msg(5, expires_at=NOW + 1),  # not yet
                msg(6),  # no TTL
                msg(7, expires_at=NOW - 1, available_at=NOW + 100),  # delayed, still expires
            ],
            dedup_since=0,
        )
        await store.insert(OTHER, [msg(8, expires_at=NOW - 1)], dedup_since=0)
        await store.lease(CH, [(2, 1)], NOW + 100)
        await store.lease(CH, [(3, 1)], NOW - 1)
        assert ids(await store.expired(CH, NOW, 10)) == [1, 3, 4, 7]
        assert ids(await store.expired(CH, NOW, 2)) == [1, 3]
        assert ids(await store.expired(CH, NOW + 100, 10)) == [1, 2, 3, 4, 5, 7]
        assert await store.next_expiry(CH, NOW) == NOW + 1
        assert await store.next_expiry(CH, NOW + 1) is None

    async def test_leased_lists_only_live_leases(self, store: Store) -> None:
        await store.insert(CH, [msg(1), msg(2), msg(3, available_at=NOW + 100)], dedup_since=0)
        await store.insert(OTHER, [msg(4)], dedup_since=0)
        await store.lease(CH, [(2, 1), (1, 2)], NOW + 10)
        await store.lease(OTHER, [(4, 1)], NOW + 10)
        assert ids(await store.leased(CH, NOW)) == [1, 2]  # by id; the delayed one is no lease
        assert ids(await store.leased(CH, NOW + 9)) == [1, 2]
        assert await store.leased(CH, NOW + 10) == []

    async def test_counts(self, store: Store) -> None:
        await store.insert(
            CH,
            [
                msg(1),
                msg(2, available_at=NOW + 300),  # delayed
                msg(3, available_at=NOW + 200, expires_at=NOW + 900),  # delayed
                msg(4, available_at=NOW - 5),  # due but not promoted: not delayed, still next_due
                msg(5, expires_at=NOW + 50),
                msg(6, expires_at=NOW - 50),  # already expired: not a next expiry
                msg(7),  # leased below: neither delayed nor due
            ],
            dedup_since=0,
        )
        await store.lease(CH, [(7, 1)], NOW + 10)
        await store.insert(OTHER, [msg(8, available_at=NOW + 1, expires_at=NOW + 1)], 0)
        assert await store.counts(CH, NOW) == ChannelCounts(
            total=7, delayed=2, next_due=NOW - 5, next_expiry=NOW + 50
        )
        assert await store.next_due(CH) == NOW - 5
        assert await store.next_expiry(CH, NOW) == NOW + 50
        assert await store.next_expiry(CH, NOW + 50) == NOW + 900
        assert await store.counts(OTHER, NOW) == ChannelCounts(1, 1, NOW + 1, NOW + 1)

    async def test_max_id(self, store: Store) -> None:
        await store.insert(CH, [msg(5), msg(9)], dedup_since=0)
        await store.insert(OTHER, [msg(12)], dedup_since=0)
        assert await store.max_id() == 12
        await store.delete(OTHER, [12])
        assert await store.max_id() == 9  # the highest still present

    # -- browsing ---------------------------------------------------------------------------
    async def _every_state(self, store: Store) -> None:
        """1, 4 ready; 2 delayed; 3 in flight; 5 a lease that ran out (ready); 6 a delay that
        fell due (ready); 7 in flight; 8 in another channel."""
        await store.insert(
            CH,
            [
                msg(1, dedup_id="d1"),
                msg(2, available_at=NOW + 50),
                msg(3),
                msg(4, headers=b'{"h": "v"}', expires_at=NOW + 900),
                msg(5),
                msg(6, available_at=NOW - 1),
                msg(7),
            ],
            dedup_since=0,
        )
        await store.insert(OTHER, [msg(8)], dedup_since=0)
        await store.lease(CH, [(3, 2), (7, 1)], NOW + 100)
        await store.lease(CH, [(5, 1)], NOW - 5)

    async def test_browse_shows_each_state_in_id_order(self, store: Store) -> None:
        await self._every_state(store)
        everything = await store.browse(CH, None, 0, NOW, 100, 100)
        assert everything.next is None
        assert ids(everything.messages) == [1, 2, 3, 4, 5, 6, 7]
        assert [state_of(m, NOW) for m in everything.messages] == [
            "ready",
            "delayed",
            "in_flight",
            "ready",
            "ready",
            "ready",
            "in_flight",
        ]
        by_id = {m.id: m for m in everything.messages}
        assert by_id[1] == msg(1)  # the dedup id stays in its record
        assert by_id[3] == replace(msg(3), leased=True, attempt=2, available_at=NOW + 100)
        assert by_id[4] == msg(4, headers=b'{"h": "v"}', expires_at=NOW + 900)
        wanted: dict[MessageState, list[int]] = {
            "ready": [1, 4, 5, 6],
            "delayed": [2],
            "in_flight": [3, 7],
        }
        for state, expected in wanted.items():
            page = await store.browse(CH, state, 0, NOW, 100, 100)
            assert ids(page.messages) == expected, state
            assert page.next is None, state
        # Time moves the states: the delay falls due, the leases run out.
        later = await store.browse(CH, "ready", 0, NOW + 100, 100, 100)
        assert ids(later.messages) == [1, 2, 3, 4, 5, 6, 7]
        assert (await store.browse(OTHER, None, 0, NOW, 100, 100)).messages == [msg(8)]
        assert await store.browse("nowhere", None, 0, NOW, 10, 10) == Page([], None)

    async def test_browse_pages_by_id(self, store: Store) -> None:
        await store.insert(CH, [msg(i) for i in range(1, 11)], dedup_since=0)
        await store.lease(CH, [(2, 1), (9, 1)], NOW + 10)
        for state, expected in [(None, list(range(1, 11))), ("ready", [1, 3, 4, 5, 6, 7, 8, 10])]:
            seen: list[int] = []
            after: int | None = 0
            for _ in range(10):  # bounded: 3 pages expected
                assert after is not None
                page = await store.browse(CH, state, after, NOW, 4, 100)
                assert len(page.messages) <= 4
                seen += ids(page.messages)
                after = page.next
                if after is None:
                    break
            assert seen == expected, state
        # A full last page names its last id; the page after it is empty and ends.
        full = await store.browse(CH, None, 6, NOW, 4, 100)
        assert ids(full.messages) == [7, 8, 9, 10] and full.next == 10
        assert await store.browse(CH, None, 10, NOW, 4, 100) == Page([], None)

    async def test_browse_stops_at_max_bytes(self, store: Store) -> None:
        # Bodies of 10 bytes (one with 8 bytes of headers), one of 100: a page of at most 30
        # bytes holds what fits, and the next goes on from there; one larger message alone.
        await store.insert(
            CH,
            [
                msg(1, b"1" * 10),
                msg(2, b"2" * 10, headers=b'{"k":""}'),
                msg(3, b"3" * 10),
                msg(4, b"4" * 100),
                msg(5, b"5" * 10),
            ],
            dedup_since=0,
        )
        pages = []
        after: int | None = 0
        for state in (None, "ready", None, "ready"):
            assert after is not None
            page = await store.browse(CH, state, after, NOW, 100, 100, max_bytes=30)
            pages.append(ids(page.messages))
            after = page.next
        assert pages == [[1, 2], [3], [4], [5]] and after is None
        whole = await store.browse(CH, None, 0, NOW, 100, 100, max_bytes=10**6)
        assert ids(whole.messages) == [1, 2, 3, 4, 5] and whole.next is None

    async def test_browse_examines_at_most_scan_messages(self, store: Store) -> None:
        # Two in flight among many ready: a page of in-flight messages stops its scan after
        # `scan` messages, and says where to go on from.
        await store.insert(CH, [msg(i) for i in range(1, 21)], dedup_since=0)
        await store.lease(CH, [(3, 1), (17, 1)], NOW + 10)
        first = await store.browse(CH, "in_flight", 0, NOW, 5, 8)
        assert ids(first.messages) == [3] and first.next == 8
        second = await store.browse(CH, "in_flight", 8, NOW, 5, 8)
        assert second.messages == [] and second.next == 16
        third = await store.browse(CH, "in_flight", 16, NOW, 5, 8)
        assert ids(third.messages) == [17] and third.next is None

    async def test_browse_and_get_change_nothing(self, store: Store) -> None:
        await self._every_state(store)
        before = (await store.counts(CH, NOW), await store.leased(CH, NOW), await all_ids(store))
        await store.browse(CH, None, 0, NOW, 100, 100)
        await store.browse(CH, "ready", 0, NOW, 100, 100)
        await store.get_message(CH, 3)
        assert before == (
            await store.counts(CH, NOW),
            await store.leased(CH, NOW),
            await all_ids(store),
        )
        # Reads are not fenced: a node that owns no shard may still read.
        store.fence(by_channel({}))
        assert ids((await store.browse(CH, None, 0, NOW, 100, 100)).messages)[:2] == [1, 2]
        assert await store.get_message(CH, 1) is not None

    async def test_get_message(self, store: Store) -> None:
        await self._every_state(store)
        assert await store.get_message(CH, 1) == msg(1)
        assert await store.get_message(CH, 3) == replace(
            msg(3), leased=True, attempt=2, available_at=NOW + 100
        )
        assert await store.get_message(CH, 8) is None  # another channel's
        assert await store.get_message(OTHER, 8) == msg(8)
        assert await store.get_message(CH, 99) is None
        assert await store.get_message("nowhere", 1) is None

    # -- move, purge, drop ------------------------------------------------------------------
    async def test_move_to_target(self, store: Store) -> None:
        await store.insert(CH, [msg(1), msg(2), msg(3)], dedup_since=0)
        await store.lease(CH, [(1, 5), (2, 5)], NOW + 100)
        dead = [
            Message(20, b'{"n": 1}', b'{"x-dead-letter": "orders"}', NOW + 1, attempt=5),
            Message(21, b'{"n": 2}', b'{"x-dead-letter": "orders"}', NOW + 1, attempt=5),
        ]
        await store.move(CH, [1, 2], "orders.dlq", dead)
        assert await all_ids(store) == [3]
        assert await store.leased(CH, NOW) == []
        assert await store.page_ready("orders.dlq", 0, NOW, 10) == dead
        assert await store.max_id() == 21

    async def test_move_copies_only_what_the_channel_still_holds(self, store: Store) -> None:
        await store.insert(CH, [msg(1), msg(2)], dedup_since=0)
        await store.delete(CH, [1])  # gone before the move (a purge, an ack)
        copies = [Message(20, b"1", None, NOW + 1), Message(21, b"2", None, NOW + 1)]
        assert await store.move(CH, [1, 2], "orders.dlq", copies) == [copies[1]]
        assert await all_ids(store) == []
        assert await store.page_ready("orders.dlq", 0, NOW, 10) == [copies[1]]

    async def test_move_gives_a_target_without_settings_the_ones_given(self, store: Store) -> None:
        # A dead letter into another shard's channel no request created: listed by
        # load_channels, so that shard's owner finds it without the poke.
        await store.insert(CH, [msg(1), msg(2)], dedup_since=0)
        given = ChannelConfig(dead_letter=None, ttl_ms=7)
        await store.move(CH, [1], "orders.dlq", [Message(20, b"1", None, NOW + 1)], given)
        assert (await store.load_channels())["orders.dlq"] == given
        # one that has settings keeps them
        await store.save_channel("kept", ChannelConfig(ttl_ms=5))
        await store.move(CH, [2], "kept", [Message(21, b"2", None, NOW + 1)], given)
        assert (await store.load_channels())["kept"] == ChannelConfig(ttl_ms=5)
        assert [m.id for m in await store.page_ready("kept", 0, NOW, 10)] == [21]

    async def test_move_without_target_drops(self, store: Store) -> None:
        await store.insert(CH, [msg(1), msg(2)], dedup_since=0)
        await store.move(CH, [1], None, [])
        assert await all_ids(store) == [2]
        assert await store.counts("orders.dlq", NOW) == ChannelCounts(0, 0, None, None)

    async def test_purge(self, store: Store) -> None:
        config = ChannelConfig(max_length=10)
        await store.save_channel(CH, config)
        await store.insert(
            CH, [msg(1, dedup_id="x"), msg(2, available_at=NOW + 5), msg(3)], dedup_since=0
        )
        await store.lease(CH, [(3, 1)], NOW + 5)
        await store.insert(OTHER, [msg(4)], dedup_since=0)
        assert await store.purge(CH) == 3
        assert await store.counts(CH, NOW) == ChannelCounts(0, 0, None, None)
        assert await store.leased(CH, NOW) == []
        assert await all_ids(store, OTHER) == [4]
        assert await store.load_channels() == {CH: config}  # settings stay
        # Dedup ids stay too: purge forgets messages only.
        again = await store.insert(CH, [msg(5, dedup_id="x")], dedup_since=0)
        assert again.ids == [1] and again.new == []
        assert await store.purge(CH) == 0

    async def test_drop_channel(self, store: Store) -> None:
        await store.save_channel(CH, ChannelConfig())
        await store.save_channel(OTHER, ChannelConfig(ttl_ms=5))
        await store.insert(CH, [msg(1, dedup_id="x"), msg(2)], dedup_since=0)
        await store.insert(OTHER, [msg(3, dedup_id="x")], dedup_since=0)
        await store.drop_channel(CH)
        assert await store.load_channels() == {OTHER: ChannelConfig(ttl_ms=5)}
        assert await store.counts(CH, NOW) == ChannelCounts(0, 0, None, None)
        assert await all_ids(store, OTHER) == [3]
        # Its dedup ids went with it; the other channel's stay.
        fresh = await store.insert(CH, [msg(4, dedup_id="x")], dedup_since=0)
        assert fresh.ids == [4] and ids(fresh.new) == [4]
        kept = await store.insert(OTHER, [msg(5, dedup_id="x")], dedup_since=0)
        assert kept.ids == [3] and kept.new == []

    # -- channel settings -------------------------------------------------------------------
    async def test_channel_settings(self, store: Store) -> None:
        first = ChannelConfig(
            visibility_ms=1_000, max_attempts=2, dead_letter="a.dlq", max_length=7, ttl_ms=60_000
        )
        await store.save_channel("a", first)
        await store.save_channel("a.dlq", ChannelConfig())
        assert await store.load_channels() == {"a": first, "a.dlq": ChannelConfig()}
        second = ChannelConfig(visibility_ms=2_000, dead_letter=None, max_length=None)
        await store.save_channel("a", second)  # overwrite, not merge
        assert await store.load_channels() == {"a": second, "a.dlq": ChannelConfig()}

    # -- history (a traced channel's) -------------------------------------------------------
    async def test_history_starts_with_the_insert_and_grows_with_leases_and_releases(
        self, store: Store
    ) -> None:
        enqueued: Event = {"at": NOW, "event": "enqueued"}
        await store.insert(CH, [msg(1), msg(2)], dedup_since=0, events=[enqueued, enqueued])
        await store.insert(CH, [msg(3)], dedup_since=0)  # untraced: no history
        assert await store.history(CH, 1) == [enqueued]
        assert await store.history(CH, 3) == []
        assert await store.history(CH, 4) is None  # no such message
        assert await store.history(OTHER, 1) is None  # not in that channel

        first = _event("delivered", attempt=1)
        fourth = _event("delivered", attempt=4)
        await store.lease(CH, [(1, 1), (2, 4), (3, 1)], NOW + 100, [first, fourth, first])
        expired = _event("lease_expired", attempt=1)
        await store.release(CH, [1, 3], 0, [expired, expired])
        await store.release(CH, [2], NOW + 50)  # untraced write: nothing appended
        assert await store.history(CH, 1) == [enqueued, first, expired]
        assert await store.history(CH, 2) == [enqueued, fourth]
        assert await store.history(CH, 3) == [first, expired]
        # The writes did what they do untraced, too.
        assert await store.page_ready(CH, 0, NOW, 10) == [
            replace(msg(1), attempt=1),
            replace(msg(3), attempt=1),
        ]
        assert await store.counts(CH, NOW) == ChannelCounts(3, 1, NOW + 50, None)

    async def test_traced_and_untraced_writes_at_once(self, store: Store) -> None:
        # Written together (SQLite merges them into one commit group's statements).
        events = [_event("enqueued", n=i) for i in range(6)]
        await asyncio.gather(
            *(
                store.insert(CH, [msg(i)], 0, events=[events[i]] if i % 2 else None)
                for i in range(1, 6)
            )
        )
        await asyncio.gather(
            *(
                store.lease(CH, [(i, 1)], NOW + 100, [events[0]] if i % 2 else None)
                for i in range(1, 6)
            )
        )
        for i in range(1, 6):
            assert await store.history(CH, i) == ([events[i], events[0]] if i % 2 else [])
        assert [m.attempt for m in await store.leased(CH, NOW)] == [1] * 5

    async def test_history_keeps_the_last_events_only(self, store: Store) -> None:
        await store.insert(CH, [msg(1)], dedup_since=0, events=[_event("enqueued")])
        for attempt in range(1, HISTORY_LIMIT + 6):
            await store.lease(CH, [(1, attempt)], NOW + 100, [_event("delivered", attempt=attempt)])
        history = await store.history(CH, 1)
        assert history is not None and len(history) == HISTORY_LIMIT
        assert [e["attempt"] for e in history] == list(range(6, HISTORY_LIMIT + 6))

    async def test_history_of_a_deduplicated_message_is_its_first_copys(self, store: Store) -> None:
        one, two = _event("enqueued", n=1), _event("enqueued", n=2)
        result = await store.insert(
            CH, [msg(1, dedup_id="x"), msg(2, dedup_id="x"), msg(3)], 0, events=[one, one, two]
        )
        assert result.ids == [1, 1, 3]
        again = await store.insert(CH, [msg(4, dedup_id="x")], 0, events=[two])
        assert again.ids == [1] and again.new == []
        assert await store.history(CH, 1) == [one]
        assert await store.history(CH, 3) == [two]
        assert await store.history(CH, 4) is None

    async def test_a_moved_copy_carries_its_history_forward(self, store: Store) -> None:
        enqueued = _event("enqueued")
        await store.insert(CH, [msg(1), msg(2), msg(3)], 0, events=[enqueued] * 3)
        delivered = _event("delivered", attempt=5)
        await store.lease(CH, [(1, 5), (2, 5)], NOW + 100, [delivered, delivered])
        await store.delete(CH, [2])  # gone before the move: no copy, no history
        dead = _event("dead_lettered", reason="max_attempts", to="orders.dlq")
        copies = [Message(20, b"1", None, NOW + 1), Message(21, b"2", None, NOW + 1)]
        moved = await store.move(CH, [1, 2], "orders.dlq", copies, None, [dead, dead])
        assert moved == [copies[0]]
        assert await store.history(CH, 1) is None
        assert await store.history("orders.dlq", 20) == [enqueued, delivered, dead]
        assert await store.history("orders.dlq", 21) is None
        # Redriven back: carried on again, into a channel of settings given in the same write.
        back = _event("redriven", to=CH, **{"from": "orders.dlq"})
        again = [Message(30, b"1", None, NOW + 2)]
        await store.move("orders.dlq", [20], CH, again, ChannelConfig(trace=True), [back])
        assert await store.history(CH, 30) == [enqueued, delivered, dead, back]
        # An untraced move makes a copy with no history.
        await store.move(CH, [3], "orders.dlq", [Message(22, b"3", None, NOW + 3)])
        assert await store.history("orders.dlq", 22) == []

    async def test_a_carried_history_stays_bounded(self, store: Store) -> None:
        await store.insert(CH, [msg(1)], 0, events=[_event("enqueued")])
        for attempt in range(1, HISTORY_LIMIT + 1):
            await store.lease(CH, [(1, attempt)], NOW + 100, [_event("delivered", attempt=attempt)])
        dead = _event("dead_lettered", reason="max_attempts", to="orders.dlq")
        await store.move(CH, [1], "orders.dlq", [Message(20, b"1", None, NOW + 1)], None, [dead])
        history = await store.history("orders.dlq", 20)
        assert history is not None and len(history) == HISTORY_LIMIT
        assert history[0] == _event("delivered", attempt=2) and history[-1] == dead

    async def test_history_goes_with_its_message(self, store: Store) -> None:
        events = [_event("enqueued")] * 2
        await store.save_channel(CH, ChannelConfig(trace=True))
        await store.insert(CH, [msg(1), msg(2)], 0, events=events)
        await store.insert(OTHER, [msg(3), msg(4)], 0, events=events)
        await store.delete(CH, [1])  # an ack
        assert await store.history(CH, 1) is None
        await store.purge(CH)
        assert await store.history(CH, 2) is None
        await store.drop_channel(OTHER)
        assert await store.history(OTHER, 3) is None and await store.history(OTHER, 4) is None
        # Ids are never reused, but a store must not keep a history for one either way.
        await store.insert(CH, [msg(1)], dedup_since=0)
        assert await store.history(CH, 1) == []

    async def test_trace_setting_round_trips(self, store: Store, reopen: Reopen) -> None:
        await store.save_channel(CH, ChannelConfig(trace=True, ttl_ms=5))
        await store.insert(CH, [msg(1)], 0, events=[_event("enqueued")])
        store = await reopen(store)
        assert await store.load_channels() == {CH: ChannelConfig(trace=True, ttl_ms=5)}
        assert await store.history(CH, 1) == [_event("enqueued")]

    # -- durability across reopen -----------------------------------------------------------
    async def test_reopen_keeps_everything(self, store: Store, reopen: Reopen) -> None:
        config = ChannelConfig(visibility_ms=5_000, dead_letter=f"{CH}.dlq", ttl_ms=9_000)
        await store.save_channel(CH, config)
        await store.insert(
            CH,
            [
                msg(1, dedup_id="x", headers=b"{}"),
                msg(2, available_at=NOW + 100),
                msg(3, expires_at=NOW + 50),
                msg(4),
            ],
            dedup_since=0,
        )
        await store.lease(CH, [(3, 2)], NOW + 30)
        await store.delete(CH, [4])

        store = await reopen(store)
        await store.ping()
        assert await store.load_channels() == {CH: config}
        assert await store.max_id() == 3
        assert await store.counts(CH, NOW) == ChannelCounts(3, 1, NOW + 100, NOW + 50)
        assert await store.leased(CH, NOW) == [
            replace(msg(3, expires_at=NOW + 50), leased=True, attempt=2, available_at=NOW + 30)
        ]
        assert await store.page_ready(CH, 0, NOW, 10) == [msg(1, headers=b"{}")]
        again = await store.insert(CH, [msg(5, dedup_id="x")], dedup_since=0)
        assert again.ids == [1] and again.new == []
        # Writes still work after reopening, and survive a second one.
        await store.insert(CH, [msg(6)], dedup_since=0)
        store = await reopen(store)
        assert await all_ids(store) == [1, 2, 3, 6]

    # -- failures: what a retry can fix, and what it cannot -----------------------------------
    async def test_message_past_the_store_limit_is_refused_for_good(self, store: Store) -> None:
        most = store.max_message_bytes
        headers = b'{"k": "v"}'
        exact = msg(1, body=b"x" * (most - len(headers)), headers=headers)
        await store.insert(CH, [exact], dedup_since=0)  # body plus encoded headers: fits
        over = msg(3, body=b"x" * (most - len(headers) + 1), headers=headers)
        with pytest.raises(StoreTooLarge) as failed:
            await store.insert(CH, [msg(2, dedup_id="d"), over], dedup_since=0)
        assert failed.value.status == 413 and failed.value.retry_after is None
        assert await all_ids(store) == [1]  # nothing of the batch, nor its dedup id
        assert ids((await store.insert(CH, [msg(4, dedup_id="d")], dedup_since=0)).new) == [4]
        # A dead letter may pass the limit by the headers dead-lettering adds, no more: past
        # that it is refused, and the source keeps the message.
        grown = replace(over, id=5, body=over.body + b"x" * (DEAD_LETTER_HEADROOM - 1))
        too_big = replace(grown, id=6, body=grown.body + b"x")
        with pytest.raises(StoreTooLarge):
            await store.move(CH, [4], "dlq", [too_big])
        assert await all_ids(store) == [1, 4]
        assert await all_ids(store, "dlq") == []
        assert await store.move(CH, [4], "dlq", [grown]) == [grown]
        assert await all_ids(store, "dlq") == [5]

    async def test_outage_is_retryable_and_leaves_nothing(
        self, store: Store, outage: Outage
    ) -> None:
        await store.insert(CH, [msg(1)], dedup_since=0)
        async with outage(store):
            with pytest.raises(StoreUnavailable) as failed:
                await store.insert(CH, [msg(2, dedup_id="d", body=b"y" * 20_000)], 0)
            assert failed.value.status == 503 and failed.value.retry_after
        assert await all_ids(store) == [1]
        # The retry, once the store is back, stores the message (its dedup id was not kept).
        retry = await store.insert(CH, [msg(2, dedup_id="d", body=b"y" * 20_000)], 0)
        assert retry.ids == [2] and ids(retry.new) == [2]
        assert await all_ids(store) == [1, 2]

    # -- node secret ------------------------------------------------------------------------
    async def test_secret_is_made_once_and_kept(self, store: Store, reopen: Reopen) -> None:
        first = await store.secret()
        assert isinstance(first, bytes) and len(first) == SECRET_BYTES
        assert len(set(first)) > 8  # random, not a constant
        assert await store.secret() == first
        store = await reopen(store)
        assert await store.secret() == first

    async def test_concurrent_first_secrets_agree(self, store: Store) -> None:
        assert len(set(await asyncio.gather(*(store.secret() for _ in range(8))))) == 1

    # -- ownership: shard leases ------------------------------------------------------------
    async def test_first_take_and_a_live_lease_refuses_others(
        self, store: Store, clock: ManualClock
    ) -> None:
        assert await store.leases() == {}
        assert await store.store_time_ms() == clock.now_ms()
        now = clock.now_ms()
        first = await store.take_lease(SHARD, *A, TTL)
        assert first == ShardLease(SHARD, A[0], A[1], epoch=1, expires_at=now + TTL)
        assert await store.leases() == {SHARD: first}
        clock.advance(TTL - 1)  # one ms before expiry by the store's clock: still live
        assert await store.take_lease(SHARD, *B, TTL) is None
        # Its holder too must renew rather than take it again (a take would bump the epoch).
        assert await store.take_lease(SHARD, *A, TTL) is None
        # A wrong from_epoch is no hand-off.
        assert await store.take_lease(SHARD, *B, TTL, from_epoch=7) is None
        assert await store.leases() == {SHARD: first}
        # Shards are independent.
        other = await store.take_lease("s2", *B, TTL)
        assert other is not None and other.epoch == 1 and other.owner == B[0]

    async def test_an_expired_lease_goes_to_the_next_taker_at_a_new_epoch(
        self, store: Store, clock: ManualClock
    ) -> None:
        await store.take_lease(SHARD, *A, TTL)
        clock.advance(TTL)  # expires_at <= store time: free
        now = clock.now_ms()
        taken = await store.take_lease(SHARD, *B, 500)
        assert taken == ShardLease(SHARD, B[0], B[1], epoch=2, expires_at=now + 500)
        # The old holder lost it for good: renewing or releasing its epoch does nothing.
        assert await store.renew_lease(SHARD, A[0], 1, TTL) is None
        assert await store.release_lease(SHARD, A[0], 1) is False
        assert await store.leases() == {SHARD: taken}

    async def test_renew_extends_from_the_store_clock_while_owner_and_epoch_match(
        self, store: Store, clock: ManualClock
    ) -> None:
        held = await store.take_lease(SHARD, *A, TTL)
        assert held is not None
        clock.advance(1_500)
        renewed = await store.renew_lease(SHARD, A[0], 1, TTL)
        assert renewed == ShardLease(SHARD, A[0], A[1], 1, clock.now_ms() + TTL)
        assert await store.renew_lease(SHARD, B[0], 1, TTL) is None  # not the owner
        assert await store.renew_lease(SHARD, A[0], 2, TTL) is None  # not the epoch
        assert await store.renew_lease("s9", A[0], 1, TTL) is None  # never taken
        # Expired but taken by no one: the epoch never moved, so renewing is still safe.
        clock.advance(TTL + 10_000)
        late = await store.renew_lease(SHARD, A[0], 1, TTL)
        assert late == ShardLease(SHARD, A[0], A[1], 1, clock.now_ms() + TTL)
        assert await store.leases() == {SHARD: late}

    async def test_release_expires_now_and_the_next_take_bumps_the_epoch(
        self, store: Store, clock: ManualClock
    ) -> None:
        await store.take_lease(SHARD, *A, TTL)
        assert await store.release_lease(SHARD, B[0], 1) is False  # not the owner
        assert await store.release_lease(SHARD, A[0], 2) is False  # not the epoch
        assert await store.release_lease(SHARD, A[0], 1) is True
        assert await store.leases() == {SHARD: ShardLease(SHARD, A[0], A[1], 1, 0)}
        # A holder that let go cannot renew its way back ...
        assert await store.renew_lease(SHARD, A[0], 1, TTL) is None
        # ... and taking it again, with no time passed, is a new epoch, even for the same node.
        again = await store.take_lease(SHARD, *A, TTL)
        assert again == ShardLease(SHARD, A[0], A[1], 2, clock.now_ms() + TTL)

    async def test_hand_off_with_from_epoch_takes_a_live_lease_at_once(
        self, store: Store, clock: ManualClock
    ) -> None:
        await store.take_lease(SHARD, *A, TTL)  # live for TTL more
        handed = await store.take_lease(SHARD, *B, TTL, from_epoch=1)
        assert handed == ShardLease(SHARD, B[0], B[1], 2, clock.now_ms() + TTL)
        # The agreement was for epoch 1 only: replaying it fails.
        assert await store.take_lease(SHARD, *C, TTL, from_epoch=1) is None
        assert await store.renew_lease(SHARD, A[0], 1, TTL) is None
        onward = await store.take_lease(SHARD, *C, TTL, from_epoch=2)
        assert onward is not None and onward.epoch == 3 and onward.owner == C[0]
        # from_epoch on a shard nobody held: a plain first take.
        fresh = await store.take_lease("s2", *A, TTL, from_epoch=0)
        assert fresh is not None and fresh.epoch == 1

    async def test_transfer_hands_a_live_lease_from_its_holder_to_another_at_once(
        self, store: Store, twin: Store, clock: ManualClock
    ) -> None:
        held = await store.take_lease(SHARD, *A, TTL)  # live for TTL more
        assert held is not None
        clock.advance(500)
        moved = await store.transfer_lease(SHARD, A[0], 1, *B, TTL)
        assert moved == ShardLease(SHARD, B[0], B[1], 2, clock.now_ms() + TTL)
        assert await store.leases() == {SHARD: moved}
        # The old holder is deposed: its epoch renews, releases and transfers nothing ...
        assert await store.renew_lease(SHARD, A[0], 1, TTL) is None
        assert await store.release_lease(SHARD, A[0], 1) is False
        assert await store.transfer_lease(SHARD, A[0], 1, *C, TTL) is None
        # ... and a write fenced at it is refused, in another store instance too.
        twin.fence(lambda ch: (SHARD, 1))
        with pytest.raises(Fenced):
            await twin.insert(CH, [msg(1)], 0)
        # The new holder renews its epoch as if it had taken it.
        renewed = await store.renew_lease(SHARD, B[0], 2, TTL)
        assert renewed is not None and renewed.owner == B[0]
        # Only the holder of (owner, epoch) can transfer: not another node, not another epoch.
        assert await store.transfer_lease(SHARD, A[0], 2, *C, TTL) is None
        assert await store.transfer_lease(SHARD, B[0], 1, *C, TTL) is None
        assert await store.transfer_lease("s9", A[0], 1, *C, TTL) is None  # never taken
        # Expired but taken by no one: the epoch never moved, the holder may still hand it on.
        clock.advance(TTL + 1)
        onward = await store.transfer_lease(SHARD, B[0], 2, *C, TTL)
        assert onward == ShardLease(SHARD, C[0], C[1], 3, clock.now_ms() + TTL)
        # Released: nothing left to hand on (whoever takes it next bumps the epoch).
        assert await store.release_lease(SHARD, C[0], 3) is True
        assert await store.transfer_lease(SHARD, C[0], 3, *A, TTL) is None
        assert (await store.leases())[SHARD].expires_at == 0

    async def test_of_a_transfer_and_concurrent_takers_exactly_one_wins(
        self, store: Store, twin: Store, clock: ManualClock
    ) -> None:
        for round_ in range(3):
            lease = (await store.leases()).get(SHARD) or await store.take_lease(SHARD, *A, TTL)
            assert lease is not None
            clock.advance(TTL)  # expired: takers may take it, its holder may transfer it
            stores = (store, twin)
            outcomes = await asyncio.gather(
                store.transfer_lease(SHARD, lease.owner, lease.epoch, *B, TTL),
                *(
                    stores[i % 2].take_lease(SHARD, f"n{i}", f"http://n{i}:1", TTL)
                    for i in range(4)
                ),
            )
            winners = [o for o in outcomes if o is not None]
            assert len(winners) == 1, (round_, outcomes)
            assert winners[0].epoch == lease.epoch + 1
            assert (await store.leases())[SHARD] == winners[0]

    async def test_epochs_grow_by_one_and_are_never_reused(
        self, store: Store, clock: ManualClock, reopen: Reopen
    ) -> None:
        epochs: list[int] = []
        for i in range(6):
            owner = (A, B, C)[i % 3]
            lease = await store.take_lease(SHARD, *owner, TTL)
            assert lease is not None
            epochs.append(lease.epoch)
            if i % 2:
                assert await store.release_lease(SHARD, owner[0], lease.epoch)
            else:
                clock.advance(TTL)
        store = await reopen(store)  # the epoch is in the store, not in a node
        lease = await store.take_lease(SHARD, *A, TTL)
        assert lease is not None
        assert [*epochs, lease.epoch] == [1, 2, 3, 4, 5, 6, 7]

    async def test_of_concurrent_takers_exactly_one_wins(
        self, store: Store, twin: Store, clock: ManualClock
    ) -> None:
        owners = [(f"node-{i}", f"http://n{i}:7100") for i in range(8)]

        async def race(**kw: Any) -> ShardLease:
            stores = (store, twin)
            won = await asyncio.gather(
                *(stores[i % 2].take_lease(SHARD, *o, TTL, **kw) for i, o in enumerate(owners))
            )
            winners = [w for w in won if w is not None]
            assert len(winners) == 1, won
            assert (await store.leases())[SHARD] == winners[0]
            return winners[0]

        assert (await race()).epoch == 1  # the first take ever
        clock.advance(TTL)
        assert (await race()).epoch == 2  # after expiry
        assert (await race(from_epoch=2)).epoch == 3  # hand-offs from one epoch

    # -- ownership: topology ----------------------------------------------------------------
    async def test_topology_is_changed_by_compare_and_set_on_its_version(
        self, store: Store, twin: Store, reopen: Reopen
    ) -> None:
        assert await store.topology() is None
        assert await store.swap_topology(None, 1, b'{"version": 1}') is True
        assert await twin.swap_topology(None, 1, b'{"other": 1}') is False  # exists already
        assert await twin.topology() == (1, b'{"version": 1}')
        assert await store.swap_topology(1, 2, b"v2") is True
        assert await twin.swap_topology(1, 2, b"stale") is False  # lost the race to v2
        assert await store.swap_topology(5, 6, b"ahead") is False
        for expected, version in [(2, 2), (2, 1), (None, 0)]:
            with pytest.raises(StoreError, match="must grow"):
                await store.swap_topology(expected, version, b"x")
        # Concurrent swaps from one version: exactly one wins, and its document is stored.
        docs = [b"from-%d" % i for i in range(6)]
        stores = (store, twin)
        won = await asyncio.gather(
            *(stores[i % 2].swap_topology(2, 3, d) for i, d in enumerate(docs))
        )
        assert sum(won) == 1
        assert await store.topology() == (3, docs[won.index(True)])
        store = await reopen(store)
        assert await store.topology() == (3, docs[won.index(True)])

    # -- ownership: fencing -----------------------------------------------------------------
    async def test_fenced_writes_apply_while_the_epoch_holds(
        self, store: Store, clock: ManualClock
    ) -> None:
        lease = await store.take_lease(SHARD, *A, TTL)
        assert lease is not None
        store.fence(at(SHARD, lease.epoch))
        await store.save_channel(CH, ChannelConfig())
        await store.insert(CH, [msg(1), msg(2), msg(3)], dedup_since=0)
        await store.lease(CH, [(1, 1)], NOW + 100)
        await store.delete(CH, [1])
        # Expired, but nobody took it: the epoch is unchanged, so writes still apply.
        clock.advance(TTL * 10)
        await store.move(CH, [2], "dlq", [msg(10)])
        assert await all_ids(store) == [3]
        assert await all_ids(store, "dlq") == [10]
        # Released for a hand-off: the holder's last commits still apply until the taker comes.
        assert await store.release_lease(SHARD, A[0], lease.epoch)
        await store.insert(CH, [msg(4)], dedup_since=0)
        assert await all_ids(store) == [3, 4]

    async def test_a_deposed_owners_writes_are_refused(
        self, store: Store, twin: Store, clock: ManualClock
    ) -> None:
        """Store A is fenced at epoch 1; node B (another store over the same data) takes the
        shard at epoch 2; every write of A then raises Fenced."""
        await self._refused_after_takeover(store, twin, clock)

    async def test_a_deposed_owners_writes_are_refused_on_one_store(
        self, store: Store, clock: ManualClock
    ) -> None:
        """The same with one store playing both owners: the fence is read from the store, not
        remembered by the store object."""
        await self._refused_after_takeover(store, store, clock)

    async def _refused_after_takeover(self, a: Store, b: Store, clock: ManualClock) -> None:
        config = ChannelConfig(max_length=5)
        await a.save_channel(CH, config)
        await a.insert(CH, [msg(1, dedup_id="x"), msg(2), msg(3, available_at=NOW - 1)], 0)
        await a.insert(CH, [msg(5, dedup_id="old", enqueued_at=1)], 0)
        await a.lease(CH, [(2, 1)], NOW + 100)
        assert await a.take_lease(SHARD, *A, TTL) is not None
        a.fence(at(SHARD, 1))
        clock.advance(TTL)  # A's lease lapses (say A was paused) ...
        assert await b.take_lease(SHARD, *B, TTL) is not None  # ... and B takes over: epoch 2

        writes: dict[str, Callable[[], Awaitable[Any]]] = {
            "insert": lambda: a.insert(CH, [msg(4, dedup_id="y")], 0),
            "lease (dequeue)": lambda: a.lease(CH, [(1, 1)], NOW + 100),
            "delete (ack)": lambda: a.delete(CH, [1, 2]),
            "release (nack)": lambda: a.release(CH, [2], 0),
            "extend": lambda: a.extend(CH, [2], NOW + 9_000),
            "move (dead-letter)": lambda: a.move(CH, [1], "dlq", [msg(10)]),
            "purge": lambda: a.purge(CH),
            "promote_due": lambda: a.promote_due(CH, NOW, 10),
            "save_channel": lambda: a.save_channel(CH, ChannelConfig(max_length=1)),
            "drop_channel": lambda: a.drop_channel(CH),
        }
        for what, write in writes.items():
            with pytest.raises(Fenced) as refused:
                await write()
            err = refused.value
            assert isinstance(err, StoreUnavailable), what
            assert (err.status, err.title, err.retry_after) == (503, "Not the owner", 1), what
            assert repr(SHARD) in err.detail and "epoch 1" in err.detail, what
            assert "epoch 2" in err.detail, what

        # Nothing of any of them is in the store.
        in_flight = replace(msg(2), leased=True, attempt=1, available_at=NOW + 100)
        assert await b.load_channels() == {CH: config}
        assert await b.page_ready(CH, 0, NOW, 10) == [
            msg(1),
            msg(3, available_at=NOW - 1),  # not promoted
            msg(5, enqueued_at=1),
        ]
        assert await b.leased(CH, NOW) == [in_flight]
        assert await all_ids(b) == [1, 2, 3, 5]
        assert await all_ids(b, "dlq") == []
        # Dedup ids: "y" was not recorded, "old" was not pruned.
        b.fence(at(SHARD, 2))  # B writes as the owner it is
        again = await b.insert(CH, [msg(6, dedup_id="y"), msg(7, dedup_id="old")], 0)
        assert again.ids == [6, 5]
        b.fence(None)
        # Lease calls are not fenced: A sees it lost the shard and can follow the new epoch.
        assert await a.renew_lease(SHARD, A[0], 1, TTL) is None
        assert (await a.leases())[SHARD].epoch == 2
        # Nor is pruning dedup ids past their window: harmless from any node.
        assert await a.prune_dedup(NOW, 10) >= 1
        a.fence(None)
        await a.delete(CH, [6])  # unfenced (a standalone store): applied
        assert await all_ids(b) == [1, 2, 3, 5]

    async def test_a_fence_on_a_shard_nobody_holds_refuses(self, store: Store) -> None:
        store.fence(at(SHARD, 1))
        with pytest.raises(Fenced, match="no lease"):
            await store.insert(CH, [msg(1)], 0)
        assert await all_ids(store) == []
        # Lease, topology and secret calls pass a fence.
        assert await store.take_lease(SHARD, *A, TTL) is not None
        assert await store.swap_topology(None, 1, b"t")
        assert len(await store.secret()) == SECRET_BYTES
        await store.insert(CH, [msg(1)], 0)  # epoch 1 is now the stored one
        assert await all_ids(store) == [1]

    async def test_writes_racing_a_takeover_are_applied_only_under_the_old_epoch(
        self, store: Store, twin: Store
    ) -> None:
        """Producers of a fenced owner keep enqueueing while another node takes the shard over
        (a hand-off): each enqueue that returned is stored; each refused one is absent where the
        store's fence is atomic (on MongoDB without transactions it may have landed whole)."""
        assert await store.take_lease(SHARD, *A, TTL) is not None
        store.fence(at(SHARD, 1))
        # Until the takeover refuses them: another connection's lease write can wait some
        # 100 ms for the write lock while these keep it busy. Bounded in count and time.
        ids_ = iter(range(1, 1_000_000))
        deadline = asyncio.get_running_loop().time() + 10
        accepted: set[int] = set()
        refused: set[int] = set()
        under_way = asyncio.Event()

        async def produce() -> None:
            for i in ids_:  # shared: each producer takes the next id
                await asyncio.sleep(0)  # let the others run, even on a store that never waits
                if asyncio.get_running_loop().time() > deadline:
                    return
                try:
                    await store.insert(CH, [msg(i, dedup_id=f"d{i}")], 0)
                except Fenced:
                    refused.add(i)
                    return
                accepted.add(i)
                if len(accepted) >= 20:
                    under_way.set()

        async def take_over() -> None:
            await asyncio.wait_for(under_way.wait(), 5)
            assert await twin.take_lease(SHARD, *B, TTL, from_epoch=1) is not None

        await asyncio.gather(*(produce() for _ in range(4)), take_over())
        assert len(accepted) >= 20 and refused
        stored = set(await all_ids(twin))
        assert accepted <= stored
        if store.atomic_fence:
            assert stored == accepted
        assert stored <= accepted | refused

    # -- ownership: fencing per shard -------------------------------------------------------
    async def _own(self, store: Store, shard: str, times: int = 1) -> int:
        """Take `shard` `times` times (releasing in between); the epoch it ends at."""
        for _ in range(times):
            lease = await store.take_lease(shard, *A, TTL)
            assert lease is not None
            if lease.epoch < times:
                assert await store.release_lease(shard, A[0], lease.epoch)
        return lease.epoch

    @staticmethod
    def _writes(store: Store, channel: str, base: int) -> dict[str, Callable[[], Awaitable[Any]]]:
        """One call of every fenced write on `channel`, on messages base+1 .. base+3."""
        return {
            "save_channel": lambda: store.save_channel(channel, ChannelConfig(max_length=9)),
            "insert": lambda: store.insert(
                channel,
                [msg(base + 1, dedup_id=f"d{base}"), msg(base + 2), msg(base + 3, available_at=5)],
                0,
            ),
            "lease (dequeue)": lambda: store.lease(channel, [(base + 1, 1)], NOW + 100),
            "extend": lambda: store.extend(channel, [base + 1], NOW + 200),
            "release (nack)": lambda: store.release(channel, [base + 1], 0),
            "promote_due": lambda: store.promote_due(channel, NOW, 10),
            "delete (ack)": lambda: store.delete(channel, [base + 1]),
            "move (dead-letter)": lambda: store.move(
                channel, [base + 2], f"{channel}-dlq", [msg(base + 50)]
            ),
            "purge": lambda: store.purge(channel),
            "drop_channel": lambda: store.drop_channel(channel),
        }

    async def test_two_shards_at_different_epochs_at_once(self, store: Store) -> None:
        """One node owns s1 at epoch 3 and s2 at epoch 1: each channel's writes are judged by
        its own shard's epoch, also when both shards' writes are under way together."""
        e1, e2 = await self._own(store, "s1", 3), await self._own(store, "s2")
        assert (e1, e2) == (3, 1)
        store.fence(by_channel({CH: ("s1", 3), OTHER: ("s2", 1), "x": ("s2", 1)}))
        for write in self._writes(store, CH, 0).values():
            await write()  # each applies
        assert await all_ids(store, f"{CH}-dlq") == [50]
        # Concurrent writes of both shards (on SQLite: in one commit group).
        results = await asyncio.gather(
            *(store.insert((CH, OTHER)[i % 2], [msg(100 + i)], 0) for i in range(20))
        )
        assert [r.ids for r in results] == [[100 + i] for i in range(20)]
        assert await all_ids(store) == list(range(100, 120, 2))
        assert await all_ids(store, OTHER) == list(range(101, 120, 2))
        # A fence naming the wrong epoch of either shard is refused.
        store.fence(by_channel({CH: ("s1", 2), OTHER: ("s2", 1)}))
        with pytest.raises(Fenced, match="epoch 3"):
            await store.insert(CH, [msg(200)], 0)
        await store.insert(OTHER, [msg(201)], 0)
        assert 200 not in await all_ids(store) and 201 in await all_ids(store, OTHER)

    async def test_a_takeover_of_one_shard_fences_only_its_channels(
        self, store: Store, twin: Store, clock: ManualClock
    ) -> None:
        """A owns s1 and s2; B takes s1 over. A's writes to s1's channel are refused, its
        writes to s2's go on, also when issued together."""
        await self._own(store, "s1")
        await self._own(store, "s2")
        store.fence(by_channel({CH: ("s1", 1), OTHER: ("s2", 1)}))
        await store.insert(CH, [msg(1), msg(2)], 0)
        await store.insert(OTHER, [msg(11), msg(12)], 0)
        clock.advance(TTL)
        assert await store.renew_lease("s2", A[0], 1, TTL) is not None  # A keeps s2 ...
        assert await twin.take_lease("s1", *B, TTL) is not None  # ... B takes s1: epoch 2
        for write in self._writes(store, CH, 100).values():
            with pytest.raises(Fenced, match="epoch 2"):
                await write()
        assert await all_ids(twin) == [1, 2]
        for write in self._writes(store, OTHER, 200).values():
            await write()
        assert await all_ids(twin, f"{OTHER}-dlq") == [250]
        # Issued together: each shard's writes get their own answer.
        outcomes = await asyncio.gather(
            *(store.insert((CH, OTHER)[i % 2], [msg(300 + i)], 0) for i in range(10)),
            return_exceptions=True,
        )
        assert all(isinstance(o, Fenced) for o in outcomes[0::2]), outcomes
        served = [o for o in outcomes[1::2] if isinstance(o, EnqueueResult)]
        assert [o.ids for o in served] == [[301 + 2 * i] for i in range(5)]
        assert await all_ids(twin) == [1, 2]
        assert await all_ids(twin, OTHER) == [301, 303, 305, 307, 309]

    async def test_a_channel_of_no_owned_shard_is_refused_at_once(self, store: Store) -> None:
        """resolve -> None: this node owns no shard for the channel. Every fenced write is
        refused without reading the store; `fence(None)` lifts the fence."""
        await self._own(store, "s2")
        await store.insert(CH, [msg(1, dedup_id="old", enqueued_at=1), msg(2)], 0)
        store.fence(by_channel({OTHER: ("s2", 1)}))
        for what, write in self._writes(store, CH, 100).items():
            with pytest.raises(Fenced) as refused:
                await write()
            assert repr(CH) in refused.value.detail and "owns no shard" in refused.value.detail
            assert refused.value.status == 503 and refused.value.retry_after == 1, what
        assert await all_ids(store) == [1, 2]
        await store.insert(OTHER, [msg(3)], 0)  # its own shard's channel is served
        # Not fenced at all: pruning, leases, topology, the secret.
        assert await store.prune_dedup(NOW, 10) == 1
        assert await store.take_lease("s3", *A, TTL) is not None
        assert await store.swap_topology(None, 1, b"t")
        assert len(await store.secret()) == SECRET_BYTES
        store.fence(None)
        await store.insert(CH, [msg(4)], 0)
        await store.delete(CH, [1])
        assert await all_ids(store) == [2, 4]

    async def test_resolve_is_called_once_per_write_call(self, store: Store) -> None:
        """Not per message: a batch of 100 costs one call; so does every other write."""
        await self._own(store, SHARD)
        calls: list[str] = []

        def resolve(channel: str) -> tuple[str, int]:
            calls.append(channel)
            return (SHARD, 1)

        store.fence(resolve)
        await store.insert(CH, [msg(i, dedup_id=str(i)) for i in range(1, 101)], 0)
        assert calls == [CH]
        for what, write in self._writes(store, OTHER, 1000).items():
            calls.clear()
            await write()
            assert calls == [OTHER], what
        calls.clear()
        await store.prune_dedup(NOW, 10)
        await store.leases()
        await store.page_ready(CH, 0, NOW, 10)
        assert calls == []

    # -- members ----------------------------------------------------------------------------
    async def test_member_reports_are_upserted_by_url_on_the_stores_clock(
        self, store: Store, twin: Store, clock: ManualClock, reopen: Reopen
    ) -> None:
        assert await store.members() == {}
        await store.report_member(A[1], b'{"role": "primary"}')
        await twin.report_member(B[1], b"\x00binary\xff")
        assert await twin.members() == {
            A[1]: (NOW, b'{"role": "primary"}'),
            B[1]: (NOW, b"\x00binary\xff"),
        }
        clock.advance(750)
        await twin.report_member(A[1], b'{"role": "backup"}')  # by url, whoever writes it
        assert await store.members() == {
            A[1]: (NOW + 750, b'{"role": "backup"}'),
            B[1]: (NOW, b"\x00binary\xff"),
        }
        store = await reopen(store)
        assert (await store.members())[A[1]] == (NOW + 750, b'{"role": "backup"}')

    async def test_member_reports_are_not_fenced(self, store: Store, twin: Store) -> None:
        """A node that owns nothing (or was just deposed) still reports itself."""
        store.fence(by_channel({}))
        await store.report_member(A[1], b"a")
        assert await twin.take_lease(SHARD, *B, TTL) is not None
        store.fence(at(SHARD, 1))
        assert await twin.take_lease(SHARD, *B, TTL, from_epoch=1) is not None  # epoch 2
        await store.report_member(A[1], b"a2")
        assert await twin.members() == {A[1]: (NOW, b"a2")}

    async def test_concurrent_member_reports_keep_one_per_url(
        self, store: Store, twin: Store
    ) -> None:
        urls = [f"http://n{i}:7100" for i in range(6)]
        stores = (store, twin)
        await asyncio.gather(
            *(
                stores[(i + r) % 2].report_member(url, b"%d-%d" % (i, r))
                for r in range(3)
                for i, url in enumerate(urls)
            )
        )
        members = await store.members()
        assert sorted(members) == sorted(urls)
        for i, url in enumerate(urls):
            seen_at, doc = members[url]
            assert seen_at == NOW and doc.startswith(b"%d-" % i)

    # -- dedup across store instances -------------------------------------------------------
    async def test_dedup_holds_across_store_instances(self, store: Store, twin: Store) -> None:
        """Two nodes (two store instances over the same data) enqueue the same dedup ids at
        once, say across a hand-off: the store, not a lock inside one of them, keeps one
        message per id, and both are told its id."""
        keys = [f"k{i}" for i in range(40)]

        async def send(s: Store, base: int) -> dict[str, int]:
            told: dict[str, int] = {}

            async def one(i: int) -> None:
                result = await s.insert(CH, [msg(base + i, dedup_id=keys[i])], dedup_since=0)
                told[keys[i]] = result.ids[0]

            await asyncio.gather(*(one(i) for i in range(len(keys))))
            return told

        a, b = await asyncio.gather(send(store, 1_000), send(twin, 2_000))
        assert a == b
        assert await all_ids(store) == sorted(a.values())
        # A batch holding a taken id and a fresh one, from either instance.
        again = await twin.insert(CH, [msg(3_000, dedup_id="k0"), msg(3_001, dedup_id="new")], 0)
        assert again.ids == [a["k0"], 3_001]
