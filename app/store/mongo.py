"""The MongoDB store (motor), for nodes that share or replicate their data.

Works on a standalone server, so it uses no transactions: `insert` and `move` reach all or nothing
by ordering their writes and undoing their own partial work on failure (see each method). Every
write uses a journaled write concern (majority by default), so it is durable when it returns.

Layout: `messages` keyed by the engine's int64 message id (`_id`), `dedup` with one record per
(channel, dedup id) that outlives the message, `channels` keyed by channel name, `leases` keyed
by shard, `members` keyed by node URL, and `meta` holding the secret and the topology.

Dedup across nodes: a batch stores its messages, then claims their dedup ids by inserting into
`dedup` (a unique index on channel and dedup id) or, for an id past its window, by a
compare-and-set on the old record. Of store instances racing for an id exactly one claim lands;
the others delete the copies they stored and answer with the winner's message id. Until they
do, a loser's copy sits in the store for one round trip (a consumer paging the channel right
then may be handed it too: at-least-once); no enqueue is lost, and no duplicate stays.

Ownership (see `app.store.base`). The store's clock is the server's: `store_time_ms` reads
`localTime` from `hello`. A lease operation reads it first and then compare-and-sets on it, so
expiry is judged by a server time at most one round trip old: a lease looks live a little longer
(never shorter) to a taker, and runs from a moment before the call returned, so a holder that
counts its lease from before it called never overestimates it. Taking, renewing and releasing
are single-document `find_one_and_update`s (the first take an `insert_one` on the shard's
`_id`), atomic on any server, so of racing takers exactly one wins.

Fencing without transactions (a standalone server has none): a fenced write resolves its channel
to (shard, epoch) when it is called, and reads that shard's epoch before the write and again after
it. Epochs only grow, so when both reads find the fenced epoch,
the epoch was that one for the whole write: a write that returns was applied while this node
owned the shard. That part is guaranteed (on a replica set with the default majority write
concern: a deposed MongoDB primary may answer the epoch reads from stale data, but it cannot
acknowledge the write). What is not: a takeover between the first read and
the write lets a deposed owner's write land late (the window is one round trip plus the
write); the second read then raises `Fenced`, so the request fails and nothing is acknowledged,
but the write stays applied (an insert stays, with its dedup record, so the client's retry is
deduplicated rather than lost). The new owner reads the store when it takes over; a late write
it did not see is a stored message it pages in, or a lease that hides a message until its
deadline: a delay, never a loss. Keeping that window short rests on timing: an owner stops
writing before its lease can have run out by its own monotonic clock. Multi-document
transactions on a replica set would close the window (the write and an epoch check in one
transaction); they are not used yet because mongomock, which the tests run on, has no sessions.
"""

from __future__ import annotations

import asyncio
import calendar
import dataclasses
import logging
import os
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Concatenate, ParamSpec, TypeVar

from bson.errors import BSONError
from motor.motor_asyncio import AsyncIOMotorClient
from pymongo import (
    ASCENDING,
    DESCENDING,
    IndexModel,
    ReturnDocument,
    UpdateMany,
    WriteConcern,
)
from pymongo.errors import (
    BulkWriteError,
    ConnectionFailure,
    DocumentTooLarge,
    DuplicateKeyError,
    ExecutionTimeout,
    OperationFailure,
    PyMongoError,
    ServerSelectionTimeoutError,
)

from app.clock import Clock
from app.errors import StoreError, StoreTooLarge, StoreUnavailable
from app.models import (
    DEAD_LETTER_HEADROOM,
    HISTORY_HEADROOM,
    HISTORY_LIMIT,
    ChannelConfig,
    ChannelCounts,
    EnqueueResult,
    Event,
    Message,
)
from app.settings import mongo_database
from app.store.base import (
    SECRET_BYTES,
    MessageState,
    Page,
    Resolve,
    ShardLease,
    check_sizes,
    check_topology_version,
    fenced,
    page_size,
    unowned,
)

Doc = dict[str, Any]
P = ParamSpec("P")
T = TypeVar("T")

log = logging.getLogger(__name__)

_DUPLICATE_KEY = 11000
# A BSON document holds at most 16 MiB; a message document also carries its id, channel name
# (up to 128 characters), times and field names, a dead-lettered one gains a few headers, and a
# traced one its history.
BSON_LIMIT = 16 * 1024 * 1024
MAX_MESSAGE_BYTES = BSON_LIMIT - 16 * 1024 - HISTORY_HEADROOM
# Server error codes a retry can fix: the server's retryable errors (host unreachable or not
# found, shutting down, stepped down, not primary, network timeout, socket error), time limits,
# write-concern failures, write conflicts and a full disk.
_RETRYABLE_CODES = frozenset(
    {6, 7, 50, 64, 89, 91, 112, 189, 262, 9001, 10107, 11600, 11602, 13388, 13435, 13436, 14031}
)
_TOO_LARGE_CODES = frozenset({10334, 17419})  # BSONObjectTooLarge; an update grew a document
_CONFIG_FIELDS = tuple(f.name for f in dataclasses.fields(ChannelConfig))


def _write_concern(w: str | int) -> str | int:
    """Digits are a node count ("1"); "majority" or a tag set name stays a string."""
    return int(w) if isinstance(w, str) and w.isdigit() else w


def _transient(exc: PyMongoError) -> bool:
    """Whether a retry of the same operation can succeed."""
    if isinstance(exc, (ConnectionFailure, ExecutionTimeout)) or exc.timeout:
        return True  # unreachable, not primary, timed out (a write-concern wtimeout included)
    if exc.has_error_label("RetryableWriteError") or exc.has_error_label(
        "TransientTransactionError"
    ):
        return True
    if isinstance(exc, BulkWriteError):
        details = exc.details
        errors = [*details.get("writeErrors", []), *details.get("writeConcernErrors", [])]
        codes = {e.get("code") for e in errors}
        return bool(codes) and codes <= _RETRYABLE_CODES
    # A write concern that cannot be met (unknown tag, too many nodes) is for good; one that
    # timed out or lost its primary is not.
    return isinstance(exc, OperationFailure) and exc.code in _RETRYABLE_CODES


def _classify(exc: PyMongoError | BSONError) -> StoreError:
    """A driver error as the domain's: `StoreUnavailable` only for what a retry can fix."""
    if isinstance(exc, DocumentTooLarge) or (
        isinstance(exc, OperationFailure) and exc.code in _TOO_LARGE_CODES
    ):
        return StoreTooLarge(f"MongoDB cannot hold this message: {exc}")
    if isinstance(exc, ConnectionFailure):  # includes server selection and network timeouts
        return StoreUnavailable(f"MongoDB unreachable: {exc}")
    if isinstance(exc, PyMongoError) and _transient(exc):
        return StoreUnavailable(f"MongoDB failed the operation, retry later: {exc}")
    return StoreError(f"MongoDB refused the operation: {exc}")


@contextmanager
def _translated() -> Iterator[None]:
    """Turn driver errors into the domain's: callers never see a pymongo or bson exception."""
    try:
        yield
    except (PyMongoError, BSONError) as exc:  # DocumentTooLarge is a bson InvalidDocument
        raise _classify(exc) from exc


def _to_doc(channel: str, m: Message) -> Doc:
    doc: Doc = {
        "_id": m.id,
        "channel": channel,
        "body": bytes(m.body),  # bytes encode as BSON binary
        "enqueued_at": m.enqueued_at,
        "available_at": m.available_at,
        "attempt": m.attempt,
        "leased": m.leased,
    }
    # Absent rather than null: keeps the partial expiry index small and the documents lean. The
    # dedup id lives in `dedup` only (as in SQLite): a stored message never needs it again.
    if m.headers is not None:
        doc["headers"] = bytes(m.headers)
    if m.expires_at is not None:
        doc["expires_at"] = m.expires_at
    return doc


def _pushed(events: Sequence[Event]) -> list[tuple[Event, list[int]]]:
    """Each distinct event object (one per batch, or per attempt) with the positions it is
    the event of: one update appends it to all of those messages."""
    groups: dict[int, tuple[Event, list[int]]] = {}
    for i, event in enumerate(events):
        group = groups.get(id(event))
        if group is None:
            group = groups[id(event)] = (event, [])
        group[1].append(i)
    return list(groups.values())


def _push(event: Event) -> Doc:
    """Append `event` to a history, keeping its last HISTORY_LIMIT events."""
    return {"$push": {"history": {"$each": [event], "$slice": -HISTORY_LIMIT}}}


def _from_doc(doc: Mapping[str, Any]) -> Message:
    headers = doc.get("headers")
    return Message(
        id=int(doc["_id"]),
        body=bytes(doc["body"]),
        headers=None if headers is None else bytes(headers),
        enqueued_at=int(doc["enqueued_at"]),
        available_at=int(doc["available_at"]),
        expires_at=doc.get("expires_at"),
        attempt=int(doc["attempt"]),
        leased=bool(doc["leased"]),
    )


def _fenced_write(
    method: Callable[Concatenate[MongoStore, str, P], Coroutine[Any, Any, T]],
) -> Callable[Concatenate[MongoStore, str, P], Coroutine[Any, Any, T]]:
    """A write of a channel (its first argument) that, while the store is fenced, runs between
    two reads of the epoch of the shard its channel resolves to when it is called (see the module
    docstring for what that guarantees)."""

    def guarded(
        self: MongoStore, channel: str, /, *args: P.args, **kwargs: P.kwargs
    ) -> Coroutine[Any, Any, T]:
        if self._resolve is None:
            return method(self, channel, *args, **kwargs)
        fence = self._resolve(channel)  # now, not when the coroutine first runs
        return self._fenced(channel, fence, lambda: method(self, channel, *args, **kwargs))

    return guarded


def _lease(doc: Mapping[str, Any]) -> ShardLease:
    return ShardLease(
        shard=str(doc["_id"]),
        owner=str(doc["owner"]),
        owner_url=str(doc["owner_url"]),
        epoch=int(doc["epoch"]),
        expires_at=int(doc["expires_at"]),
    )


class MongoStore:
    kind = "mongodb"
    atomic_fence = False  # without transactions: see the module docstring
    max_message_bytes = MAX_MESSAGE_BYTES

    def __init__(
        self,
        url: str = "",
        *,
        database: str | None = None,
        write_concern: str | int = "majority",
        journal: bool = True,
        timeout_ms: int = 5_000,
        client: Any = None,
        max_message_bytes: int = MAX_MESSAGE_BYTES,
        clock: Clock | None = None,
    ) -> None:
        """Remember the settings only; `open()` connects. `client` injects a ready client (tests
        pass `mongomock_motor.AsyncMongoMockClient()`); an injected client is not closed here.
        `max_message_bytes` may lower the store's limit (tests use a small one). `clock`
        replaces the server's clock as the store's clock (tests move it; mongomock has none)."""
        self._url = url
        self.max_message_bytes = min(max_message_bytes, MAX_MESSAGE_BYTES)
        self._database = database or (mongo_database(url) if url else "") or "lionmq"
        self._write_concern = WriteConcern(w=_write_concern(write_concern), j=journal)
        self._timeout_ms = timeout_ms
        self._client: Any = client
        self._owns_client = client is None
        self._db: Any = None
        # Dedup ids being inserted right now, each with the future of the batch that holds it.
        self._claims: dict[tuple[str, str], asyncio.Future[None]] = {}
        self._clock = clock
        self._resolve: Resolve | None = None

    # -- lifecycle --------------------------------------------------------------------------
    async def open(self) -> None:
        if self._client is None:
            try:
                # timeoutMS bounds every operation: a hung server fails fast instead of stalling.
                self._client = AsyncIOMotorClient(
                    self._url,
                    serverSelectionTimeoutMS=self._timeout_ms,
                    connectTimeoutMS=self._timeout_ms,
                    timeoutMS=self._timeout_ms,
                )
            except (PyMongoError, ValueError) as exc:  # a malformed URL: retrying won't help
                raise StoreError(f"MongoDB configuration rejected: {exc}") from exc
        self._db = self._client.get_database(self._database, write_concern=self._write_concern)
        with _translated():
            await self._messages.create_indexes(
                [
                    IndexModel([("channel", ASCENDING), ("_id", ASCENDING)]),  # paging, max, purge
                    # promote_due, next_due, leased, delayed counts.
                    IndexModel(
                        [("channel", ASCENDING), ("leased", ASCENDING), ("available_at", ASCENDING)]
                    ),
                    # Only messages with a TTL carry expires_at.
                    IndexModel(
                        [("channel", ASCENDING), ("expires_at", ASCENDING)],
                        partialFilterExpression={"expires_at": {"$exists": True}},
                    ),
                ]
            )
            await self._dedup.create_indexes(
                [
                    IndexModel([("channel", ASCENDING), ("dedup_id", ASCENDING)], unique=True),
                    IndexModel([("used_at", ASCENDING)]),  # prune_dedup
                ]
            )

    async def close(self) -> None:
        if self._client is not None and self._owns_client:
            self._client.close()
            self._client = None
        self._db = None

    async def ping(self) -> None:
        if self._client is None:
            raise StoreUnavailable("MongoDB store is not open")
        with _translated():
            await self._client.admin.command("ping")

    @property
    def _messages(self) -> Any:
        return self._collection("messages")

    @property
    def _dedup(self) -> Any:
        return self._collection("dedup")

    @property
    def _channels(self) -> Any:
        return self._collection("channels")

    @property
    def _leases(self) -> Any:
        return self._collection("leases")

    def _collection(self, name: str) -> Any:
        if self._db is None:
            raise StoreError("MongoDB store is not open")
        return self._db[name]

    # -- channels ---------------------------------------------------------------------------
    async def load_channels(self) -> dict[str, ChannelConfig]:
        with _translated():
            docs = await self._channels.find({}).to_list(None)
        return {
            str(d["_id"]): ChannelConfig(**{k: d[k] for k in _CONFIG_FIELDS if k in d})
            for d in docs
        }

    @_fenced_write
    async def save_channel(self, name: str, config: ChannelConfig) -> None:
        with _translated():
            await self._channels.replace_one({"_id": name}, dataclasses.asdict(config), upsert=True)

    @_fenced_write
    async def drop_channel(self, name: str) -> None:
        # Settings go last: a failure part-way leaves a channel with fewer messages, never
        # orphaned messages of a channel that no longer exists.
        with _translated():
            await self._messages.delete_many({"channel": name})
            await self._dedup.delete_many({"channel": name})
            await self._channels.delete_one({"_id": name})

    # -- writes -----------------------------------------------------------------------------
    @_fenced_write
    async def insert(
        self,
        channel: str,
        messages: Sequence[Message],
        dedup_since: int,
        events: Sequence[Event] | None = None,
    ) -> EnqueueResult:
        """Dedup is enforced by the unique (channel, dedup id) index (see `_claim`), across
        every store instance; batches of this instance that share a dedup id also run one
        after the other, so that the loser of a race here does not store a copy and delete it."""
        # Checked here as well as by the driver: mongomock has no size limit, and a batch is
        # refused whole before any of it is sent.
        check_sizes(messages, self.max_message_bytes, self.kind)
        keys = {(channel, m.dedup_id) for m in messages if m.dedup_id is not None}
        if not keys:
            return await self._insert(channel, messages, dedup_since, events)
        while busy := {self._claims[k] for k in keys if k in self._claims}:
            await asyncio.wait(busy)
        mine: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        for k in keys:
            self._claims[k] = mine
        try:
            return await self._insert(channel, messages, dedup_since, events)
        finally:
            for k in keys:
                del self._claims[k]
            mine.set_result(None)

    async def _insert(
        self,
        channel: str,
        messages: Sequence[Message],
        dedup_since: int,
        events: Sequence[Event] | None,
    ) -> EnqueueResult:
        wanted = list({m.dedup_id for m in messages if m.dedup_id is not None})
        previous: dict[str, Doc] = {}
        if wanted:
            with _translated():
                async for rec in self._dedup.find(
                    {"channel": channel, "dedup_id": {"$in": wanted}}
                ):
                    previous[rec["dedup_id"]] = rec

        claimed: dict[str, Message] = {}  # dedup id -> the message of this batch that claims it
        for m in messages:
            key = m.dedup_id
            if key is None or key in claimed:
                continue
            rec = previous.get(key)
            if rec is None or rec["used_at"] < dedup_since:
                claimed[key] = m
        new = [m for m in messages if m.dedup_id is None or claimed.get(m.dedup_id) is m]

        # Messages first, dedup records second: a crash between the two can only let a retry
        # store a duplicate (at-least-once), never dedup against a message that was not stored.
        if new:
            history = None
            if events is not None:
                started = {m.id: [event] for m, event in zip(messages, events, strict=True)}
                history = [started[m.id] for m in new]
            await self._insert_messages(channel, new, history)
        lost: dict[str, int] = {}
        if claimed:
            try:
                lost = await self._claim(channel, claimed, previous)
            except StoreError:
                await self._undo_insert(channel, new, claimed, previous)
                raise
        if lost:
            # Another store instance claimed these ids first: its messages stand, ours go.
            await self._delete_copies(channel, [claimed[key].id for key in lost])
            new = [m for m in new if m.dedup_id not in lost]
        ids: list[int] = []
        for m in messages:
            key = m.dedup_id
            if key is None:
                ids.append(m.id)
            elif key in lost:
                ids.append(lost[key])
            elif key in claimed:
                ids.append(claimed[key].id)
            else:
                ids.append(int(previous[key]["message_id"]))
        return EnqueueResult(ids=ids, new=new)

    async def _claim(
        self, channel: str, claimed: Mapping[str, Message], previous: Mapping[str, Doc]
    ) -> dict[str, int]:
        """Record each claimed dedup id as this batch's, by the unique (channel, dedup id) index:
        an insert where there was no record, a compare-and-set on the old record where it was
        past the window. The ids another store instance claimed first, each with its message
        id, are returned. So dedup holds across every instance sharing the database, not only
        between the batches of this one (which `insert` serialises to spare the churn)."""
        lost: dict[str, int] = {}
        fresh = [key for key in claimed if key not in previous]
        if fresh:
            docs = [
                {
                    "channel": channel,
                    "dedup_id": key,
                    "message_id": claimed[key].id,
                    "used_at": claimed[key].enqueued_at,
                }
                for key in fresh
            ]
            try:
                with _translated():
                    await self._dedup.insert_many(docs, ordered=False)
            except StoreError as exc:
                errors = _only_duplicate_keys(exc)
                if errors is None:
                    raise
                for e in errors:
                    key = docs[e["index"]]["dedup_id"]
                    lost[key] = -1  # claimed by another: its message id is read below
        with _translated():
            for key in claimed.keys() & previous.keys():
                old = previous[key]
                m = claimed[key]
                swapped = await self._dedup.update_one(
                    {
                        "channel": channel,
                        "dedup_id": key,
                        "message_id": old["message_id"],
                        "used_at": old["used_at"],
                    },
                    {"$set": {"message_id": m.id, "used_at": m.enqueued_at}},
                )
                if not swapped.matched_count:
                    lost[key] = -1
            if lost:
                async for rec in self._dedup.find(
                    {"channel": channel, "dedup_id": {"$in": list(lost)}}
                ):
                    lost[rec["dedup_id"]] = int(rec["message_id"])
        gone = [key for key, winner in lost.items() if winner < 0]
        if gone:
            # The winner's record went again (its insert undone, or pruned) in between.
            raise StoreUnavailable(
                f"dedup ids {gone[:3]} of channel {channel!r} changed hands during this"
                " enqueue; retry it"
            )
        return lost

    async def _delete_copies(self, channel: str, ids: Sequence[int]) -> None:
        with _translated():
            await self._messages.delete_many({"channel": channel, "_id": {"$in": list(ids)}})

    async def _insert_messages(
        self, channel: str, new: Sequence[Message], history: Sequence[list[Event]] | None = None
    ) -> None:
        """insert_many, or nothing: on failure delete what this call inserted, then raise.
        `history`: each message's (traced), else none."""
        docs = [_to_doc(channel, m) for m in new]
        if history is not None:
            for doc, events in zip(docs, history, strict=True):
                doc["history"] = events
        try:
            with _translated():
                await self._messages.insert_many(docs, ordered=True)
        except StoreError as exc:
            cause = exc.__cause__
            # Ordered: exactly the first nInserted went in. No server selected: nothing was sent.
            # Otherwise (network) assume all may have.
            if isinstance(cause, BulkWriteError):
                done = int(cause.details.get("nInserted", 0))
            else:
                done = 0 if isinstance(cause, ServerSelectionTimeoutError) else len(new)
            if done:
                await self._best_effort(
                    self._messages.delete_many(
                        {"channel": channel, "_id": {"$in": [m.id for m in new[:done]]}}
                    )
                )
            raise

    async def _undo_insert(
        self,
        channel: str,
        new: Sequence[Message],
        claimed: Mapping[str, Message],
        previous: Mapping[str, Doc],
    ) -> None:
        """Best effort: restore the dedup records this insert touched and delete its messages."""
        for key, m in claimed.items():
            mine = {"channel": channel, "dedup_id": key, "message_id": m.id}
            old = previous.get(key)
            if old is None:
                await self._best_effort(self._dedup.delete_many(mine))
            else:
                restore = {"message_id": old["message_id"], "used_at": old["used_at"]}
                await self._best_effort(self._dedup.update_many(mine, {"$set": restore}))
        await self._best_effort(
            self._messages.delete_many({"channel": channel, "_id": {"$in": [m.id for m in new]}})
        )

    @staticmethod
    async def _best_effort(op: Any) -> None:
        # The caller must see the original error; a failed undo is only worth a log line.
        try:
            await op
        except PyMongoError as exc:
            log.warning("MongoDB undo after a failed write failed too: %s", exc)

    @_fenced_write
    async def lease(
        self,
        channel: str,
        leases: Sequence[tuple[int, int]],
        deadline: int,
        events: Sequence[Event] | None = None,
    ) -> None:
        if not leases:
            return
        # One update per attempt (and, traced, per event: one per attempt too), in one bulk.
        groups: dict[tuple[int, int], tuple[Doc, list[int]]] = {}
        for i, (message_id, attempt) in enumerate(leases):
            event = None if events is None else events[i]
            group = groups.get((attempt, id(event)))
            if group is None:
                leased = {"leased": True, "available_at": deadline, "attempt": attempt}
                update: Doc = {"$set": leased}
                if event is not None:
                    update.update(_push(event))
                group = groups[(attempt, id(event))] = (update, [])
            group[1].append(message_id)
        with _translated():
            await self._messages.bulk_write(
                [
                    UpdateMany({"channel": channel, "_id": {"$in": ids}}, update)
                    for update, ids in groups.values()
                ],
                ordered=False,
            )

    @_fenced_write
    async def release(
        self,
        channel: str,
        ids: Sequence[int],
        available_at: int,
        events: Sequence[Event] | None = None,
    ) -> None:
        if not ids:
            return
        back = {"$set": {"leased": False, "available_at": available_at}}
        with _translated():
            if events is None:
                await self._messages.update_many(
                    {"channel": channel, "_id": {"$in": list(ids)}}, back
                )
                return
            # Traced: one update per distinct event, each setting and appending, in one bulk.
            await self._messages.bulk_write(
                [
                    UpdateMany(
                        {"channel": channel, "_id": {"$in": [ids[i] for i in where]}},
                        {**back, **_push(event)},
                    )
                    for event, where in _pushed(events)
                ],
                ordered=False,
            )

    @_fenced_write
    async def extend(self, channel: str, ids: Sequence[int], deadline: int) -> None:
        if ids:
            with _translated():
                # Only leases: extending a released message must not turn it into a delayed one.
                await self._messages.update_many(
                    {"channel": channel, "_id": {"$in": list(ids)}, "leased": True},
                    {"$set": {"available_at": deadline}},
                )

    @_fenced_write
    async def delete(self, channel: str, ids: Sequence[int]) -> None:
        if ids:
            with _translated():
                await self._messages.delete_many({"channel": channel, "_id": {"$in": list(ids)}})

    @_fenced_write
    async def move(
        self,
        channel: str,
        ids: Sequence[int],
        target: str | None,
        moved: Sequence[Message],
        target_config: ChannelConfig | None = None,
        events: Sequence[Event] | None = None,
    ) -> list[Message]:
        # No transactions: insert into the target first, then delete from the source. A failure
        # or crash between the two leaves the message in both channels (a duplicate, which
        # at-least-once delivery tolerates), never in neither.
        # A dead letter carries a few more headers than the message did (DEAD_LETTER_HEADROOM).
        check_sizes(moved, self.max_message_bytes + DEAD_LETTER_HEADROOM, self.kind)
        copies: list[Message] = []
        history: list[list[Event]] | None = None
        if target is not None and moved:
            # Copies of what the source still holds only: a purge or delete that came first
            # took the rest, which must not come back as dead letters. Traced: each copy
            # carries its original's history on, with its event.
            fields = {"_id": 1} if events is None else {"_id": 1, "history": 1}
            with _translated():
                held = {
                    d["_id"]: d.get("history") or []
                    async for d in self._messages.find(
                        {"channel": channel, "_id": {"$in": list(ids)}}, fields
                    )
                }
            copies = [c for i, c in zip(ids, moved, strict=True) if i in held]
            if events is not None:
                history = [
                    [*held[i][-(HISTORY_LIMIT - 1) :], event]
                    for i, event in zip(ids, events, strict=True)
                    if i in held
                ]
        if target is not None and copies and target_config is not None:
            # Settings first (kept if it has some): copies never sit in a channel no owner
            # lists; a failure after this leaves a channel with settings and no messages.
            with _translated():
                await self._channels.update_one(
                    {"_id": target},
                    {"$setOnInsert": dataclasses.asdict(target_config)},
                    upsert=True,
                )
        if target is not None and copies:
            moved_ids = [m.id for m in copies]
            docs = [_to_doc(target, m) for m in copies]
            if history is not None:
                for doc, events_of in zip(docs, history, strict=True):
                    doc["history"] = events_of
            try:
                with _translated():
                    await self._messages.insert_many(docs, ordered=False)
            except StoreError as exc:
                # Only duplicate keys: an earlier attempt already copied them; carry on.
                if _only_duplicate_keys(exc) is None:
                    # A server never selected: nothing was sent, nothing to drop.
                    if not isinstance(exc.__cause__, ServerSelectionTimeoutError):
                        # The source still holds every message: dropping the copies loses nothing.
                        await self._best_effort(
                            self._messages.delete_many(
                                {"channel": target, "_id": {"$in": moved_ids}}
                            )
                        )
                    raise
        # Deliberately no undo if this fails: the delete may have applied server-side, and
        # removing the copies then would lose the messages.
        if ids:
            with _translated():
                await self._messages.delete_many({"channel": channel, "_id": {"$in": list(ids)}})
        return copies

    @_fenced_write
    async def purge(self, channel: str) -> int:
        with _translated():
            result = await self._messages.delete_many({"channel": channel})
        return int(result.deleted_count)

    @_fenced_write
    async def promote_due(self, channel: str, now: int, limit: int) -> list[Message]:
        query = {"channel": channel, "leased": False, "available_at": {"$gt": 0, "$lte": now}}
        with _translated():
            # Earliest due first (index order), so a small limit never starves old delays.
            order = [("available_at", ASCENDING), ("_id", ASCENDING)]
            docs = await self._messages.find(query).sort(order).limit(limit).to_list(None)
            if not docs:
                return []
            # Same filter again: a message leased or released meanwhile is left alone.
            await self._messages.update_many(
                {**query, "_id": {"$in": [d["_id"] for d in docs]}}, {"$set": {"available_at": 0}}
            )
        promoted = sorted((_from_doc(d) for d in docs), key=lambda m: m.id)
        for m in promoted:
            m.available_at = 0
        return promoted

    async def prune_dedup(self, before: int, limit: int) -> int:
        with _translated():
            old = self._dedup.find({"used_at": {"$lt": before}}, {"_id": 1}).limit(limit)
            ids = [doc["_id"] async for doc in old]
            if not ids:
                return 0
            result = await self._dedup.delete_many({"_id": {"$in": ids}})
        return int(result.deleted_count)

    # -- reads ------------------------------------------------------------------------------
    async def page_ready(self, channel: str, after_id: int, now: int, limit: int) -> list[Message]:
        query = {"channel": channel, "_id": {"$gt": after_id}, "available_at": {"$lte": now}}
        return await self._find(query, limit)

    async def expired(self, channel: str, now: int, limit: int) -> list[Message]:
        query = {
            "channel": channel,
            "expires_at": {"$exists": True, "$lte": now},  # $exists lets the partial index serve
            "$or": [{"leased": False}, {"available_at": {"$lte": now}}],  # not in flight
        }
        return await self._find(query, limit)

    async def leased(self, channel: str, now: int) -> list[Message]:
        return await self._find(
            {"channel": channel, "leased": True, "available_at": {"$gt": now}}, 0
        )

    async def _find(self, query: Mapping[str, Any], limit: int) -> list[Message]:
        """Matching messages in id order; limit 0 means all."""
        with _translated():
            cursor = self._messages.find(query).sort("_id", ASCENDING)
            docs = await cursor.limit(limit).to_list(None)
        return [_from_doc(d) for d in docs]

    async def counts(self, channel: str, now: int) -> ChannelCounts:
        with _translated():
            total, delayed, next_due, next_expiry = await asyncio.gather(
                self._messages.count_documents({"channel": channel}),
                self._messages.count_documents(
                    {"channel": channel, "leased": False, "available_at": {"$gt": now}}
                ),
                self.next_due(channel),
                self.next_expiry(channel, now),
            )
        return ChannelCounts(
            total=int(total), delayed=int(delayed), next_due=next_due, next_expiry=next_expiry
        )

    async def next_due(self, channel: str) -> int | None:
        return await self._min(
            {"channel": channel, "leased": False, "available_at": {"$gt": 0}}, "available_at"
        )

    async def next_expiry(self, channel: str, now: int) -> int | None:
        query = {"channel": channel, "expires_at": {"$exists": True, "$gt": now}}
        return await self._min(query, "expires_at")

    async def _min(self, query: Mapping[str, Any], field: str) -> int | None:
        with _translated():
            doc = await self._messages.find_one(
                query, projection={field: True}, sort=[(field, ASCENDING)]
            )
        return None if doc is None else int(doc[field])

    async def history(self, channel: str, message_id: int) -> list[Event] | None:
        with _translated():
            doc = await self._messages.find_one(
                {"_id": message_id, "channel": channel}, {"history": 1}
            )
        if doc is None:
            return None
        return list(doc.get("history") or [])

    async def max_id(self) -> int:
        with _translated():
            doc = await self._messages.find_one(
                {}, projection={"_id": True}, sort=[("_id", DESCENDING)]
            )
        return 0 if doc is None else int(doc["_id"])

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
        ids: Doc = {"$gt": after_id}
        query: Doc = {"channel": channel, "_id": ids}
        upper: int | None = None
        with _translated():
            if state is not None:
                # Where the scan stops: `scan` entries along the (channel, _id) index.
                stop = self._messages.find(query, {"_id": True}).sort("_id", ASCENDING)
                last = await stop.skip(max(scan, limit) - 1).limit(1).to_list(None)
                if last:
                    upper = int(last[0]["_id"])
                    ids["$lte"] = upper
                query.update(_browse_state(state, now))
            found: list[Message] = []
            size, full = 0, False
            # Document by document: a page of large messages stops at `max_bytes`.
            async for doc in self._messages.find(query).sort("_id", ASCENDING).limit(limit):
                m = _from_doc(doc)
                size += page_size(m)
                if found and max_bytes is not None and size > max_bytes:
                    full = True
                    break
                found.append(m)
        if len(found) == limit or full:
            return Page(found, found[-1].id)
        return Page(found, upper)

    async def get_message(self, channel: str, msg_id: int) -> Message | None:
        with _translated():
            doc = await self._messages.find_one({"_id": msg_id, "channel": channel})
        if doc is None:
            return None
        return _from_doc(doc)

    # -- ownership --------------------------------------------------------------------------
    async def store_time_ms(self) -> int:
        if self._clock is not None:
            return self._clock.now_ms()
        if self._client is None:
            raise StoreUnavailable("MongoDB store is not open")
        with _translated():
            hello = await self._client.admin.command("hello")
        local = hello["localTime"]  # a UTC datetime, naive or aware
        return int(calendar.timegm(local.utctimetuple()) * 1000 + local.microsecond // 1000)

    def fence(self, resolve: Resolve | None) -> None:
        self._resolve = resolve

    async def _fenced(
        self, channel: str, fence: tuple[str, int] | None, write: Callable[[], Awaitable[T]]
    ) -> T:
        if fence is None:
            raise unowned(channel)
        await self._check_fence(*fence)
        result = await write()
        await self._check_fence(*fence, late=True)
        return result

    async def _check_fence(self, shard: str, epoch: int, *, late: bool = False) -> None:
        with _translated():
            doc = await self._leases.find_one({"_id": shard}, {"epoch": True})
        stored = None if doc is None else int(doc["epoch"])
        if stored != epoch:
            raise fenced(shard, epoch, stored, late=late)

    async def take_lease(
        self, shard: str, owner: str, owner_url: str, ttl_ms: int, *, from_epoch: int | None = None
    ) -> ShardLease | None:
        now = await self.store_time_ms()
        holder = {"owner": owner, "owner_url": owner_url, "expires_at": now + ttl_ms}
        free: list[Doc] = [{"expires_at": {"$lte": now}}]
        if from_epoch is not None:
            free.append({"epoch": from_epoch})  # the holder agreed to hand over
        with _translated():
            doc = await self._leases.find_one_and_update(
                {"_id": shard, "$or": free},
                {"$set": holder, "$inc": {"epoch": 1}},
                return_document=ReturnDocument.AFTER,
            )
            if doc is None:  # held by someone live, or never taken: only then can this insert
                try:
                    await self._leases.insert_one({"_id": shard, "epoch": 1, **holder})
                except DuplicateKeyError:
                    return None
                doc = {"_id": shard, "epoch": 1, **holder}
        return _lease(doc)

    async def renew_lease(
        self, shard: str, owner: str, epoch: int, ttl_ms: int
    ) -> ShardLease | None:
        now = await self.store_time_ms()
        with _translated():
            doc = await self._leases.find_one_and_update(
                {"_id": shard, "owner": owner, "epoch": epoch, "expires_at": {"$gt": 0}},
                {"$set": {"expires_at": now + ttl_ms}},
                return_document=ReturnDocument.AFTER,
            )
        return None if doc is None else _lease(doc)

    async def transfer_lease(
        self, shard: str, owner: str, epoch: int, to: str, to_url: str, ttl_ms: int
    ) -> ShardLease | None:
        now = await self.store_time_ms()
        holder = {"owner": to, "owner_url": to_url, "expires_at": now + ttl_ms}
        with _translated():
            doc = await self._leases.find_one_and_update(
                {"_id": shard, "owner": owner, "epoch": epoch, "expires_at": {"$gt": 0}},
                {"$set": holder, "$inc": {"epoch": 1}},
                return_document=ReturnDocument.AFTER,
            )
        return None if doc is None else _lease(doc)

    async def release_lease(self, shard: str, owner: str, epoch: int) -> bool:
        with _translated():
            result = await self._leases.update_one(
                {"_id": shard, "owner": owner, "epoch": epoch}, {"$set": {"expires_at": 0}}
            )
        return bool(result.matched_count)

    async def leases(self) -> dict[str, ShardLease]:
        with _translated():
            docs = await self._leases.find({}).to_list(None)
        return {str(d["_id"]): _lease(d) for d in docs}

    async def topology(self) -> tuple[int, bytes] | None:
        with _translated():
            doc = await self._collection("meta").find_one({"_id": "topology"})
        return None if doc is None else (int(doc["version"]), bytes(doc["doc"]))

    async def swap_topology(self, expected_version: int | None, version: int, doc: bytes) -> bool:
        check_topology_version(expected_version, version)
        meta = self._collection("meta")
        fields = {"version": version, "doc": bytes(doc)}
        with _translated():
            if expected_version is None:
                try:
                    await meta.insert_one({"_id": "topology", **fields})
                except DuplicateKeyError:
                    return False
                return True
            result = await meta.update_one(
                {"_id": "topology", "version": expected_version}, {"$set": fields}
            )
        return bool(result.matched_count)

    # -- members ----------------------------------------------------------------------------
    async def report_member(self, url: str, doc: bytes) -> None:
        now = await self.store_time_ms()
        with _translated():
            await self._collection("members").replace_one(
                {"_id": url}, {"seen_at": now, "doc": bytes(doc)}, upsert=True
            )

    async def members(self) -> dict[str, tuple[int, bytes]]:
        with _translated():
            docs = await self._collection("members").find({}).to_list(None)
        return {str(d["_id"]): (int(d["seen_at"]), bytes(d["doc"])) for d in docs}

    # -- node secret ------------------------------------------------------------------------
    async def secret(self) -> bytes:
        # $setOnInsert keeps the first value: nodes opening the store at once all read it.
        fresh = {"$setOnInsert": {"value": os.urandom(SECRET_BYTES)}}
        meta = self._collection("meta")
        with _translated():
            try:
                doc = await meta.find_one_and_update(
                    {"_id": "secret"}, fresh, upsert=True, return_document=ReturnDocument.AFTER
                )
            except DuplicateKeyError:  # two first upserts raced; the other one's value stands
                doc = await meta.find_one({"_id": "secret"})
        return bytes(doc["value"])


def _browse_state(state: MessageState, now: int) -> Doc:
    """A browsing state (`app.store.base.state_of`) as a filter on the message documents."""
    if state == "ready":
        return {"available_at": {"$lte": now}}
    return {"leased": state == "in_flight", "available_at": {"$gt": now}}


def _only_duplicate_keys(exc: StoreError) -> list[dict[str, Any]] | None:
    """The write errors of a bulk insert that failed on duplicate keys alone, else None."""
    cause = exc.__cause__
    errors = cause.details.get("writeErrors", []) if isinstance(cause, BulkWriteError) else []
    if not errors or any(e.get("code") != _DUPLICATE_KEY for e in errors):
        return None
    return list(errors)
