"""The embedded store: SQLite in WAL mode with synchronous=FULL and group commit.

Every write is a small function queued to one writer task, which runs everything queued so far
in one transaction (each function inside its own savepoint, so one failing write does not sink
its neighbours) and commits once, so concurrent requests share one fsync. Reads use a second
connection, which WAL lets proceed while the writer commits.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sqlite3
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from typing import Any, TypeVar

from app.errors import StoreUnavailable
from app.models import ChannelConfig, ChannelCounts, EnqueueResult, Message

T = TypeVar("T")
_Op = Callable[[sqlite3.Connection], Any]
_Pending = tuple[_Op, "asyncio.Future[Any]"]

# Most writes a single transaction gathers; bounds how long one commit can make others wait.
_GROUP_LIMIT = 1024

_SCHEMA = """
CREATE TABLE IF NOT EXISTS channels (
    name TEXT PRIMARY KEY,
    key INTEGER NOT NULL UNIQUE,
    config TEXT
);
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY,
    ch INTEGER NOT NULL,
    body BLOB NOT NULL,
    headers BLOB,
    enqueued_at INTEGER NOT NULL,
    available_at INTEGER NOT NULL,
    expires_at INTEGER,
    attempt INTEGER NOT NULL,
    leased INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS messages_by_channel ON messages (ch, id);
-- Ready messages (available_at = 0) stay out of these two, so enqueue pays for them only when
-- a message is delayed or has a TTL.
CREATE INDEX IF NOT EXISTS messages_by_due ON messages (ch, available_at) WHERE available_at > 0;
CREATE INDEX IF NOT EXISTS messages_by_expiry ON messages (ch, expires_at)
    WHERE expires_at IS NOT NULL;
CREATE TABLE IF NOT EXISTS dedup (
    ch INTEGER NOT NULL,
    dedup_id TEXT NOT NULL,
    msg_id INTEGER NOT NULL,
    used_at INTEGER NOT NULL,
    PRIMARY KEY (ch, dedup_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS dedup_by_age ON dedup (used_at);
"""

_COLUMNS = "id, body, headers, enqueued_at, available_at, expires_at, attempt, leased"
_INSERT = "INSERT INTO messages VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"


def _message(row: tuple[Any, ...]) -> Message:
    return Message(
        id=row[0],
        body=row[1],
        headers=row[2],
        enqueued_at=row[3],
        available_at=row[4],
        expires_at=row[5],
        attempt=row[6],
        leased=bool(row[7]),
    )


def _row(key: int, m: Message) -> tuple[Any, ...]:
    return (
        m.id,
        key,
        m.body,
        m.headers,
        m.enqueued_at,
        m.available_at,
        m.expires_at,
        m.attempt,
        int(m.leased),
    )


def _marks(n: int) -> str:
    return ",".join("?" * n)


def _unavailable(exc: BaseException) -> StoreUnavailable:
    return StoreUnavailable(f"the embedded store failed: {exc}")


class SQLiteStore:
    kind = "sqlite"

    def __init__(self, path: str) -> None:
        self._path = path
        self._keys: dict[str, int] = {}
        self._pending: list[_Pending] = []
        self._wakeup: asyncio.Event | None = None
        self._writer: asyncio.Task[None] | None = None
        self._committer: ThreadPoolExecutor | None = None
        self._conn: sqlite3.Connection | None = None
        self._read_conn: sqlite3.Connection | None = None

    # -- lifecycle --------------------------------------------------------------------------
    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA busy_timeout=5000")
        return conn

    def _prepare(self) -> tuple[sqlite3.Connection, sqlite3.Connection]:
        os.makedirs(os.path.dirname(os.path.abspath(self._path)), exist_ok=True)
        conn = self._connect()
        conn.executescript(_SCHEMA)
        self._keys = dict(conn.execute("SELECT name, key FROM channels").fetchall())
        return conn, self._connect()

    async def open(self) -> None:
        try:
            self._conn, self._read_conn = await asyncio.to_thread(self._prepare)
        except (OSError, sqlite3.Error) as exc:
            raise _unavailable(exc) from exc
        self._committer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lionmq-commit")
        self._wakeup = asyncio.Event()
        self._writer = asyncio.create_task(self._write_loop(), name="lionmq-sqlite-writer")

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._writer
            self._writer = None
        for _, future in self._pending:
            if not future.done():
                future.set_exception(StoreUnavailable("the embedded store closed"))
        self._pending = []
        if self._committer is not None:
            self._committer.shutdown(wait=True)
            self._committer = None
        for conn in (self._conn, self._read_conn):
            if conn is not None:
                conn.close()
        self._conn = self._read_conn = None

    async def ping(self) -> None:
        await self._read(lambda conn: conn.execute("SELECT 1").fetchone())

    # -- group commit -----------------------------------------------------------------------
    # The statements run on the event loop's thread: each is short, and running them on a
    # thread of their own would hand the GIL back and forth once per row (sqlite3 releases it
    # around every step). Only COMMIT, which waits for the disk, runs on the commit thread;
    # writes queued meanwhile form the next group.
    async def _write_loop(self) -> None:
        assert self._wakeup is not None and self._conn is not None
        loop = asyncio.get_running_loop()
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._pending:
                group = self._pending[:_GROUP_LIMIT]
                del self._pending[:_GROUP_LIMIT]
                outcomes = self._run_group(self._conn, group)
                try:
                    await loop.run_in_executor(self._committer, self._conn.execute, "COMMIT")
                except sqlite3.Error as exc:
                    # The commit itself failed (disk full, I/O error): nothing of it is kept.
                    with contextlib.suppress(sqlite3.Error):
                        self._conn.execute("ROLLBACK")
                    self._forget_new_keys(self._conn)
                    outcomes = [(future, None, exc) for _, future in group]
                _settle(outcomes)

    def _run_group(
        self, conn: sqlite3.Connection, group: list[_Pending]
    ) -> list[tuple[asyncio.Future[Any], Any, BaseException | None]]:
        """Run each write in its own savepoint, so one failing write does not sink the rest."""
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            return [(future, None, exc) for _, future in group]
        outcomes: list[tuple[asyncio.Future[Any], Any, BaseException | None]] = []
        for op, future in group:
            conn.execute("SAVEPOINT op")
            try:
                result = op(conn)
            except Exception as exc:
                conn.execute("ROLLBACK TO op")
                self._forget_new_keys(conn)
                outcomes.append((future, None, exc))
            else:
                outcomes.append((future, result, None))
            conn.execute("RELEASE op")
        return outcomes

    def _forget_new_keys(self, conn: sqlite3.Connection) -> None:
        """After a rollback, channel keys made in that transaction no longer exist."""
        with contextlib.suppress(sqlite3.Error):
            self._keys = dict(conn.execute("SELECT name, key FROM channels").fetchall())

    async def _write(self, op: Callable[[sqlite3.Connection], T]) -> T:
        if self._writer is None or self._wakeup is None:
            raise StoreUnavailable("the embedded store is not open")
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._pending.append((op, future))
        self._wakeup.set()
        try:
            return await future
        except sqlite3.Error as exc:
            raise _unavailable(exc) from exc

    async def _read(self, op: Callable[[sqlite3.Connection], T]) -> T:
        """Reads see committed data only (their own WAL snapshot) and are short: run inline."""
        if self._read_conn is None:
            raise StoreUnavailable("the embedded store is not open")
        try:
            return op(self._read_conn)
        except sqlite3.Error as exc:
            raise _unavailable(exc) from exc

    def _key(self, conn: sqlite3.Connection, channel: str) -> int:
        """The channel's integer key, made on first use (in the writer's transaction)."""
        key = self._keys.get(channel)
        if key is None:
            row = conn.execute("SELECT key FROM channels WHERE name = ?", (channel,)).fetchone()
            if row is None:
                (key,) = conn.execute("SELECT COALESCE(MAX(key), 0) + 1 FROM channels").fetchone()
                conn.execute("INSERT INTO channels (name, key) VALUES (?, ?)", (channel, key))
            else:
                key = row[0]
            self._keys[channel] = key
        return key

    def _read_key(self, conn: sqlite3.Connection, channel: str) -> int | None:
        key = self._keys.get(channel)
        if key is None:
            row = conn.execute("SELECT key FROM channels WHERE name = ?", (channel,)).fetchone()
            key = row[0] if row else None
        return key

    # -- channels ---------------------------------------------------------------------------
    async def load_channels(self) -> dict[str, ChannelConfig]:
        rows = await self._read(
            lambda conn: conn.execute(
                "SELECT name, config FROM channels WHERE config IS NOT NULL"
            ).fetchall()
        )
        return {name: ChannelConfig(**json.loads(config)) for name, config in rows}

    async def save_channel(self, name: str, config: ChannelConfig) -> None:
        encoded = json.dumps(asdict(config))

        def op(conn: sqlite3.Connection) -> None:
            key = self._key(conn, name)
            conn.execute("UPDATE channels SET config = ? WHERE key = ?", (encoded, key))

        await self._write(op)

    async def drop_channel(self, name: str) -> None:
        def op(conn: sqlite3.Connection) -> None:
            key = self._read_key(conn, name)
            if key is None:
                return
            conn.execute("DELETE FROM messages WHERE ch = ?", (key,))
            conn.execute("DELETE FROM dedup WHERE ch = ?", (key,))
            conn.execute("DELETE FROM channels WHERE key = ?", (key,))
            self._keys.pop(name, None)

        await self._write(op)

    # -- writes -----------------------------------------------------------------------------
    async def insert(
        self, channel: str, messages: Sequence[Message], dedup_since: int
    ) -> EnqueueResult:
        def op(conn: sqlite3.Connection) -> EnqueueResult:
            key = self._key(conn, channel)
            wanted = [m.dedup_id for m in messages if m.dedup_id is not None]
            if not wanted:
                conn.executemany(_INSERT, [_row(key, m) for m in messages])
                return EnqueueResult(ids=[m.id for m in messages], new=list(messages))
            # One query for the whole batch, not one per message.
            known: dict[str, int] = dict(
                conn.execute(
                    "SELECT dedup_id, msg_id FROM dedup WHERE ch = ? AND used_at >= ?"
                    f" AND dedup_id IN ({_marks(len(wanted))})",
                    (key, dedup_since, *wanted),
                ).fetchall()
            )
            ids: list[int] = []
            new: list[Message] = []
            dedup_rows: list[tuple[int, str, int, int]] = []
            for m in messages:
                if m.dedup_id is not None:
                    first = known.get(m.dedup_id)
                    if first is not None:
                        ids.append(first)
                        continue
                    known[m.dedup_id] = m.id
                    dedup_rows.append((key, m.dedup_id, m.id, m.enqueued_at))
                ids.append(m.id)
                new.append(m)
            conn.executemany(_INSERT, [_row(key, m) for m in new])
            conn.executemany("INSERT OR REPLACE INTO dedup VALUES (?, ?, ?, ?)", dedup_rows)
            return EnqueueResult(ids=ids, new=new)

        return await self._write(op)

    async def lease(self, channel: str, leases: Sequence[tuple[int, int]], deadline: int) -> None:
        await self._write(
            lambda conn: conn.executemany(
                "UPDATE messages SET leased = 1, attempt = ?, available_at = ? WHERE id = ?",
                [(attempt, deadline, msg_id) for msg_id, attempt in leases],
            )
        )

    async def release(self, channel: str, ids: Sequence[int], available_at: int) -> None:
        await self._update_many(
            "UPDATE messages SET leased = 0, available_at = ? WHERE id IN ({})", available_at, ids
        )

    async def extend(self, channel: str, ids: Sequence[int], deadline: int) -> None:
        await self._update_many(
            "UPDATE messages SET available_at = ? WHERE leased = 1 AND id IN ({})", deadline, ids
        )

    async def delete(self, channel: str, ids: Sequence[int]) -> None:
        await self._write(lambda conn: _delete_ids(conn, ids))

    async def _update_many(self, sql: str, value: int, ids: Sequence[int]) -> None:
        await self._write(
            lambda conn: conn.execute(sql.format(_marks(len(ids))), (value, *ids)) if ids else None
        )

    async def move(
        self, channel: str, ids: Sequence[int], target: str | None, moved: Sequence[Message]
    ) -> None:
        def op(conn: sqlite3.Connection) -> None:
            _delete_ids(conn, ids)
            if target is not None and moved:
                key = self._key(conn, target)
                conn.executemany(_INSERT, [_row(key, m) for m in moved])

        await self._write(op)

    async def purge(self, channel: str) -> int:
        def op(conn: sqlite3.Connection) -> int:
            key = self._read_key(conn, channel)
            if key is None:
                return 0
            return conn.execute("DELETE FROM messages WHERE ch = ?", (key,)).rowcount

        return await self._write(op)

    async def promote_due(self, channel: str, now: int, limit: int) -> list[Message]:
        def op(conn: sqlite3.Connection) -> list[Message]:
            key = self._read_key(conn, channel)
            if key is None:
                return []
            rows = conn.execute(
                f"SELECT {_COLUMNS} FROM messages WHERE ch = ? AND leased = 0"
                " AND available_at > 0 AND available_at <= ? ORDER BY available_at, id LIMIT ?",
                (key, now, limit),
            ).fetchall()
            if not rows:
                return []
            due = sorted((_message(r) for r in rows), key=lambda m: m.id)
            ids = [m.id for m in due]
            conn.execute(
                f"UPDATE messages SET available_at = 0 WHERE id IN ({_marks(len(ids))})", ids
            )
            for m in due:
                m.available_at = 0
            return due

        return await self._write(op)

    async def prune_dedup(self, before: int) -> int:
        return await self._write(
            lambda conn: conn.execute("DELETE FROM dedup WHERE used_at < ?", (before,)).rowcount
        )

    # -- reads ------------------------------------------------------------------------------
    async def _select(self, channel: str, where: str, params: tuple[Any, ...]) -> list[Message]:
        def op(conn: sqlite3.Connection) -> list[Message]:
            key = self._read_key(conn, channel)
            if key is None:
                return []
            rows = conn.execute(
                f"SELECT {_COLUMNS} FROM messages WHERE ch = ? AND {where}", (key, *params)
            ).fetchall()
            return [_message(r) for r in rows]

        return await self._read(op)

    async def page_ready(self, channel: str, after_id: int, now: int, limit: int) -> list[Message]:
        return await self._select(
            channel, "id > ? AND available_at <= ? ORDER BY id LIMIT ?", (after_id, now, limit)
        )

    async def expired(self, channel: str, now: int, limit: int) -> list[Message]:
        return await self._select(
            channel,
            "expires_at <= ? AND NOT (leased = 1 AND available_at > ?) ORDER BY id LIMIT ?",
            (now, now, limit),
        )

    async def leased(self, channel: str, now: int) -> list[Message]:
        return await self._select(channel, "leased = 1 AND available_at > ? ORDER BY id", (now,))

    async def _scalar(self, channel: str, sql: str, params: tuple[Any, ...]) -> Any:
        def op(conn: sqlite3.Connection) -> Any:
            key = self._read_key(conn, channel)
            if key is None:
                return None
            return conn.execute(sql, (key, *params)).fetchone()[0]

        return await self._read(op)

    async def counts(self, channel: str, now: int) -> ChannelCounts:
        total = await self._scalar(channel, "SELECT COUNT(*) FROM messages WHERE ch = ?", ())
        delayed = await self._scalar(
            channel,
            "SELECT COUNT(*) FROM messages WHERE ch = ? AND available_at > ? AND leased = 0",
            (now,),
        )
        return ChannelCounts(
            total=total or 0,
            delayed=delayed or 0,
            next_due=await self.next_due(channel),
            next_expiry=await self.next_expiry(channel, now),
        )

    async def next_due(self, channel: str) -> int | None:
        value: int | None = await self._scalar(
            channel,
            "SELECT MIN(available_at) FROM messages WHERE ch = ? AND available_at > 0"
            " AND leased = 0",
            (),
        )
        return value

    async def next_expiry(self, channel: str, now: int) -> int | None:
        value: int | None = await self._scalar(
            channel, "SELECT MIN(expires_at) FROM messages WHERE ch = ? AND expires_at > ?", (now,)
        )
        return value

    async def max_id(self) -> int:
        value: int | None = await self._read(
            lambda conn: conn.execute("SELECT MAX(id) FROM messages").fetchone()[0]
        )
        return value or 0


def _delete_ids(conn: sqlite3.Connection, ids: Sequence[int]) -> None:
    if ids:
        conn.execute(f"DELETE FROM messages WHERE id IN ({_marks(len(ids))})", list(ids))


def _settle(outcomes: list[tuple[asyncio.Future[Any], Any, BaseException | None]]) -> None:
    for future, result, error in outcomes:
        if future.cancelled():
            continue
        if error is None:
            future.set_result(result)
        else:
            future.set_exception(error)
