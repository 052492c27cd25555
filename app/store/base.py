"""The storage contract every backend keeps. `tests/store_contract.py` checks it against each one.

The store is the source of truth; the queue engine keeps only a bounded window in memory. Every
write method returns once its change is durable (committed, fsynced or journaled) and either
applies whole or not at all. On failure it raises `StoreUnavailable` when a retry can fix it
(unreachable, timed out, full, read-only, busy), `StoreTooLarge` for a message past the store's
`max_message_bytes`, and `StoreError` for anything else a retry cannot fix.

`available_at` encodes a message's state in one indexed column: 0 is ready, a future time with
`leased` is a lease deadline, a future time without it is a delay. A lease whose deadline has passed
is ready again without any write, which is what makes crash recovery free.

Ownership. Nodes that share a store split it into shards; the store is the only arbiter of who
owns one. Each shard has a lease (`ShardLease`): owner, epoch, expiry on the store's clock
(`store_time_ms`). Taking, renewing and releasing it are compare-and-set operations, so of
several nodes racing for a shard exactly one wins. The epoch grows by one on every take (a new
owner, or the same one after expiry or release) and is never reused. A store `fence`d at
(shard, epoch) applies a write only if that shard's stored lease still has that epoch, and
raises `Fenced` otherwise: a deposed owner's late write is refused. A node may own several
shards at once, each at its own epoch, so the fence is a function (`Resolve`) from a channel to
the (shard, epoch) its writes are made under. The topology document is versioned and changed by
compare-and-set on its version.
"""

from __future__ import annotations

import operator
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

from app.errors import Fenced, StoreError, StoreTooLarge
from app.models import ChannelConfig, ChannelCounts, EnqueueResult, Event, Message

# A fence: the (shard, epoch) a node writes a channel's messages under, or None when it owns no
# shard for the channel. Called once per fenced write call (never per message).
Resolve = Callable[[str], tuple[str, int] | None]

# Size of the store's secret (see Store.secret), in bytes.
SECRET_BYTES = 32

# A message's state as browsing shows it, judged from its row at a time `now` (see `state_of`).
MessageState = Literal["ready", "delayed", "in_flight"]
MESSAGE_STATES: tuple[MessageState, ...] = ("ready", "delayed", "in_flight")


def state_of(m: Message, now: int) -> MessageState:
    """The state a stored message is in at `now`, by the encoding above: deliverable once
    `available_at` has passed (a delay that fell due, a lease that ran out), else in flight
    while leased and delayed while not. The one rule `Store.browse` filters by."""
    if m.available_at <= now:
        return "ready"
    return "in_flight" if m.leased else "delayed"


@dataclass(frozen=True, slots=True)
class Page:
    """A page of `Store.browse`: `next` is the `after_id` of the next page, None when no message
    lies past this one (a page cut short by the scan bound may be short, even empty, with a
    `next`)."""

    messages: list[Message]
    next: int | None


def page_size(message: Message) -> int:
    """What a message weighs against `browse`'s `max_bytes`: its body and headers."""
    return len(message.body) + len(message.headers or b"")


@dataclass(frozen=True, slots=True)
class ShardLease:
    """Who owns a shard, as the store records it."""

    shard: str
    owner: str  # the node id of the holder
    owner_url: str  # where the holder serves (SERVER_HOST)
    epoch: int  # 1 for the first holder; +1 on every take, never reused
    # Store-clock ms at which the lease lapses; 0 once released. A lease with
    # expires_at <= store_time_ms() is free to take.
    expires_at: int


class Store(Protocol):
    kind: str
    # The largest message (body plus encoded headers) this store can hold; the node refuses to
    # start with a MAX_MESSAGE_BYTES above it.
    max_message_bytes: int
    # Whether a write refused as `Fenced` is certain to have applied nothing (SQLite: checked in
    # its transaction). False where a deposed owner's late write can land before it is refused
    # (MongoDB without transactions; see app/store/mongo.py).
    atomic_fence: bool

    async def open(self) -> None:
        """Connect and create the schema and indexes. Nothing connects before this."""
        ...

    async def close(self) -> None: ...

    async def ping(self) -> None:
        """Raise `StoreUnavailable` unless the store answers."""
        ...

    # -- channels ---------------------------------------------------------------------------
    async def load_channels(self) -> dict[str, ChannelConfig]: ...

    async def save_channel(self, name: str, config: ChannelConfig) -> None: ...

    async def drop_channel(self, name: str) -> None:
        """Forget a channel: its settings, its messages and its dedup ids."""
        ...

    # -- writes -----------------------------------------------------------------------------
    # The hot writes are awaitables, not coroutines: a store may answer with a future of its
    # own (SQLite's writer does), which the engine shields and settles without a task.
    #
    # History (a channel with `trace`): the writes that change a message's course take
    # `events`, one per message of the write in its order (the same event object may repeat),
    # and append each to its message's history in the same write, all or nothing with it. A
    # history keeps its last HISTORY_LIMIT events and goes with its message (delete, move,
    # purge, drop). None (every untraced channel): no history work at all.
    def insert(
        self,
        channel: str,
        messages: Sequence[Message],
        dedup_since: int,
        events: Sequence[Event] | None = None,
    ) -> Awaitable[EnqueueResult]:
        """Store a batch, all or nothing.

        A message whose `dedup_id` was used in this channel at or after `dedup_since` (by an
        earlier batch or earlier in this one) is not stored; its slot in `ids` holds the first
        message's id. `new` lists the messages actually stored, in batch order. With `events`,
        each stored message's history starts with its event.
        """
        ...

    def lease(
        self,
        channel: str,
        leases: Sequence[tuple[int, int]],
        deadline: int,
        events: Sequence[Event] | None = None,
    ) -> Awaitable[None]:
        """Mark (id, attempt) pairs as leased until `deadline`."""
        ...

    def release(
        self,
        channel: str,
        ids: Sequence[int],
        available_at: int,
        events: Sequence[Event] | None = None,
    ) -> Awaitable[None]:
        """End leases: ready again at `available_at` (0: now)."""
        ...

    def extend(self, channel: str, ids: Sequence[int], deadline: int) -> Awaitable[None]: ...

    def delete(self, channel: str, ids: Sequence[int]) -> Awaitable[None]:
        """Acked: forget these messages for good."""
        ...

    def move(
        self,
        channel: str,
        ids: Sequence[int],
        target: str | None,
        moved: Sequence[Message],
        target_config: ChannelConfig | None = None,
        events: Sequence[Event] | None = None,
    ) -> Awaitable[list[Message]]:
        """Delete `ids` from `channel` and insert `moved` into `target` (if any), atomically;
        `moved[i]` is the copy of `ids[i]`. Only copies of messages the channel still holds
        are inserted (one purged or deleted meanwhile must not come back as a dead letter);
        returns the copies inserted. With `target_config`, a target that has no settings yet
        gets these in the same write, so `load_channels` lists it: a dead letter sent into
        another shard's channel that no request ever created is found by that shard's owner
        (its audit, a takeover) even when the poke telling it is lost. With `events`, each
        copy carries its original's history forward, with `events[i]` appended."""
        ...

    async def purge(self, channel: str) -> int:
        """Delete every message of the channel; return how many."""
        ...

    async def promote_due(self, channel: str, now: int, limit: int) -> list[Message]:
        """Make delayed messages that are due ready (available_at = 0); return them by id."""
        ...

    async def prune_dedup(self, before: int, limit: int) -> int:
        """Forget up to `limit` dedup ids used before `before`; return how many went. Bounded,
        so that pruning a busy window never holds the writer for long."""
        ...

    # -- reads ------------------------------------------------------------------------------
    async def history(self, channel: str, message_id: int) -> list[Event] | None:
        """The message's history, oldest event first ([] when nothing was recorded for it), or
        None when the channel holds no such message."""
        ...

    async def page_ready(self, channel: str, after_id: int, now: int, limit: int) -> list[Message]:
        """Deliverable messages (available_at <= now) with id > after_id, in id order."""
        ...

    async def expired(self, channel: str, now: int, limit: int) -> list[Message]:
        """Messages whose TTL ran out (expires_at <= now) that are not in flight."""
        ...

    async def leased(self, channel: str, now: int) -> list[Message]:
        """Messages in flight at `now` (leased, deadline ahead): the leases to restore at start."""
        ...

    async def counts(self, channel: str, now: int) -> ChannelCounts: ...

    async def next_due(self, channel: str) -> int | None:
        """Earliest due time of a delayed message, or None."""
        ...

    async def next_expiry(self, channel: str, now: int) -> int | None:
        """Earliest TTL deadline after `now`, or None."""
        ...

    async def max_id(self) -> int:
        """The highest message id ever stored that is still present (0 when empty)."""
        ...

    async def browse(
        self,
        channel: str,
        state: MessageState | None,
        after_id: int,
        now: int,
        limit: int,
        scan: int,
        max_bytes: int | None = None,
    ) -> Page:
        """Up to `limit` messages of the channel with id > `after_id`, in id order, in `state`
        at `now` (`state_of`; None: any state), without their dedup ids (kept only in the dedup
        records, which have no index by message: one per message would cost every enqueue a
        B-tree write, about 8% of batch throughput, for a field only browsing shows). Examines
        at most `scan` (>= `limit`) messages past `after_id`, walking
        the channel's id index, so that a rare state in a long channel costs a bounded read.
        With `max_bytes`, the page holds the messages whose bodies and headers fit in
        `max_bytes` (at least one, however large), `next` the last one's id, so a page of large
        messages is never read into memory whole. Reads only: changes nothing, leases nothing,
        not fenced."""
        ...

    async def get_message(self, channel: str, msg_id: int) -> Message | None:
        """One message of the channel (as `browse` has it), None when the
        channel holds no message with that id. Reads only."""
        ...

    # -- ownership --------------------------------------------------------------------------
    async def store_time_ms(self) -> int:
        """The store's clock (ms since the epoch), which judges every lease's expiry: the server's
        where it has one (MongoDB), else this host's wall clock (SQLite). Stores built with an
        explicit `clock` use it instead (tests move it)."""
        ...

    async def take_lease(
        self, shard: str, owner: str, owner_url: str, ttl_ms: int, *, from_epoch: int | None = None
    ) -> ShardLease | None:
        """Take the shard's lease until store time + `ttl_ms`, at epoch + 1: when nobody ever held
        it (epoch 1), when it has expired by the store's clock (or was released), or, for a
        hand-off, when `from_epoch` is given and still the stored epoch (the holder agreed, so
        its expiry does not matter). None while the lease is live and not handed over, even to
        its own holder, which renews instead (a take would bump the epoch and fence out its own
        writes in flight). Of concurrent takers exactly one wins. Not fenced: taking a lease is
        itself a compare-and-set. The lease runs from the store's clock at some moment during
        the call, so a holder that counts `ttl_ms` on its own monotonic clock from before it
        called (less a margin for clock rates) never thinks it holds a lease that has expired."""
        ...

    async def renew_lease(
        self, shard: str, owner: str, epoch: int, ttl_ms: int
    ) -> ShardLease | None:
        """Extend the lease to store time + `ttl_ms` while (owner, epoch) still match, even if it
        expired meanwhile: as long as no one took it, the epoch did not move, so no other owner
        can have written under fencing, and holding on is as safe as before. None when the lease
        is lost: taken by another (a new epoch) or released (a holder that let go stays gone)."""
        ...

    async def transfer_lease(
        self, shard: str, owner: str, epoch: int, to: str, to_url: str, ttl_ms: int
    ) -> ShardLease | None:
        """Hand the lease from its holder straight to another node (a rolling restart, POST
        /cluster/shards/{id}/handoff): if (owner, epoch) still match and it was not released,
        it becomes `to`'s (at `to_url`) at epoch + 1 until store time + `ttl_ms`, without
        waiting for expiry. None otherwise (taken by another, or released: nothing changes).
        The holder calls it once its writes are drained; its late writes are fenced out by the
        new epoch like a deposed owner's. Not fenced: it is itself a compare-and-set."""
        ...

    async def release_lease(self, shard: str, owner: str, epoch: int) -> bool:
        """Expire the lease now (graceful stop, hand-off) if (owner, epoch) match; whether it
        did. The epoch stays: the next take, by anyone, bumps it."""
        ...

    async def leases(self) -> dict[str, ShardLease]:
        """Every shard's lease, live or not, by shard."""
        ...

    async def topology(self) -> tuple[int, bytes] | None:
        """The stored topology document and its version, or None before the first one."""
        ...

    async def swap_topology(self, expected_version: int | None, version: int, doc: bytes) -> bool:
        """Store `doc` as `version` if the stored version is still `expected_version` (None: no
        topology stored yet); whether it did. Of concurrent swaps from one version exactly one
        wins. `version` must be greater than `expected_version` (`StoreError` otherwise)."""
        ...

    def fence(self, resolve: Resolve | None) -> None:
        """From now on every write of messages or channels (insert, lease, release, extend,
        delete, move (judged by its source channel), purge, promote_due, drop_channel,
        save_channel) calls `resolve(channel)` once, when it is called: for (shard, epoch) it is
        applied only if that shard's stored lease still has that epoch, otherwise none of it is
        and it raises `Fenced`; for None it is refused with `Fenced` at once (this node owns no
        shard for the channel). `fence(None)`: writes apply unconditionally (a standalone node
        never fences). `prune_dedup` (harmless from any node), lease, topology, member and
        secret calls are not fenced."""
        ...

    # -- members ----------------------------------------------------------------------------
    # Presence, for display (`GET /cluster`, the watcher) only: never an input to ownership,
    # which the leases alone decide.
    async def report_member(self, url: str, doc: bytes) -> None:
        """Store `doc` as the member report of the node at `url` (replacing its last one),
        stamped with the store's clock. Not fenced."""
        ...

    async def members(self) -> dict[str, tuple[int, bytes]]:
        """Every member report: url -> (store-clock ms it was made at, doc)."""
        ...

    # -- node secret ------------------------------------------------------------------------
    async def secret(self) -> bytes:
        """A random key made on first use and kept in the store: the same for every node that
        shares the store, before and after restarts. Concurrent first calls agree on one key.
        It signs receipts, so it never leaves the node."""
        ...


_BODY = operator.attrgetter("body")
_HEADERS = operator.attrgetter("headers")


def check_sizes(messages: Sequence[Message], limit: int, kind: str) -> None:
    """Refuse, before writing anything, a batch holding a message the store cannot hold."""
    # A whole batch within the limit holds no message past it: settled at C speed (the API
    # checked each message against MAX_MESSAGE_BYTES already, so this is the usual answer).
    bodies = sum(map(len, map(_BODY, messages)))
    if bodies + sum(map(len, filter(None, map(_HEADERS, messages)))) <= limit:
        return
    for m in messages:
        size = len(m.body) + (len(m.headers) if m.headers else 0)
        if size > limit:
            raise StoreTooLarge(
                f"a message of {size} bytes (body plus encoded headers) is larger than the"
                f" {kind} store can hold ({limit} bytes); send it in smaller parts"
            )


def check_topology_version(expected: int | None, version: int) -> None:
    """A topology's version only grows."""
    if version <= (expected or 0):
        raise StoreError(
            f"topology version {version} does not follow version {expected}: it must grow"
        )


def unowned(channel: str) -> Fenced:
    """The refusal of a write for a channel of no shard this node owns."""
    return Fenced(
        f"this node owns no shard for channel {channel!r}, so nothing was written; retry at the"
        " channel's owner"
    )


def fenced(shard: str, epoch: int, stored: int | None, *, late: bool = False) -> Fenced:
    """The refusal of a write fenced at `epoch` when the store holds `stored` for the shard;
    `late` when the refusal came only after the write (a store without transactions)."""
    now = "no lease" if stored is None else f"epoch {stored}"
    outcome = (
        "the write may have reached the store before the takeover was seen, but it is not"
        " acknowledged"
        if late
        else "so nothing was written"
    )
    return Fenced(
        f"this node wrote for shard {shard!r} as its owner at epoch {epoch}, but the store now"
        f" holds {now}: another node owns the shard, {outcome}; retry at the owner"
    )
