"""Run the store contract against every backend, plus MongoDB's failure handling.

Backends: SQLite on a temporary file, MongoStore over mongomock-motor, and a real MongoDB when
MONGODB_URL is set (each test then gets its own database, dropped afterwards).
"""

from __future__ import annotations

import asyncio
import os
import socket
import sqlite3
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from bson.errors import InvalidDocument
from mongomock_motor import AsyncMongoMockClient
from motor.motor_asyncio import AsyncIOMotorClient
from pymongo.errors import (
    AutoReconnect,
    BulkWriteError,
    DocumentTooLarge,
    DuplicateKeyError,
    ExecutionTimeout,
    NetworkTimeout,
    NotPrimaryError,
    OperationFailure,
    ServerSelectionTimeoutError,
    WriteConcernError,
    WTimeoutError,
)

from app.clock import ManualClock
from app.errors import Fenced, StoreError, StoreTooLarge, StoreUnavailable
from app.models import Message
from app.store import mongo as mongo_store
from app.store import sqlite as sqlite_store
from app.store.base import Store
from app.store.mongo import MongoStore
from app.store.sqlite import SQLiteStore

pytest.register_assert_rewrite("store_contract")  # so its plain asserts report their values
from store_contract import CH, NOW, Outage, Reopen, StoreContract, all_ids, msg  # noqa: E402

MakeStore = Callable[[], Store]
# Small, so the contract reaches the size limit cheaply; each store's real one is checked below.
LIMIT = 64 * 1024


@pytest.fixture
def clock() -> ManualClock:
    """The stores' clock, which judges lease expiry: moved by the tests."""
    return ManualClock(NOW)


@pytest.fixture(params=["sqlite", "mongomock", "mongodb"])
async def make_store(
    request: pytest.FixtureRequest, tmp_path: Path, clock: ManualClock
) -> AsyncIterator[MakeStore]:
    """A factory of unopened stores that all see the same data, on one clock."""
    if request.param == "sqlite":
        path = str(tmp_path / "lionmq.db")
        yield lambda: SQLiteStore(path, max_message_bytes=LIMIT, clock=clock)
    elif request.param == "mongomock":
        client: Any = AsyncMongoMockClient()
        yield lambda: MongoStore(
            client=client, database="lionmq_test", max_message_bytes=LIMIT, clock=clock
        )
    else:
        url = os.environ.get("MONGODB_URL")
        if not url:
            pytest.skip("MONGODB_URL is not set: no real MongoDB to run the contract against")
        name = f"lionmq_test_{uuid.uuid4().hex[:16]}"
        yield lambda: MongoStore(
            url, database=name, timeout_ms=5_000, max_message_bytes=LIMIT, clock=clock
        )
        admin: Any = AsyncIOMotorClient(url, serverSelectionTimeoutMS=5_000)
        try:
            await admin.drop_database(name)
        finally:
            admin.close()


@pytest.fixture
async def opened() -> AsyncIterator[list[Store]]:
    """Every store a test opened, closed at teardown (closing twice is harmless)."""
    stores: list[Store] = []
    yield stores
    for s in stores:
        await s.close()


@pytest.fixture
async def store(make_store: MakeStore, opened: list[Store]) -> Store:
    s = make_store()
    await s.open()
    opened.append(s)
    return s


@pytest.fixture
async def twin(store: Store, make_store: MakeStore, opened: list[Store]) -> Store:
    """Another node's store over the same data: its own connections, or its own client."""
    s = make_store()
    await s.open()
    opened.append(s)
    return s


@pytest.fixture
def reopen(make_store: MakeStore, opened: list[Store]) -> Reopen:
    async def _reopen(old: Store) -> Store:
        await old.close()
        new = make_store()
        await new.open()
        opened.append(new)
        return new

    return _reopen


@asynccontextmanager
async def _sqlite_disk_full(store: SQLiteStore) -> AsyncIterator[None]:
    """A real SQLITE_FULL: the database may not grow past the pages it has now."""
    pages = await store._write(lambda c: c.execute("PRAGMA page_count").fetchone()[0], None)
    await store._write(lambda c: c.execute(f"PRAGMA max_page_count = {pages}"), None)
    try:
        yield
    finally:
        await store._write(lambda c: c.execute("PRAGMA max_page_count = 4294967294"), None)


@pytest.fixture
def outage(monkeypatch: pytest.MonkeyPatch) -> Outage:
    @asynccontextmanager
    async def _outage(store: Store) -> AsyncIterator[None]:
        if isinstance(store, SQLiteStore):
            async with _sqlite_disk_full(store):
                yield
            return
        assert isinstance(store, MongoStore)
        with monkeypatch.context() as patch:  # a replica set electing a new primary
            for collection in ("messages", "dedup"):
                _fail(patch, collection, "*", NotPrimaryError("not primary"))
            yield

    return _outage


class TestStoreContract(StoreContract):
    pass


# -- classification at the driver boundary --------------------------------------------------


def _bulk(write_errors: list[int], concern: bool = False) -> BulkWriteError:
    details: dict[str, Any] = {
        "writeErrors": [{"code": c, "errmsg": f"code {c}", "index": 0} for c in write_errors],
        "writeConcernErrors": [{"code": 64, "errmsg": "waiting"}] if concern else [],
        "nInserted": 0,
    }
    return BulkWriteError(details)


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (AutoReconnect("connection reset"), StoreUnavailable),
        (NotPrimaryError("not primary"), StoreUnavailable),
        (NetworkTimeout("timed out"), StoreUnavailable),
        (ServerSelectionTimeoutError("no server"), StoreUnavailable),
        (WTimeoutError("waiting for replication timed out", 64), StoreUnavailable),
        (WriteConcernError("waiting for replication timed out", 64), StoreUnavailable),
        (WriteConcernError("unsatisfiable write concern", 100), StoreError),
        (ExecutionTimeout("operation exceeded time limit", 50), StoreUnavailable),
        (OperationFailure("primary stepped down", 189), StoreUnavailable),
        (OperationFailure("interrupted at shutdown", 11600), StoreUnavailable),
        (_bulk([], concern=True), StoreUnavailable),
        (_bulk([11602]), StoreUnavailable),
        (DocumentTooLarge("BSON document too large (17000000 bytes)"), StoreTooLarge),
        (OperationFailure("object to insert too large", 10334), StoreTooLarge),
        (DuplicateKeyError("E11000 duplicate key", 11000), StoreError),
        (_bulk([11000]), StoreError),
        (_bulk([11000], concern=True), StoreError),
        (OperationFailure("not authorized", 13), StoreError),
        (InvalidDocument("cannot encode object"), StoreError),
    ],
    ids=lambda v: type(v).__name__,
)
async def test_mongo_errors_split_at_the_driver(
    mongo: MongoStore, monkeypatch: pytest.MonkeyPatch, error: Exception, expected: type
) -> None:
    """Only what a retry can fix is a 503; a too-large document is a 413; the rest is for good
    (bson's DocumentTooLarge is no PyMongoError, and used to escape as a 500)."""
    await mongo.insert(CH, [msg(1)], dedup_since=0)
    _fail(monkeypatch, "messages", "insert_many", error)
    with pytest.raises(StoreError) as failed:
        await mongo.insert(CH, [msg(2)], dedup_since=0)
    assert type(failed.value) is expected
    assert failed.value.__cause__ is error
    monkeypatch.undo()
    assert await all_ids(mongo) == [1]


def _sqlite_error(code: int) -> sqlite3.Error:
    exc = sqlite3.OperationalError(f"code {code}")
    exc.sqlite_errorcode = code
    exc.sqlite_errorname = f"SQLITE_{code}"
    return exc


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        (sqlite3.SQLITE_FULL, StoreUnavailable),
        (sqlite3.SQLITE_IOERR, StoreUnavailable),
        (sqlite3.SQLITE_IOERR | (3 << 8), StoreUnavailable),  # SQLITE_IOERR_WRITE
        (sqlite3.SQLITE_READONLY, StoreUnavailable),
        (sqlite3.SQLITE_BUSY, StoreUnavailable),
        (sqlite3.SQLITE_CANTOPEN, StoreUnavailable),
        (sqlite3.SQLITE_TOOBIG, StoreTooLarge),
        (sqlite3.SQLITE_CONSTRAINT, StoreError),
        (sqlite3.SQLITE_MISUSE, StoreError),
        (sqlite3.SQLITE_CORRUPT, StoreError),
        (sqlite3.SQLITE_ERROR, StoreError),
    ],
)
def test_sqlite_errors_split_by_result_code(code: int, expected: type) -> None:
    assert type(sqlite_store._translate(_sqlite_error(code))) is expected


async def test_sqlite_real_errors_are_classified(tmp_path: Path) -> None:
    """Real failures, not made-up codes: a full disk is retryable, a constraint is not."""
    store = SQLiteStore(str(tmp_path / "c.db"))
    await store.open()
    try:
        await store.insert(CH, [msg(1)], dedup_since=0)
        async with _sqlite_disk_full(store):
            with pytest.raises(StoreUnavailable, match="SQLITE_FULL"):
                await store.insert(CH, [msg(2, body=b"z" * 50_000)], dedup_since=0)
        with pytest.raises(StoreError, match="SQLITE_CONSTRAINT") as failed:
            await store.insert(CH, [msg(1)], dedup_since=0)
        assert not isinstance(failed.value, StoreUnavailable)
    finally:
        await store.close()


def test_each_store_declares_what_it_can_hold(tmp_path: Path) -> None:
    """MongoDB's documents stop at 16 MiB (with room for the other fields); SQLite's rows at
    SQLITE_MAX_LENGTH. Neither store can be told to hold more."""
    assert MongoStore.max_message_bytes < 16 * 1024 * 1024
    assert MongoStore().max_message_bytes == mongo_store.MAX_MESSAGE_BYTES
    assert MongoStore(max_message_bytes=1 << 40).max_message_bytes == mongo_store.MAX_MESSAGE_BYTES
    sqlite_limit = sqlite3.connect(":memory:").getlimit(sqlite3.SQLITE_LIMIT_LENGTH)
    assert SQLiteStore(str(tmp_path / "x.db")).max_message_bytes < sqlite_limit


# -- MongoDB specifics ----------------------------------------------------------------------


def _closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


async def test_mongo_constructor_connects_nothing() -> None:
    store = MongoStore(f"mongodb://127.0.0.1:{_closed_port()}/lionmq", timeout_ms=100)
    with pytest.raises(StoreUnavailable):
        await store.ping()  # not opened: a domain error, not a driver one
    await store.close()


async def test_mongo_bad_url_is_a_store_error() -> None:
    store = MongoStore("mongodb://127.0.0.1:notaport/lionmq", timeout_ms=100)
    with pytest.raises(StoreError, match="configuration"):
        await store.open()


async def test_unreachable_mongo_raises_store_unavailable_quickly() -> None:
    store = MongoStore(f"mongodb://127.0.0.1:{_closed_port()}/lionmq", timeout_ms=200)
    started = time.monotonic()
    try:
        with pytest.raises(StoreUnavailable, match="MongoDB unreachable"):
            await store.open()
        with pytest.raises(StoreUnavailable, match="MongoDB unreachable"):
            await store.ping()
        with pytest.raises(StoreUnavailable, match="MongoDB unreachable"):
            await store.insert(CH, [msg(1)], dedup_since=0)
    finally:
        await store.close()
    assert time.monotonic() - started < 5


async def test_mongo_writes_are_journaled_by_default() -> None:
    # A real motor client (mongomock ignores write concerns); open() sets it before failing.
    url = f"mongodb://127.0.0.1:{_closed_port()}/lionmq"
    for store, expected in [
        (MongoStore(url, timeout_ms=100), {"w": "majority", "j": True}),
        (MongoStore(url, write_concern="1", journal=False, timeout_ms=100), {"w": 1, "j": False}),
    ]:
        with pytest.raises(StoreUnavailable):
            await store.open()
        assert store._messages.write_concern.document == expected
        assert store._dedup.write_concern.document == expected
        await store.close()


_WRITES = {"insert_many", "bulk_write", "update_many", "update_one", "delete_many", "replace_one"}


class _Failing:
    """A collection whose `method` ("*": every write) raises `error` (by default as if the
    connection dropped); the rest passes through."""

    def __init__(self, inner: Any, method: str, error: Exception) -> None:
        self._inner = inner
        self._method = method
        self._error = error

    def __getattr__(self, name: str) -> Any:
        if name == self._method or (self._method == "*" and name in _WRITES):

            async def fail(*args: Any, **kwargs: Any) -> Any:
                raise self._error

            return fail
        return getattr(self._inner, name)


def _fail(
    monkeypatch: pytest.MonkeyPatch,
    collection: str,
    method: str,
    error: Exception | None = None,
) -> None:
    def get(self: MongoStore) -> Any:
        failure = error or AutoReconnect("connection reset by peer")
        return _Failing(self._collection(collection), method, failure)

    monkeypatch.setattr(MongoStore, f"_{collection}", property(get))


@pytest.fixture
async def mongo() -> MongoStore:
    store = MongoStore(client=AsyncMongoMockClient(), database="failures")
    await store.open()
    return store


@pytest.mark.parametrize("method", ["insert_many", "update_one"])  # a fresh id, a renewed one
async def test_mongo_insert_undoes_messages_when_dedup_write_fails(
    mongo: MongoStore, monkeypatch: pytest.MonkeyPatch, method: str
) -> None:
    await mongo.insert(CH, [msg(1, dedup_id="old", enqueued_at=100)], dedup_since=0)
    with monkeypatch.context() as patch:
        _fail(patch, "dedup", method)
        with pytest.raises(StoreUnavailable, match="unreachable"):
            await mongo.insert(
                CH, [msg(2, dedup_id="old"), msg(3, dedup_id="new"), msg(4)], dedup_since=NOW
            )
    assert await all_ids(mongo) == [1]
    # The dedup records are as before: "old" still points to 1 (outside the window used
    # above), "new" is unknown.
    again = await mongo.insert(CH, [msg(5, dedup_id="old"), msg(6, dedup_id="new")], 0)
    assert again.ids == [1, 6]


async def test_mongo_move_keeps_source_when_target_insert_fails(
    mongo: MongoStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    await mongo.insert(CH, [msg(1), msg(2)], dedup_since=0)
    with monkeypatch.context() as patch:
        _fail(patch, "messages", "insert_many")
        with pytest.raises(StoreUnavailable):
            await mongo.move(CH, [1], "dlq", [msg(10)])
    assert await all_ids(mongo) == [1, 2]
    assert await all_ids(mongo, "dlq") == []


async def test_mongo_move_retry_tolerates_copies_already_made(mongo: MongoStore) -> None:
    # A crash after the target insert and before the source delete leaves both; the retry
    # must finish the move rather than fail on the copies.
    await mongo.insert(CH, [msg(1), msg(2)], dedup_since=0)
    await mongo.insert("dlq", [msg(10)], dedup_since=0)
    await mongo.move(CH, [1, 2], "dlq", [msg(10), msg(11)])
    assert await all_ids(mongo) == []
    assert await all_ids(mongo, "dlq") == [10, 11]


async def test_mongo_indexes(mongo: MongoStore) -> None:
    messages = await mongo._messages.index_information()
    keys = {tuple(k for k, _ in info["key"]) for info in messages.values()}
    assert {
        ("channel", "_id"),
        ("channel", "leased", "available_at"),
        ("channel", "expires_at"),
    } <= keys
    dedup = await mongo._dedup.index_information()
    unique = [info for info in dedup.values() if info.get("unique")]
    assert [tuple(k for k, _ in info["key"]) for info in unique] == [("channel", "dedup_id")]


async def test_mongo_concurrent_batches_with_one_dedup_id_store_it_once() -> None:
    """Without transactions, the store itself must keep two racing retries from both storing."""
    store = MongoStore(database="race", client=AsyncMongoMockClient())
    await store.open()
    batches = [
        [Message(id=100 + i, body=b"1", headers=None, enqueued_at=1000, dedup_id="same")]
        for i in range(8)
    ]
    results = await asyncio.gather(*(store.insert("c", b, 0) for b in batches))
    assert {r.ids[0] for r in results} == {results[0].ids[0]}
    assert sum(len(r.new) for r in results) == 1
    await store.close()


async def test_stores_sharing_data_agree_on_one_secret(
    make_store: MakeStore, opened: list[Store]
) -> None:
    """Nodes opening one store at once (a failover pair) must sign receipts alike."""
    stores = [make_store() for _ in range(3)]
    for s in stores:
        await s.open()
        opened.append(s)
    secrets = await asyncio.gather(*(s.secret() for s in stores for _ in range(3)))
    assert len(set(secrets)) == 1


# -- ownership specifics --------------------------------------------------------------------


async def test_sqlite_fence_is_read_in_the_commit_groups_own_transaction(
    tmp_path: Path, clock: ManualClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Writes of two shards and a takeover of one, queued as one commit group: the fenced write
    behind the takeover is refused (the epoch is judged in the group's transaction, after the
    take), the other shard's writes around it apply, and each shard's epoch is read once."""
    store = SQLiteStore(str(tmp_path / "f.db"), clock=clock)
    await store.open()
    reads: list[str] = []
    real_read = sqlite_store._stored_epoch

    def counted(conn: sqlite3.Connection, shard: str) -> int | None:
        reads.append(shard)
        return real_read(conn, shard)

    monkeypatch.setattr(sqlite_store, "_stored_epoch", counted)
    try:
        for shard in ("s1", "s2"):
            assert await store.take_lease(shard, "a", "http://a:1", 2_000) is not None
        store.fence({CH: ("s1", 1), "other": ("s2", 1)}.get)
        entered, gate = threading.Event(), threading.Event()

        def hold(conn: sqlite3.Connection) -> None:
            entered.set()
            gate.wait(5)

        async def until(ready: Callable[[], bool], what: str) -> None:
            deadline = time.monotonic() + 5
            while not ready():
                assert time.monotonic() < deadline, what
                await asyncio.sleep(0.001)

        blocker = asyncio.ensure_future(store._write(hold, None))
        # The writer holds the blocker's group: what follows waits, then goes as one group.
        await until(entered.is_set, "the writer never took the blocker")
        before = [store.insert(CH, [msg(1)], 0), store.insert("other", [msg(2)], 0)]
        take = asyncio.ensure_future(store.take_lease("s1", "b", "http://b:1", 2_000, from_epoch=1))
        # The takeover queues when its task first runs; the inserts after it, once it has.
        await until(lambda: store._queue.qsize() == 3, "the takeover queued")
        after = [store.insert(n, [msg(i)], 0) for i, n in enumerate([CH, "other"] * 3, start=3)]
        assert store._queue.qsize() == 9
        reads.clear()  # the blocker's group reads nothing: count the one that follows
        gate.set()
        await blocker
        await asyncio.gather(*before)
        taken = await take
        assert taken is not None and taken.epoch == 2
        outcomes = await asyncio.gather(*after, return_exceptions=True)
        assert all(isinstance(o, Fenced) and "epoch 2" in o.detail for o in outcomes[0::2])
        assert not any(isinstance(o, BaseException) for o in outcomes[1::2]), outcomes
        assert await all_ids(store) == [1]
        assert await all_ids(store, "other") == [2, 4, 6, 8]
        assert sorted(reads) == ["s1", "s2"]  # once per shard for the whole group
    finally:
        await store.close()


async def test_sqlite_a_failing_write_fails_alone_in_its_group(
    tmp_path: Path,
) -> None:
    """A commit group is first applied without savepoints. One insert that fails (an id already
    stored) rolls the group back, which is applied again with a savepoint per run: only that
    insert fails, and the writes around it (inserts of its run, a delete of another) are
    committed; that write alone in a group fails alone too, and the writer goes on."""
    store = SQLiteStore(str(tmp_path / "g.db"))
    await store.open()
    try:
        await store.insert(CH, [msg(1)], 0)
        entered, gate = threading.Event(), threading.Event()

        def hold(conn: sqlite3.Connection) -> None:
            entered.set()
            gate.wait(5)

        blocker = asyncio.ensure_future(store._write(hold, None))
        deadline = time.monotonic() + 5
        while not entered.is_set():
            assert time.monotonic() < deadline, "the writer never took the blocker"
            await asyncio.sleep(0.001)
        group = [store.insert(CH, [msg(i)], 0) for i in (2, 1, 3)]  # 1 is stored already
        group.append(store.delete(CH, [1]))
        gate.set()
        await blocker
        # Bounded: a writer thread that dies on the retry would leave the writes unanswered.
        outcomes = await asyncio.wait_for(asyncio.gather(*group, return_exceptions=True), 10)
        assert isinstance(outcomes[1], StoreError), outcomes
        assert not any(isinstance(o, BaseException) for o in outcomes[::2] + outcomes[3:])
        alone = await asyncio.gather(store.insert(CH, [msg(3)], 0), return_exceptions=True)
        assert isinstance(alone[0], StoreError), alone
        await store.insert(CH, [msg(4)], 0)
        assert await all_ids(store) == [2, 3, 4]
    finally:
        await store.close()


async def test_sqlite_store_time_is_the_hosts_wall_clock(tmp_path: Path) -> None:
    store = SQLiteStore(str(tmp_path / "t.db"))
    await store.open()
    try:
        before = time.time_ns() // 1_000_000
        now = await store.store_time_ms()
        assert before <= now <= time.time_ns() // 1_000_000
        lease = await store.take_lease("s1", "a", "http://a:1", 1_000)
        assert lease is not None and before + 1_000 <= lease.expires_at
    finally:
        await store.close()


@pytest.mark.parametrize(
    "local",
    [
        datetime(2026, 11, 21, 13, 0, 0, 123_456),  # motor's default: naive UTC
        datetime(2026, 11, 21, 13, 0, 0, 123_456, tzinfo=UTC),  # tz_aware clients
    ],
)
async def test_mongo_store_time_is_the_servers_local_time(
    local: datetime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without a clock given, the server's `hello` says what time it is (mongomock has no
    `hello`, so the answer is stood in for here; MONGODB_URL runs the real one below)."""
    client: Any = AsyncMongoMockClient()
    store = MongoStore(client=client, database="clock")
    await store.open()

    async def hello(self: Any, name: str) -> dict[str, Any]:
        assert name == "hello"
        return {"isWritablePrimary": True, "localTime": local}

    monkeypatch.setattr(type(client.admin), "command", hello)
    expected = int(datetime(2026, 11, 21, 13, tzinfo=UTC).timestamp()) * 1000 + 123
    assert await store.store_time_ms() == expected
    lease = await store.take_lease("s1", "a", "http://a:1", 500)
    assert lease is not None and lease.expires_at == expected + 500


async def test_real_mongo_store_time_is_near_the_hosts() -> None:
    url = os.environ.get("MONGODB_URL")
    if not url:
        pytest.skip("MONGODB_URL is not set: no real MongoDB server clock to read")
    store = MongoStore(url, database=f"lionmq_test_{uuid.uuid4().hex[:16]}", timeout_ms=5_000)
    await store.open()
    try:
        assert abs(await store.store_time_ms() - time.time_ns() // 1_000_000) < 60_000
    finally:
        await store.close()


async def test_sqlite_a_channel_keeps_its_key_so_cached_keys_never_go_stale(
    tmp_path: Path, clock: ManualClock
) -> None:
    """Two nodes on one file: while A did not own the channels, B dropped two and made them
    again. Had they been given new keys (each the other's old one), A's cached keys would send
    its writes and reads to the wrong channel; a name keeps its key, so they go to the right
    one, with no fence call or anything else telling A to forget."""
    path = str(tmp_path / "k.db")
    a, b = SQLiteStore(path, clock=clock), SQLiteStore(path, clock=clock)
    await a.open()
    await b.open()
    try:
        await a.insert("x", [msg(1)], 0)  # A caches x and y
        await a.insert("y", [msg(2)], 0)
        await b.drop_channel("y")
        await b.drop_channel("x")
        await b.insert("y", [msg(3)], 0)
        await b.insert("x", [msg(4)], 0)
        await a.insert("x", [msg(5)], 0)
        assert await all_ids(b, "x") == [4, 5]
        assert await all_ids(b, "y") == [3]
        assert await all_ids(a, "y") == [3]  # A's reads, by its cached key
        assert await b.load_channels() == {}  # dropped: no settings left
    finally:
        await a.close()
        await b.close()


async def test_mongo_fenced_write_refused_after_it_when_the_takeover_came_during_it(
    clock: ManualClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without transactions the second epoch read is what refuses a write that a takeover
    overtook: the request fails (nothing acknowledged), saying the write may have landed."""
    mongo = MongoStore(client=AsyncMongoMockClient(), database="late", clock=clock)
    await mongo.open()
    lease = await mongo.take_lease("s1", "a", "http://a:1", 60_000)
    assert lease is not None
    mongo.fence(lambda channel: ("s1", lease.epoch))
    await mongo.insert(CH, [msg(1)], 0)
    inner = mongo._messages

    class TakeoverDuringInsert:
        def __getattr__(self, name: str) -> Any:
            return getattr(inner, name)

        async def insert_many(self, docs: Any, **kwargs: Any) -> Any:
            taken = await mongo.take_lease("s1", "b", "http://b:1", 60_000, from_epoch=1)
            assert taken is not None and taken.epoch == 2
            return await inner.insert_many(docs, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(MongoStore, "_messages", property(lambda self: TakeoverDuringInsert()))
        with pytest.raises(Fenced, match="may have reached the store") as refused:
            await mongo.insert(CH, [msg(2)], 0)
    assert "epoch 1" in refused.value.detail and "epoch 2" in refused.value.detail
    assert not mongo.atomic_fence
    assert await all_ids(mongo) == [1, 2]  # landed: what the docs say rests on timing
    with pytest.raises(Fenced, match="nothing was written"):
        await mongo.insert(CH, [msg(3)], 0)  # refused before it is sent from then on
    assert await all_ids(mongo) == [1, 2]


async def test_mongo_dedup_is_enforced_by_the_index_across_instances(
    clock: ManualClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two MongoStores on one database both read "no record" for the same dedup ids before
    either writes (mongomock runs each call at once, so the test holds them there): the unique
    index gives each id to one, the other drops its copy, and both report the winner's id."""
    client: Any = AsyncMongoMockClient()
    a, b = (MongoStore(client=client, database="dd", clock=clock) for _ in range(2))
    await a.open()
    await b.open()
    await a.insert(CH, [msg(1, dedup_id="old", enqueued_at=5)], dedup_since=0)
    read = {id(a): asyncio.Event(), id(b): asyncio.Event()}
    real = MongoStore._dedup

    class BothReadFirst:
        def __init__(self, store: MongoStore) -> None:
            self.store, self.inner = store, real.fget(store)  # type: ignore[attr-defined]

        def __getattr__(self, name: str) -> Any:
            return getattr(self.inner, name)

        def find(self, *args: Any, **kwargs: Any) -> Any:
            cursor = self.inner.find(*args, **kwargs)
            mine, other = read[id(self.store)], read[id(a if self.store is b else b)]

            async def rows() -> AsyncIterator[Any]:
                async for row in cursor:
                    yield row
                if not mine.is_set():  # the first read of each insert meets the other's
                    mine.set()
                    await asyncio.wait_for(other.wait(), 5)

            return rows()

    monkeypatch.setattr(MongoStore, "_dedup", property(lambda self: BothReadFirst(self)))
    batch_a = [msg(10, dedup_id="x"), msg(11, dedup_id="y"), msg(12), msg(13, dedup_id="old")]
    batch_b = [msg(20, dedup_id="y"), msg(21, dedup_id="x"), msg(22, dedup_id="old", enqueued_at=9)]
    # "old" was used at 5: past the window from 6 on, so both try to take it over.
    ra, rb = await asyncio.gather(a.insert(CH, batch_a, 6), b.insert(CH, batch_b, 6))
    monkeypatch.undo()
    assert ra.ids[0] == rb.ids[1] and ra.ids[1] == rb.ids[0]  # x and y: one message each
    assert ra.ids[3] == rb.ids[2]  # "old": one taker
    stored = await all_ids(a)
    assert len(stored) == 1 + 3 + 1  # msg 1, x, y, "old" once, and 12
    assert set(ra.ids) | set(rb.ids) <= set(stored) and 12 in stored
    assert sorted(m.id for m in ra.new + rb.new) == sorted(set(stored) - {1})
