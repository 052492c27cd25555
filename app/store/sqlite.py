"""The embedded store: SQLite in WAL mode with synchronous=FULL and group commit.

Every write is a small function queued to one writer thread, which runs everything queued so far
in one transaction and commits once, so concurrent requests share one fsync. Should one write
fail, the group is rolled back and run again with each kind of write in a savepoint of its own, so
that one failing write does not sink its neighbours (every statement hands the GIL over and back,
which the event loop waits for: the usual group, where nothing fails, pays for no savepoint).
Reads use a second connection, which WAL lets proceed while the writer commits.

Node processes on one host share the file (a local cluster, the tests, a second node started on
the same store by accident, which must wait as a standby rather than serve the same messages):
the default `unix` VFS keeps the WAL index in the `-shm` file, memory-mapped by every process.
Its writer waits for another process's commit group through SQLite's busy handler for at most
_WRITER_BUSY_MS, in its own thread; then the group fails with SQLITE_BUSY, a `StoreUnavailable`
(503 with Retry-After), never a 500 and never a hang. Reads never wait for writers in WAL mode;
the rare wait (another process recovering the WAL) is cut short at _READER_BUSY_MS, as they run
on the event loop. `exclusive=True` (SQLITE_EXCLUSIVE) opens through the `unix-excl` VFS
instead: the WAL index in heap memory and an exclusive lock on the file, one process only.

Why shared by default, measured on this machine (2 shared cores, ext4; medians of 6 interleaved
runs of 4,000 one-message inserts from 64 concurrent producers, then 3,000 reads of a 10-message
page): inserts 16,300/s exclusive vs 17,100/s shared (the fsync of each group dominates, and the
runs spread from 11,600 to 34,500/s either way: no difference to see); a page read 27 us vs
36 us (shared takes a lock on a read mark and checks the -shm file: ~9 us a read, per page, not
per message). Two processes inserting into one file at once: no SQLITE_BUSY, 0.6 s for 2 x 3,000
inserts, slowest insert 0.10-0.12 s. Shared costs little, and it is what a cluster on one host and
the standby rule need; exclusive stays for a single node that wants what follows.

Two failures of the file system under a running node are handled here:

- A write to the mmapped WAL index once its file turned read-only (ext4 `errors=remount-ro`) or
  immutable kills the whole process with SIGBUS. A shared store therefore checks, with one
  access(), that the -shm file can be written before each commit group and before each read (a
  read may write its read mark there), and answers 503 when not. The database and WAL files are
  written with pwrite(), which fails with an error there (503), not a signal: no check needed.
  What rests on timing: a file system that turns read-only in the microseconds between that
  check and SQLite's write still kills the process (its backup then takes over; nothing
  committed is lost). The `unix-excl` VFS has no mapping and no such window: there the write
  fails with an error and the node answers 503.
- The writer checks, before and after each group's COMMIT, that the store's path still names
  the files it has open (same device and inode). A file deleted or moved under the node would
  take every later write with it at the next restart, so from then on every write fails with
  503 and `ping` reports why, until the path names the same files again (the file moved back,
  a hard link restored); otherwise restart the node. A group committed while its file had no
  path is never acknowledged.

Ownership (see `app.store.base`): shard leases and the topology are rows written by the same
writer, each a compare-and-set inside its own BEGIN IMMEDIATE transaction, so of racing takers
exactly one wins, whatever connection or process they come from. Expiry is judged by this host's
wall clock (or the `clock` given), read inside that transaction. A fenced write carries the
(shard, epoch) its channel resolved to when it was called, and is checked inside the transaction
of its commit group, before COMMIT: one indexed SELECT of each shard's epoch per group (a take in
the group records the epoch it made), under the write lock, so no other writer can move an epoch
between the check and the commit. A deposed owner's write is refused, never applied; writes of
shards still owned in the same group go ahead. Unfenced writes read nothing.

Channel keys (the integer a channel's rows carry) are made under the write lock and kept by
their name for good, even once the channel is dropped, so a key another process cached never
comes to name another channel. Dedup ids are claimed by the (channel, dedup id) primary key
under the write lock, so the same id enqueued by two processes at once stores one message.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import queue
import sqlite3
import threading
import time
import urllib.parse
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any, TypeVar

import msgspec

from app.clock import Clock, SystemClock
from app.errors import StoreError, StoreTooLarge, StoreUnavailable
from app.models import (
    DEAD_LETTER_HEADROOM,
    HISTORY_LIMIT,
    ChannelConfig,
    ChannelCounts,
    EnqueueResult,
    Event,
    Message,
)
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

T = TypeVar("T")


@dataclass(slots=True)
class _Insert:
    channel: str
    messages: Sequence[Message]
    dedup_since: int
    events: Sequence[Event] | None = None


@dataclass(slots=True)
class _Delete:
    ids: Sequence[int]


@dataclass(slots=True)
class _Lease:
    leases: Sequence[tuple[int, int]]  # (id, attempt)
    deadline: int
    events: Sequence[Event] | None = None


# A write is a function of the connection, or one of the kinds the hot path sends most, which
# the writer merges with their neighbours into one statement for the whole group.
_Op = Callable[[sqlite3.Connection], Any] | _Insert | _Delete | _Lease
_MERGED = (_Insert, _Delete, _Lease)
# (shard, epoch) a write is fenced at, or None.
_Fence = tuple[str, int] | None
_Pending = tuple[_Op, "asyncio.Future[Any]", _Fence]
_Outcome = tuple["asyncio.Future[Any]", Any, BaseException | None]

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
-- expires_at is on the store's clock; 0 once released.
CREATE TABLE IF NOT EXISTS shard_leases (
    shard TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    owner_url TEXT NOT NULL,
    epoch INTEGER NOT NULL,
    expires_at INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS topology (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    version INTEGER NOT NULL,
    doc BLOB NOT NULL
);
-- seen_at is on the store's clock.
CREATE TABLE IF NOT EXISTS members (
    url TEXT PRIMARY KEY,
    seen_at INTEGER NOT NULL,
    doc BLOB NOT NULL
) WITHOUT ROWID;
"""
_LEASE_COLUMNS = "shard, owner, owner_url, epoch, expires_at"

_COLUMNS = "id, body, headers, enqueued_at, available_at, expires_at, attempt, leased"
# Columns named: a store that traces has one more, `history` (see `_with_history`).
_STORED = "id, ch, body, headers, enqueued_at, available_at, expires_at, attempt, leased"
_INSERT_MESSAGES = f"INSERT INTO messages ({_STORED})"
_INSERT_TRACED = f"INSERT INTO messages ({_STORED}, history)"
# SQLite binds at most 32766 values in one statement.
_MAX_VALUES = 32_000


@functools.lru_cache(maxsize=256)
def _values(head: str, width: int, rows: int) -> str:
    """`head VALUES (?, …), (?, …)…`: one statement (one step) for many rows."""
    row = "(" + ",".join("?" * width) + ")"
    return f"{head} VALUES " + ",".join([row] * rows)


def _insert_rows(conn: sqlite3.Connection, head: str, width: int, values: list[Any]) -> None:
    if not values:
        return
    """Insert flattened rows of `width` values, in as few statements as the limit allows."""
    step = _MAX_VALUES // width * width
    for start in range(0, len(values), step):
        chunk = values[start : start + step]
        conn.execute(_values(head, width, len(chunk) // width), chunk)


def _message_values(key: int, messages: Sequence[Message]) -> list[Any]:
    values: list[Any] = []
    for m in messages:
        values += (
            m.id,
            key,
            m.body,
            m.headers,
            m.enqueued_at,
            m.available_at,
            m.expires_at,
            m.attempt,
            m.leased,
        )
    return values


def _traced_values(key: int, messages: Sequence[Message], histories: Sequence[str]) -> list[Any]:
    """`_message_values` with each message's history (JSON text) as a tenth column."""
    values: list[Any] = []
    for m, history in zip(messages, histories, strict=True):
        values += (
            m.id,
            key,
            m.body,
            m.headers,
            m.enqueued_at,
            m.available_at,
            m.expires_at,
            m.attempt,
            m.leased,
            history,
        )
    return values


_event_encoder = msgspec.json.Encoder()
_history_decoder = msgspec.json.Decoder(list[Event])


def _encoded(events: Sequence[Event]) -> list[str]:
    """Each event as JSON text; an event object repeated (one per batch) is encoded once."""
    done: dict[int, str] = {}
    out: list[str] = []
    for event in events:
        text = done.get(id(event))
        if text is None:
            text = done[id(event)] = _event_encoder.encode(event).decode()
        out.append(text)
    return out


def _carried(history: str | None, event: str) -> str:
    """A copy's history: its original's (`history`, JSON text or None), bounded, plus `event`."""
    if not history or history == "[]":
        return f"[{event}]"
    kept = _history_decoder.decode(history)[-(HISTORY_LIMIT - 1) :]
    return _event_encoder.encode(kept).decode()[:-1] + f",{event}]"


# Append one event to each message's history, keeping its last HISTORY_LIMIT; rows of (id, JSON
# event text). A message no longer stored is skipped (the UPDATE finds no row).
_APPEND = (
    "UPDATE messages SET history = CASE"
    " WHEN history IS NULL THEN json_array(json(v.column2))"
    f" WHEN json_array_length(history) >= {HISTORY_LIMIT}"
    " THEN json_insert(json_remove(history, '$[0]'), '$[#]', json(v.column2))"
    " ELSE json_insert(history, '$[#]', json(v.column2)) END"
    " FROM ({}) AS v WHERE messages.id = v.column1"
)


def _started(events: Sequence[Event]) -> list[str]:
    """A new message's history (JSON text): its one event."""
    return [f"[{text}]" for text in _encoded(events)]


def _append_history(conn: sqlite3.Connection, rows: list[Any]) -> None:
    step = _MAX_VALUES // 2 * 2
    for start in range(0, len(rows), step):
        chunk = rows[start : start + step]
        conn.execute(_APPEND.format(_values("", 2, len(chunk) // 2).strip()), chunk)


def _history_rows(ids: Sequence[int], events: Sequence[Event]) -> list[Any]:
    rows: list[Any] = []
    for msg_id, text in zip(ids, _encoded(events), strict=True):
        rows += (msg_id, text)
    return rows


def _message(row: tuple[Any, ...]) -> Message:
    return _messages([row])[0]


def _messages(rows: list[tuple[Any, ...]]) -> list[Message]:
    """Rows of `_COLUMNS` as messages. Positional, unpacked in one comprehension: a page of
    5,000 is built in a third of the time a call with keywords per row takes."""
    return [
        Message(id, body, headers, enqueued_at, available_at, expires_at, attempt, leased == 1)
        for id, body, headers, enqueued_at, available_at, expires_at, attempt, leased in rows
    ]


def _applied(run: Sequence[_Pending], results: Sequence[Any]) -> list[_Outcome]:
    """The outcomes of a run of writes that all took effect, each with its result."""
    return [(future, result, None) for (_, future, _), result in zip(run, results, strict=True)]


def _marks(n: int) -> str:
    return ",".join("?" * n)


# SQLite holds a row of at most SQLITE_MAX_LENGTH (10**9) bytes; a message also needs room for
# its other columns.
MAX_MESSAGE_BYTES = 1_000_000_000 - 64 * 1024

# Primary result codes a retry can fix: the disk is full or failing, the file read-only, another
# process holds the lock. Anything else (a constraint, a misuse, corruption) is for good.
_TRANSIENT = {
    sqlite3.SQLITE_BUSY,
    sqlite3.SQLITE_LOCKED,
    sqlite3.SQLITE_NOMEM,
    sqlite3.SQLITE_READONLY,
    sqlite3.SQLITE_INTERRUPT,
    sqlite3.SQLITE_IOERR,
    sqlite3.SQLITE_FULL,
    sqlite3.SQLITE_CANTOPEN,
    sqlite3.SQLITE_PROTOCOL,
}


# While writes fail, `ping` tries a tiny one of its own at most this often: a node with no traffic
# learns that space (or write access) is back, and an idle one with a full disk stays unready.
_PROBE_EVERY_S = 0.5
_PROBE_BYTES = 64 * 1024

# How long a connection waits for another's lock before SQLITE_BUSY (StoreUnavailable, 503).
# The writer waits in its own thread for other processes' commit groups (each holds the lock
# for one transaction); reads run on the event loop and, in WAL mode, wait only in rare cases
# (another process recovering the WAL), so they give up soon rather than stall the node.
_WRITER_BUSY_MS = 2_000
_READER_BUSY_MS = 100

# The meta table (node secret, write probe), made on use: a store from before it gains it.
_META = "CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value BLOB NOT NULL)"


def _translate(exc: BaseException) -> StoreError:
    """A driver error as the domain's: transient ones become `StoreUnavailable`."""
    if isinstance(exc, StoreError):
        return exc
    code = getattr(exc, "sqlite_errorcode", None)
    name = getattr(exc, "sqlite_errorname", type(exc).__name__)
    if isinstance(exc, OSError) or (code is not None and code & 0xFF in _TRANSIENT):
        return StoreUnavailable(f"the embedded store failed: {exc} ({name})")
    if code is not None and code & 0xFF == sqlite3.SQLITE_TOOBIG:
        return StoreTooLarge(f"the embedded store cannot hold this message: {exc}")
    return StoreError(f"the embedded store refused the operation: {exc} ({name})")


class SQLiteStore:
    kind = "sqlite"
    atomic_fence = True

    def __init__(
        self,
        path: str,
        *,
        max_message_bytes: int = MAX_MESSAGE_BYTES,
        clock: Clock | None = None,
        exclusive: bool = False,
    ) -> None:
        """`max_message_bytes` may lower the store's limit (tests use a small one); `clock`
        replaces the host's wall clock as the store's clock (tests move it); `exclusive` keeps
        every other process out of the file (see the module docstring)."""
        self._path = path
        self._exclusive = exclusive
        self._where = os.path.abspath(path)  # for messages, as the node started
        self._clock: Clock = clock or SystemClock()
        self._resolve: Resolve | None = None
        # Stored epoch by shard, read once per commit group by the writer thread (see
        # `_admitted`); a take in the group writes its new epoch here.
        self._epochs: dict[str, int | None] = {}
        self.max_message_bytes = min(max_message_bytes, MAX_MESSAGE_BYTES)
        # (path, st_dev, st_ino) of the database, its WAL and (shared) its WAL index, as opened.
        self._files: list[tuple[str, int, int]] = []
        # Shared: the -shm file of `_files`, the one SQLite maps into memory (exclusive: none).
        self._mapped: list[tuple[str, int, int]] = []
        self._keys: dict[str, int] = {}
        # Whether the messages table has its `history` column (writer thread; see
        # `_with_history`).
        self._history = False
        self._queue: queue.SimpleQueue[_Pending | None] = queue.SimpleQueue()
        self._writer: threading.Thread | None = None
        self._read_conn: sqlite3.Connection | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # The last commit group's transient failure (why, time.monotonic() of it); set and
        # cleared by the writer thread (one reference assignment), read by `ping`.
        self._failure: tuple[str, float] | None = None
        self._probe: asyncio.Future[None] | None = None
        self._probed_at = 0.0

    # -- lifecycle --------------------------------------------------------------------------
    def _connect(self, busy_ms: int) -> sqlite3.Connection:
        # unix-excl: the WAL index in heap memory, one process; unix: in the shared, mmapped
        # -shm file (see above).
        vfs = "unix-excl" if self._exclusive else "unix"
        uri = f"file:{urllib.parse.quote(os.path.abspath(self._path))}?vfs={vfs}"
        conn = sqlite3.connect(
            uri, uri=True, isolation_level=None, check_same_thread=False, timeout=busy_ms / 1000
        )
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        return conn

    def _prepare(self) -> tuple[sqlite3.Connection, sqlite3.Connection]:
        os.makedirs(os.path.dirname(os.path.abspath(self._path)), exist_ok=True)
        conn = self._connect(_WRITER_BUSY_MS)
        conn.executescript(_SCHEMA)
        self._keys = dict(conn.execute("SELECT name, key FROM channels").fetchall())
        reader = self._connect(_READER_BUSY_MS)
        reader.execute("SELECT 1 FROM channels LIMIT 1").fetchall()  # maps the WAL index
        self._files = []
        suffixes = ("", "-wal") if self._exclusive else ("", "-wal", "-shm")
        for path in (self._path + suffix for suffix in suffixes):
            st = os.stat(path)
            self._files.append((path, st.st_dev, st.st_ino))
        self._mapped = self._files[2:]
        return conn, reader

    async def open(self) -> None:
        self._loop = asyncio.get_running_loop()
        try:
            conn, self._read_conn = await asyncio.to_thread(self._prepare)
        except (OSError, sqlite3.Error) as exc:
            raise _translate(exc) from exc
        self._writer = threading.Thread(
            target=self._write_loop, args=(conn,), name="lionmq-sqlite-writer", daemon=True
        )
        self._writer.start()

    async def close(self) -> None:
        if self._writer is not None:
            self._queue.put(None)
            await asyncio.to_thread(self._writer.join)
            self._writer = None
        if self._read_conn is not None:
            self._read_conn.close()
            self._read_conn = None

    async def ping(self) -> None:
        await self._read(lambda conn: conn.execute("SELECT 1").fetchone())
        problem = self._lost() or self._unwritable() or await self._write_failure()
        if problem is not None:
            raise StoreUnavailable(problem)

    async def _write_failure(self) -> str | None:
        """Why writes are failing (the last commit group failed, e.g. the disk is full), or
        None. Reads cannot tell: while writes fail, a tiny write of our own (shared by
        concurrent pings, one per _PROBE_EVERY_S) finds out whether they work again."""
        failure = self._failure
        if failure is None:
            return None
        if self._probe is None and time.monotonic() - self._probed_at >= _PROBE_EVERY_S:
            self._probed_at = time.monotonic()
            self._probe = asyncio.ensure_future(self._write(self._probe_op, None))
        if self._probe is not None:
            probe = self._probe
            try:
                await asyncio.shield(probe)
            except StoreUnavailable as exc:
                # Failed alone (its group may have committed without it): still failing.
                self._failure = self._failure or (exc.detail, failure[1])
            finally:
                if self._probe is probe and probe.done():
                    self._probe = None
        failure = self._failure
        if failure is None:
            return None
        detail, since = failure
        return (
            f"writes to the store {self._where} are failing (for"
            f" {time.monotonic() - since:.1f} s): {detail}"
        )

    def _probe_op(self, conn: sqlite3.Connection) -> None:
        conn.execute(_META)
        # Room for a batch, written and given back: a write that fits in the last free corner
        # of the disk would say "ready" while every real batch fails.
        conn.execute(
            "INSERT OR REPLACE INTO meta VALUES ('write_probe', randomblob(?))", (_PROBE_BYTES,)
        )
        conn.execute("DELETE FROM meta WHERE name = 'write_probe'")

    def _lost(self) -> str | None:
        """Why the store's path no longer names the files it has open, or None. Two stats: the
        database and its WAL, what a restart reads (the -shm index is rebuilt from them)."""
        for path, dev, ino in self._files[:2]:
            try:
                st = os.stat(path)
            except OSError as exc:
                found = f"is gone ({exc.strerror})"
            else:
                if (st.st_dev, st.st_ino) == (dev, ino):
                    continue
                found = "names another file now"
            return (
                f"the store file {os.path.abspath(path)} {found}: it was deleted or moved while"
                " open, and writes to it would be lost at the next restart; put the same file"
                " back or restart the node"
            )
        return None

    def _guard(self, files: Sequence[tuple[str, int, int]]) -> str | None:
        """Shared: why `files` cannot be written, checked before SQLite touches the mmapped WAL
        index (a write to it once its file is read-only or immutable is a SIGBUS that kills the
        process, where a 503 is due). One access() a file: the -shm file, before each commit
        group and each read. Exclusive: no mapping, so None."""
        return None if self._exclusive else self._unwritable(files)

    def _unwritable(self, files: Sequence[tuple[str, int, int]] | None = None) -> str | None:
        """Why the store's files (or `files`) cannot be written (read-only file system,
        immutable), or None."""
        for path, _, _ in self._files if files is None else files:
            # A file that is gone is `_lost`'s to report (and its mapping still writable).
            if not os.access(path, os.W_OK) and os.path.exists(path):
                return (
                    f"the store file {os.path.abspath(path)} cannot be written (read-only file"
                    " system, immutable file or permissions); writes answer 503 until it can"
                )
        return None

    # -- group commit -----------------------------------------------------------------------
    # The writer thread runs each group's statements and its COMMIT while the event loop goes
    # on serving requests. sqlite3 lets go of the GIL around every step of a statement, so
    # writes use one multi-row statement per batch rather than executemany: one hand-over of
    # the GIL per batch, not one per row.
    def _write_loop(self, conn: sqlite3.Connection) -> None:
        stopping = False
        while not stopping:
            item = self._queue.get()
            if item is None:
                break
            group = [item]
            while len(group) < _GROUP_LIMIT:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stopping = True
                    break
                group.append(item)
            outcomes = self._commit_group(conn, group)
            assert self._loop is not None
            with contextlib.suppress(RuntimeError):  # the loop closed under us at shutdown
                self._loop.call_soon_threadsafe(_settle, outcomes)
        conn.close()

    def _commit_group(self, conn: sqlite3.Connection, group: list[_Pending]) -> list[_Outcome]:
        outcomes: list[_Outcome] = []
        lost: str | None = None
        unwritable = self._guard(self._mapped)
        if unwritable is not None:
            if self._failure is None:
                self._failure = (unwritable, time.monotonic())
            return [(future, None, StoreUnavailable(unwritable)) for _, future, _ in group]
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                outcomes = self._apply_group(conn, group, careful=False)
            except Exception:
                if not conn.in_transaction:
                    # SQLite rolled the whole transaction back itself (a full disk, an I/O
                    # error): the group fails as one, with this error.
                    raise
                # A write failed: the group again from the start, each run in a savepoint
                # (the rare path), so that only the faulty write fails.
                conn.execute("ROLLBACK")
                self._forget_new_keys(conn)
                conn.execute("BEGIN IMMEDIATE")
                outcomes = self._apply_group(conn, group, careful=True)
            lost = self._lost()
            if lost is None:
                conn.execute("COMMIT")
                # Only a data write or the probe says writes work again: a lease renewal or a
                # member report (rows rewritten in place) commits on a full disk too.
                if any(fence is not None or op == self._probe_op for op, _, fence in group):
                    self._failure = None
        except sqlite3.Error as exc:
            # The commit itself failed (disk full, I/O error): nothing of the group is kept.
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            self._forget_new_keys(conn)
            error = _translate(exc)
            if isinstance(error, StoreUnavailable) and self._failure is None:
                self._failure = (error.detail, time.monotonic())  # for ping: since when
            return [(future, None, error) for _, future, _ in group]
        if lost is not None:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            self._forget_new_keys(conn)
        else:
            # Unlinked between the check and the COMMIT: the group went to a file no path
            # names, so it must not be acknowledged.
            lost = self._lost()
        if lost is not None:
            return [(future, None, StoreUnavailable(lost)) for _, future, _ in group]
        return outcomes

    def _admitted(
        self, conn: sqlite3.Connection, pending: _Pending, outcomes: list[_Outcome]
    ) -> bool:
        """Whether a fenced write's epoch is still its shard's stored one; if not, its refusal
        joins `outcomes`. Under the group's write lock no other writer can move an epoch before
        COMMIT, and only a take or a transfer in this group can (each updates `_epochs`), so
        each shard's epoch is read at most once per group."""
        _, future, fence = pending
        assert fence is not None
        shard, epoch = fence
        try:
            stored = self._epochs[shard]
        except KeyError:
            stored = self._epochs[shard] = _stored_epoch(conn, shard)
        if stored == epoch:
            return True
        outcomes.append((future, None, fenced(shard, epoch, stored)))
        return False

    def _apply_group(
        self, conn: sqlite3.Connection, group: list[_Pending], *, careful: bool
    ) -> list[_Outcome]:
        """Apply the group's writes in the open transaction. Neighbours of one mergeable kind go
        as one run, whatever shard each is fenced at: each is judged on its own first.

        Not `careful` (the first try): no savepoints, two statements a run fewer (each a
        hand-over of the GIL, which the event loop waits for), and a failing write raises.
        `careful`: each run in a savepoint (`_apply_run`), so only a faulty write fails."""
        self._epochs = {}
        outcomes: list[_Outcome] = []
        i = 0
        while i < len(group):
            kind = type(group[i][0])
            j = i + 1
            if kind in _MERGED:
                while j < len(group) and type(group[j][0]) is kind:
                    j += 1
            run = [p for p in group[i:j] if p[2] is None or self._admitted(conn, p, outcomes)]
            if run and careful:
                outcomes += self._apply_run(conn, run)
            elif run:
                outcomes += _applied(run, self._apply(conn, [op for op, _, _ in run]))
            i = j
        return outcomes

    def _apply_run(self, conn: sqlite3.Connection, run: list[_Pending]) -> list[_Outcome]:
        """Apply writes of one kind together, in a savepoint; should that fail, apply them one
        by one, each in its own savepoint, so only the faulty one fails."""
        conn.execute("SAVEPOINT run")
        try:
            results = self._apply(conn, [op for op, _, _ in run])
        except Exception as exc:
            if not conn.in_transaction:
                # SQLite rolled the whole transaction back itself (a full disk, an I/O error):
                # the group fails as one, with this error rather than "no such savepoint".
                raise
            conn.execute("ROLLBACK TO run")
            conn.execute("RELEASE run")
            self._forget_new_keys(conn)
            if len(run) == 1:
                return [(run[0][1], None, exc)]
            return [out for pending in run for out in self._apply_run(conn, [pending])]
        conn.execute("RELEASE run")
        return _applied(run, results)

    def _apply(self, conn: sqlite3.Connection, ops: list[_Op]) -> list[Any]:
        first = ops[0]
        if isinstance(first, _Insert):
            return self._insert_all(conn, ops)  # type: ignore[arg-type]
        if isinstance(first, _Delete):
            _delete_ids(conn, [i for op in ops for i in op.ids])  # type: ignore[union-attr]
            return [None] * len(ops)
        if isinstance(first, _Lease):
            rows: list[Any] = []
            history: list[Any] = []
            for op in ops:
                deadline = op.deadline  # type: ignore[union-attr]
                for msg_id, attempt in op.leases:  # type: ignore[union-attr]
                    rows += (msg_id, attempt, deadline)
                if op.events is not None:  # type: ignore[union-attr]
                    leased = [msg_id for msg_id, _ in op.leases]  # type: ignore[union-attr]
                    history += _history_rows(leased, op.events)  # type: ignore[union-attr]
            _lease_rows(conn, rows)
            if history:
                self._with_history(conn)
                _append_history(conn, history)
            return [None] * len(ops)
        return [first(conn)]

    def _insert_all(self, conn: sqlite3.Connection, inserts: list[_Insert]) -> list[EnqueueResult]:
        keys = [self._key(conn, op.channel) for op in inserts]
        # Claim every dedup id of the group in one statement. When every claim takes (the
        # usual case: fresh ids), no message is a duplicate and nothing needs looking up.
        claims: list[Any] = []
        for key, op in zip(keys, inserts, strict=True):
            for m in op.messages:
                if m.dedup_id is not None:
                    claims += (key, m.dedup_id, m.id, m.enqueued_at)
        if claims:
            before = conn.total_changes
            _insert_rows(conn, "INSERT OR IGNORE INTO dedup", 4, claims)
            if conn.total_changes - before < len(claims) // 4:
                return self._insert_with_duplicates(conn, keys, inserts)
        values: list[Any] = []
        traced: list[Any] = []
        results: list[EnqueueResult] = []
        for key, op in zip(keys, inserts, strict=True):
            fresh = list(op.messages)
            if op.events is None:
                values += _message_values(key, fresh)
            else:
                traced += _traced_values(key, fresh, _started(op.events))
            results.append(EnqueueResult(ids=[m.id for m in fresh], new=fresh))
        self._insert_messages(conn, values, traced)
        return results

    def _insert_messages(
        self, conn: sqlite3.Connection, values: list[Any], traced: list[Any]
    ) -> None:
        """Insert rows of `_message_values` and of `_traced_values` (their own statement, so a
        group with no traced channel writes exactly what it did before tracing existed)."""
        _insert_rows(conn, _INSERT_MESSAGES, 9, values)
        if traced:
            self._with_history(conn)
            _insert_rows(conn, _INSERT_TRACED, 10, traced)

    def _with_history(self, conn: sqlite3.Connection) -> None:
        """Give the messages table its `history` column if it has none yet (in the writer's
        transaction). Made on first use, like `meta`: a store no channel ever traced keeps
        the schema older versions made, so older nodes sharing the file keep working (their
        inserts name no columns). After a rollback this is checked again (see
        `_forget_new_keys`)."""
        if self._history:
            return
        columns = {row[1] for row in conn.execute("PRAGMA table_info(messages)")}
        if "history" not in columns:
            conn.execute("ALTER TABLE messages ADD COLUMN history TEXT")
        self._history = True

    def _insert_with_duplicates(
        self, conn: sqlite3.Connection, keys: list[int], inserts: list[_Insert]
    ) -> list[EnqueueResult]:
        """Some dedup ids were taken already (or twice in this group). Every id now has a row:
        one naming a message of ours was just claimed by it; any other names the first message,
        unless it was used before the window, when it passes to ours."""
        wanted: dict[int, set[str]] = {}
        for key, op in zip(keys, inserts, strict=True):
            wanted.setdefault(key, set()).update(
                m.dedup_id for m in op.messages if m.dedup_id is not None
            )
        known: dict[int, dict[str, tuple[int, int]]] = {}
        for key, dedup_ids in wanted.items():
            found = known[key] = {}
            listed = list(dedup_ids)
            for start in range(0, len(listed), _MAX_VALUES):
                chunk = listed[start : start + _MAX_VALUES]
                for dedup_id, msg_id, used_at in conn.execute(
                    "SELECT dedup_id, msg_id, used_at FROM dedup WHERE ch = ?"
                    f" AND dedup_id IN ({_marks(len(chunk))})",
                    (key, *chunk),
                ):
                    found[dedup_id] = (msg_id, used_at)
        results: list[EnqueueResult] = []
        values: list[Any] = []
        renewed: list[tuple[int, int, int, str]] = []
        traced: list[Any] = []
        for key, op in zip(keys, inserts, strict=True):
            found = known[key]
            ids: list[int] = []
            new: list[Message] = []
            histories: list[str] = []
            started = None if op.events is None else _started(op.events)
            for i, m in enumerate(op.messages):
                if m.dedup_id is not None:
                    first, used_at = found[m.dedup_id]
                    if first != m.id:
                        if used_at >= op.dedup_since:
                            ids.append(first)
                            continue
                        found[m.dedup_id] = (m.id, m.enqueued_at)
                        renewed.append((m.id, m.enqueued_at, key, m.dedup_id))
                ids.append(m.id)
                new.append(m)
                if started is not None:
                    histories.append(started[i])
            if started is None:
                values += _message_values(key, new)
            else:
                traced += _traced_values(key, new, histories)
            results.append(EnqueueResult(ids=ids, new=new))
        conn.executemany(
            "UPDATE dedup SET msg_id = ?, used_at = ? WHERE ch = ? AND dedup_id = ?", renewed
        )
        self._insert_messages(conn, values, traced)
        return results

    def _forget_new_keys(self, conn: sqlite3.Connection) -> None:
        """After a rollback, channel keys made in that transaction no longer exist (nor, maybe,
        the history column)."""
        self._history = False
        with contextlib.suppress(sqlite3.Error):
            self._keys = dict(conn.execute("SELECT name, key FROM channels").fetchall())

    def _write(
        self, op: Callable[[sqlite3.Connection], T], channel: str | None
    ) -> asyncio.Future[T]:
        return self._submit(op, channel)

    def _submit(self, op: _Op, channel: str | None) -> asyncio.Future[Any]:
        """Queue a write of `channel` (None: an unfenced write) for the writer, with the
        (shard, epoch) the fence resolves it to now.

        The answer is the writer's own future (settled on the loop, errors translated), not a
        coroutine: the engine shields it and settles memory from a callback on it, so a hot
        write costs no task of its own. A write this node owns no shard for fails in it too."""
        if self._writer is None or self._loop is None:
            raise StoreUnavailable("the embedded store is not open")
        future: asyncio.Future[Any] = self._loop.create_future()
        fence: _Fence = None
        if channel is not None and self._resolve is not None:
            fence = self._resolve(channel)
            if fence is None:
                future.set_exception(unowned(channel))
                return future
        self._queue.put((op, future, fence))
        return future

    async def _read(self, op: Callable[[sqlite3.Connection], T]) -> T:
        """Reads see committed data only (their own WAL snapshot) and are short: run inline,
        where fetching row by row costs no hand-over of the GIL."""
        if self._read_conn is None:
            raise StoreUnavailable("the embedded store is not open")
        # A read may write its read mark into the WAL index, the one file that is mapped.
        unwritable = self._guard(self._mapped)
        if unwritable is not None:
            raise StoreUnavailable(unwritable)
        try:
            return op(self._read_conn)
        except sqlite3.Error as exc:
            raise _translate(exc) from exc

    def _key(self, conn: sqlite3.Connection, channel: str) -> int:
        """The channel's integer key, made on first use (in the writer's transaction). A name
        keeps its key for good, even once dropped: processes sharing the file cache name ->
        key, and a key given to another name would send their writes to the wrong channel."""
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
        # Known fields only: settings a newer version wrote do not stop this one starting.
        return {name: _config(json.loads(config)) for name, config in rows}

    async def save_channel(self, name: str, config: ChannelConfig) -> None:
        encoded = json.dumps(asdict(config))

        def op(conn: sqlite3.Connection) -> None:
            key = self._key(conn, name)
            conn.execute("UPDATE channels SET config = ? WHERE key = ?", (encoded, key))

        await self._write(op, name)

    async def drop_channel(self, name: str) -> None:
        def op(conn: sqlite3.Connection) -> None:
            key = self._read_key(conn, name)
            if key is None:
                return
            conn.execute("DELETE FROM messages WHERE ch = ?", (key,))
            conn.execute("DELETE FROM dedup WHERE ch = ?", (key,))
            # The name keeps its key (see `_key`): only its settings go.
            conn.execute("UPDATE channels SET config = NULL WHERE key = ?", (key,))

        await self._write(op, name)

    # -- writes -----------------------------------------------------------------------------
    # The hot writes answer with the writer's future (see `_submit`).
    def insert(
        self,
        channel: str,
        messages: Sequence[Message],
        dedup_since: int,
        events: Sequence[Event] | None = None,
    ) -> asyncio.Future[EnqueueResult]:
        check_sizes(messages, self.max_message_bytes, self.kind)
        return self._submit(_Insert(channel, messages, dedup_since, events), channel)

    def lease(
        self,
        channel: str,
        leases: Sequence[tuple[int, int]],
        deadline: int,
        events: Sequence[Event] | None = None,
    ) -> asyncio.Future[None]:
        return self._submit(_Lease(leases, deadline, events), channel)

    def release(
        self,
        channel: str,
        ids: Sequence[int],
        available_at: int,
        events: Sequence[Event] | None = None,
    ) -> asyncio.Future[None]:
        return self._update_many(
            channel,
            "UPDATE messages SET leased = 0, available_at = ? WHERE id IN ({})",
            available_at,
            ids,
            events,
        )

    def extend(self, channel: str, ids: Sequence[int], deadline: int) -> asyncio.Future[None]:
        return self._update_many(
            channel,
            "UPDATE messages SET available_at = ? WHERE leased = 1 AND id IN ({})",
            deadline,
            ids,
        )

    def delete(self, channel: str, ids: Sequence[int]) -> asyncio.Future[None]:
        return self._submit(_Delete(ids), channel)

    def _update_many(
        self,
        channel: str,
        sql: str,
        value: int,
        ids: Sequence[int],
        events: Sequence[Event] | None = None,
    ) -> asyncio.Future[None]:
        def op(conn: sqlite3.Connection) -> None:
            if ids:
                conn.execute(sql.format(_marks(len(ids))), (value, *ids))
                if events is not None:
                    self._with_history(conn)
                    _append_history(conn, _history_rows(ids, events))

        return self._write(op, channel)

    def move(
        self,
        channel: str,
        ids: Sequence[int],
        target: str | None,
        moved: Sequence[Message],
        target_config: ChannelConfig | None = None,
        events: Sequence[Event] | None = None,
    ) -> asyncio.Future[list[Message]]:
        # A dead letter carries a few more headers than the message did (DEAD_LETTER_HEADROOM).
        check_sizes(moved, self.max_message_bytes + DEAD_LETTER_HEADROOM, self.kind)

        def op(conn: sqlite3.Connection) -> list[Message]:
            copies: list[Message] = []
            histories: list[str] = []
            if target is not None and moved and events is not None:
                # Traced: each copy carries its original's history on, with its event.
                self._with_history(conn)
                held = _histories(conn, ids)
                for i, c, event in zip(ids, moved, _encoded(events), strict=True):
                    if i in held:
                        copies.append(c)
                        histories.append(_carried(held[i], event))
            elif target is not None and moved:
                found = _existing_ids(conn, ids)
                copies = [c for i, c in zip(ids, moved, strict=True) if i in found]
            _delete_ids(conn, ids)
            if target is not None and copies:
                key = self._key(conn, target)
                if events is None:
                    _insert_rows(conn, _INSERT_MESSAGES, 9, _message_values(key, copies))
                else:
                    _insert_rows(conn, _INSERT_TRACED, 10, _traced_values(key, copies, histories))
                if target_config is not None:
                    conn.execute(
                        "UPDATE channels SET config = ? WHERE key = ? AND config IS NULL",
                        (json.dumps(asdict(target_config)), key),
                    )
            return copies

        return self._write(op, channel)

    async def purge(self, channel: str) -> int:
        def op(conn: sqlite3.Connection) -> int:
            key = self._read_key(conn, channel)
            if key is None:
                return 0
            return conn.execute("DELETE FROM messages WHERE ch = ?", (key,)).rowcount

        return await self._write(op, channel)

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
            due = sorted(_messages(rows), key=lambda m: m.id)
            ids = [m.id for m in due]
            conn.execute(
                f"UPDATE messages SET available_at = 0 WHERE id IN ({_marks(len(ids))})", ids
            )
            for m in due:
                m.available_at = 0
            return due

        return await self._write(op, channel)

    async def prune_dedup(self, before: int, limit: int) -> int:
        # Not fenced: forgetting an id past its window is right whoever does it.
        return await self._write(
            lambda conn: (
                conn.execute(
                    "DELETE FROM dedup WHERE (ch, dedup_id) IN"
                    " (SELECT ch, dedup_id FROM dedup WHERE used_at < ? LIMIT ?)",
                    (before, limit),
                ).rowcount
            ),
            None,
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
            return _messages(rows)

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

    async def history(self, channel: str, message_id: int) -> list[Event] | None:
        def op(conn: sqlite3.Connection) -> tuple[bool, str | None]:
            key = self._read_key(conn, channel)
            if key is None:
                return False, None
            traced = any(r[1] == "history" for r in conn.execute("PRAGMA table_info(messages)"))
            row = conn.execute(
                f"SELECT {'history' if traced else 'NULL'} FROM messages WHERE id = ? AND ch = ?",
                (message_id, key),
            ).fetchone()
            return (False, None) if row is None else (True, row[0])

        found, history = await self._read(op)
        if not found:
            return None
        return [] if history is None else _history_decoder.decode(history)

    async def max_id(self) -> int:
        value: int | None = await self._read(
            lambda conn: conn.execute("SELECT MAX(id) FROM messages").fetchone()[0]
        )
        return value or 0

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
        def op(conn: sqlite3.Connection) -> Page:
            key = self._read_key(conn, channel)
            if key is None:
                return Page([], None)
            where, params = _BROWSE_STATES[state], (now,) if state is not None else ()
            bound = None
            if state is not None:
                # Where the scan stops: `scan` entries along the id index (no row is read).
                bound = conn.execute(
                    "SELECT id FROM messages INDEXED BY messages_by_channel WHERE ch = ?"
                    " AND id > ? ORDER BY id LIMIT 1 OFFSET ?",
                    (key, after_id, max(scan, limit) - 1),
                ).fetchone()
            upper = bound[0] if bound is not None else _MAX_ID
            # Along the id index, never the due index: a page costs at most `scan` rows.
            rows = conn.execute(
                f"SELECT {_COLUMNS} FROM messages INDEXED BY messages_by_channel WHERE ch = ?"
                f" AND id > ? AND id <= ?{where} ORDER BY id LIMIT ?",
                (key, after_id, upper, *params, limit),
            )
            found: list[Message] = []
            size, full = 0, False
            for row in rows:  # row by row: a page of large messages stops at `max_bytes`
                m = _message(row)
                size += page_size(m)
                if found and max_bytes is not None and size > max_bytes:
                    full = True
                    break
                found.append(m)
            if len(found) == limit or full:
                return Page(found, found[-1].id)
            return Page(found, None if bound is None else upper)

        return await self._read(op)

    async def get_message(self, channel: str, msg_id: int) -> Message | None:
        def op(conn: sqlite3.Connection) -> Message | None:
            key = self._read_key(conn, channel)
            if key is None:
                return None
            row = conn.execute(
                f"SELECT {_COLUMNS} FROM messages WHERE id = ? AND ch = ?", (msg_id, key)
            ).fetchone()
            if row is None:
                return None
            return _message(row)

        return await self._read(op)

    # -- ownership --------------------------------------------------------------------------
    async def store_time_ms(self) -> int:
        return self._clock.now_ms()

    def fence(self, resolve: Resolve | None) -> None:
        self._resolve = resolve

    async def take_lease(
        self, shard: str, owner: str, owner_url: str, ttl_ms: int, *, from_epoch: int | None = None
    ) -> ShardLease | None:
        def op(conn: sqlite3.Connection) -> ShardLease | None:
            now = self._clock.now_ms()  # under the write lock: no taker can come in between
            row = conn.execute(
                "SELECT epoch, expires_at FROM shard_leases WHERE shard = ?", (shard,)
            ).fetchone()
            if row is not None and row[1] > now and row[0] != from_epoch:
                return None  # a live holder that did not agree to hand over
            lease = ShardLease(shard, owner, owner_url, row[0] + 1 if row else 1, now + ttl_ms)
            conn.execute(
                f"INSERT OR REPLACE INTO shard_leases ({_LEASE_COLUMNS}) VALUES (?, ?, ?, ?, ?)",
                (lease.shard, lease.owner, lease.owner_url, lease.epoch, lease.expires_at),
            )
            self._epochs[shard] = lease.epoch  # fenced writes later in this group see it
            return lease

        return await self._write(op, None)

    async def renew_lease(
        self, shard: str, owner: str, epoch: int, ttl_ms: int
    ) -> ShardLease | None:
        def op(conn: sqlite3.Connection) -> ShardLease | None:
            row = conn.execute(
                "UPDATE shard_leases SET expires_at = ? WHERE shard = ? AND owner = ?"
                f" AND epoch = ? AND expires_at > 0 RETURNING {_LEASE_COLUMNS}",
                (self._clock.now_ms() + ttl_ms, shard, owner, epoch),
            ).fetchone()
            return None if row is None else ShardLease(*row)

        return await self._write(op, None)

    async def transfer_lease(
        self, shard: str, owner: str, epoch: int, to: str, to_url: str, ttl_ms: int
    ) -> ShardLease | None:
        def op(conn: sqlite3.Connection) -> ShardLease | None:
            row = conn.execute(
                "UPDATE shard_leases SET owner = ?, owner_url = ?, epoch = epoch + 1,"
                " expires_at = ? WHERE shard = ? AND owner = ? AND epoch = ? AND expires_at > 0"
                f" RETURNING {_LEASE_COLUMNS}",
                (to, to_url, self._clock.now_ms() + ttl_ms, shard, owner, epoch),
            ).fetchone()
            if row is None:
                return None
            lease = ShardLease(*row)
            self._epochs[shard] = lease.epoch  # fenced writes later in this group see it
            return lease

        return await self._write(op, None)

    async def release_lease(self, shard: str, owner: str, epoch: int) -> bool:
        def op(conn: sqlite3.Connection) -> bool:
            return bool(
                conn.execute(
                    "UPDATE shard_leases SET expires_at = 0 WHERE shard = ? AND owner = ?"
                    " AND epoch = ?",
                    (shard, owner, epoch),
                ).rowcount
            )

        return await self._write(op, None)

    async def leases(self) -> dict[str, ShardLease]:
        rows = await self._read(
            lambda conn: conn.execute(f"SELECT {_LEASE_COLUMNS} FROM shard_leases").fetchall()
        )
        return {row[0]: ShardLease(*row) for row in rows}

    async def topology(self) -> tuple[int, bytes] | None:
        row = await self._read(
            lambda conn: conn.execute("SELECT version, doc FROM topology").fetchone()
        )
        return None if row is None else (int(row[0]), bytes(row[1]))

    async def swap_topology(self, expected_version: int | None, version: int, doc: bytes) -> bool:
        check_topology_version(expected_version, version)

        def op(conn: sqlite3.Connection) -> bool:
            if expected_version is None:
                sql = "INSERT OR IGNORE INTO topology (id, version, doc) VALUES (1, ?, ?)"
                return bool(conn.execute(sql, (version, doc)).rowcount)
            sql = "UPDATE topology SET version = ?, doc = ? WHERE id = 1 AND version = ?"
            return bool(conn.execute(sql, (version, doc, expected_version)).rowcount)

        return await self._write(op, None)

    # -- members ----------------------------------------------------------------------------
    async def report_member(self, url: str, doc: bytes) -> None:
        def op(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT OR REPLACE INTO members (url, seen_at, doc) VALUES (?, ?, ?)",
                (url, self._clock.now_ms(), doc),
            )

        await self._write(op, None)

    async def members(self) -> dict[str, tuple[int, bytes]]:
        rows = await self._read(
            lambda conn: conn.execute("SELECT url, seen_at, doc FROM members").fetchall()
        )
        return {url: (int(seen_at), bytes(doc)) for url, seen_at, doc in rows}

    # -- node secret ------------------------------------------------------------------------
    async def secret(self) -> bytes:
        fresh = os.urandom(SECRET_BYTES)

        def op(conn: sqlite3.Connection) -> bytes:
            conn.execute(_META)
            conn.execute("INSERT OR IGNORE INTO meta VALUES ('secret', ?)", (fresh,))
            row = conn.execute("SELECT value FROM meta WHERE name = 'secret'").fetchone()
            return bytes(row[0])

        return await self._write(op, None)


_CONFIG_FIELDS = frozenset(f.name for f in fields(ChannelConfig))


def _config(stored: dict[str, Any]) -> ChannelConfig:
    return ChannelConfig(**{k: v for k, v in stored.items() if k in _CONFIG_FIELDS})


def _stored_epoch(conn: sqlite3.Connection, shard: str) -> int | None:
    """The epoch of the shard's lease (None: never taken): the fence's one indexed read."""
    row = conn.execute("SELECT epoch FROM shard_leases WHERE shard = ?", (shard,)).fetchone()
    return None if row is None else int(row[0])


def _lease_rows(conn: sqlite3.Connection, rows: list[Any]) -> None:
    """Lease many messages, each with its own attempt and deadline, in one statement a chunk."""
    step = _MAX_VALUES // 3 * 3
    for start in range(0, len(rows), step):
        chunk = rows[start : start + step]
        conn.execute(
            "UPDATE messages SET leased = 1, attempt = v.column2, available_at = v.column3"
            f" FROM ({_values('', 3, len(chunk) // 3).strip()}) AS v"
            " WHERE messages.id = v.column1",
            chunk,
        )


# Each browsing state as a condition on the row (`state_of`), with `now` as its one parameter.
_BROWSE_STATES: dict[MessageState | None, str] = {
    None: "",
    "ready": " AND available_at <= ?",
    "delayed": " AND leased = 0 AND available_at > ?",
    "in_flight": " AND leased = 1 AND available_at > ?",
}
_MAX_ID = 2**63 - 1


def _existing_ids(conn: sqlite3.Connection, ids: Sequence[int]) -> set[int]:
    found: set[int] = set()
    for start in range(0, len(ids), _MAX_VALUES):
        chunk = list(ids[start : start + _MAX_VALUES])
        found.update(
            row[0]
            for row in conn.execute(
                f"SELECT id FROM messages WHERE id IN ({_marks(len(chunk))})", chunk
            )
        )
    return found


def _histories(conn: sqlite3.Connection, ids: Sequence[int]) -> dict[int, str | None]:
    """The history (JSON text, or None) of each of `ids` still stored."""
    found: dict[int, str | None] = {}
    for start in range(0, len(ids), _MAX_VALUES):
        chunk = list(ids[start : start + _MAX_VALUES])
        found.update(
            conn.execute(
                f"SELECT id, history FROM messages WHERE id IN ({_marks(len(chunk))})", chunk
            ).fetchall()
        )
    return found


def _delete_ids(conn: sqlite3.Connection, ids: Sequence[int]) -> None:
    for start in range(0, len(ids), _MAX_VALUES):
        chunk = ids[start : start + _MAX_VALUES]
        conn.execute(f"DELETE FROM messages WHERE id IN ({_marks(len(chunk))})", list(chunk))


def _settle(outcomes: list[tuple[asyncio.Future[Any], Any, BaseException | None]]) -> None:
    for future, result, error in outcomes:
        if future.cancelled():
            continue
        if error is None:
            future.set_result(result)
        elif isinstance(error, sqlite3.Error):
            translated = _translate(error)
            translated.__cause__ = error
            future.set_exception(translated)
        else:
            future.set_exception(error)
