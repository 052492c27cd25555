"""The storage contract every backend keeps. `tests/store_contract.py` checks it against each one.

The store is the source of truth; the queue engine keeps only a bounded window in memory. Every
write method returns once its change is durable (committed, fsynced or journaled) and either
applies whole or not at all. On failure it raises `StoreUnavailable` when a retry can fix it
(unreachable, timed out, full, read-only, busy), `StoreTooLarge` for a message past the store's
`max_message_bytes`, and `StoreError` for anything else a retry cannot fix.

`available_at` encodes a message's state in one indexed column: 0 is ready, a future time with
`leased` is a lease deadline, a future time without it is a delay. A lease whose deadline has passed
is ready again without any write, which is what makes crash recovery free.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from app.errors import StoreTooLarge
from app.models import ChannelConfig, ChannelCounts, EnqueueResult, Message

# Size of the store's secret (see Store.secret), in bytes.
SECRET_BYTES = 32


class Store(Protocol):
    kind: str
    # The largest message (body plus encoded headers) this store can hold; the node refuses to
    # start with a MAX_MESSAGE_BYTES above it.
    max_message_bytes: int

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
    async def insert(
        self, channel: str, messages: Sequence[Message], dedup_since: int
    ) -> EnqueueResult:
        """Store a batch, all or nothing.

        A message whose `dedup_id` was used in this channel at or after `dedup_since` (by an
        earlier batch or earlier in this one) is not stored; its slot in `ids` holds the first
        message's id. `new` lists the messages actually stored, in batch order.
        """
        ...

    async def lease(self, channel: str, leases: Sequence[tuple[int, int]], deadline: int) -> None:
        """Mark (id, attempt) pairs as leased until `deadline`."""
        ...

    async def release(self, channel: str, ids: Sequence[int], available_at: int) -> None:
        """End leases: ready again at `available_at` (0: now)."""
        ...

    async def extend(self, channel: str, ids: Sequence[int], deadline: int) -> None: ...

    async def delete(self, channel: str, ids: Sequence[int]) -> None:
        """Acked: forget these messages for good."""
        ...

    async def move(
        self, channel: str, ids: Sequence[int], target: str | None, moved: Sequence[Message]
    ) -> list[Message]:
        """Delete `ids` from `channel` and insert `moved` into `target` (if any), atomically;
        `moved[i]` is the copy of `ids[i]`. Only copies of messages the channel still holds
        are inserted (one purged or deleted meanwhile must not come back as a dead letter);
        returns the copies inserted."""
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

    # -- node secret ------------------------------------------------------------------------
    async def secret(self) -> bytes:
        """A random key made on first use and kept in the store: the same for every node that
        shares the store, before and after restarts. Concurrent first calls agree on one key.
        It signs receipts, so it never leaves the node."""
        ...


def check_sizes(messages: Sequence[Message], limit: int, kind: str) -> None:
    """Refuse, before writing anything, a batch holding a message the store cannot hold."""
    for m in messages:
        size = len(m.body) + (len(m.headers) if m.headers else 0)
        if size > limit:
            raise StoreTooLarge(
                f"a message of {size} bytes (body plus encoded headers) is larger than the"
                f" {kind} store can hold ({limit} bytes); send it in smaller parts"
            )
