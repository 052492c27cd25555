"""Tracing on stores that older versions wrote: no history column or field, no `trace` setting.

The contract (tests/store_contract.py) covers history over every backend; this covers what a
store made before tracing existed holds.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

from mongomock_motor import AsyncMongoMockClient

from app.clock import ManualClock
from app.models import ChannelConfig, Event, Message
from app.store.mongo import MongoStore
from app.store.sqlite import SQLiteStore

NOW = 1_000_000
ENQUEUED: Event = {"at": NOW, "event": "enqueued"}
DELIVERED: Event = {"at": NOW, "event": "delivered", "attempt": 1}


def _columns(path: Path) -> set[str]:
    with sqlite3.connect(path) as conn:
        return {row[1] for row in conn.execute("PRAGMA table_info(messages)")}


async def test_sqlite_gains_the_history_column_only_when_a_channel_traces(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    store = SQLiteStore(str(path), clock=ManualClock(NOW))
    await store.open()
    try:
        await store.insert("a", [Message(1, b"1", None, NOW)], 0)
        await store.lease("a", [(1, 1)], NOW + 100)
        assert "history" not in _columns(path)  # untraced: the schema older versions made
        # What an older node sharing the file does: a settings row of its own (no `trace`)
        # and an insert naming no columns, which the history column would break.
        with sqlite3.connect(path) as conn:
            conn.execute(
                "UPDATE channels SET config = ? WHERE name = 'a'",
                (json.dumps({"visibility_ms": 1000, "max_attempts": 3, "dead_letter": None}),),
            )
            conn.execute(
                "INSERT INTO messages VALUES (2, (SELECT key FROM channels WHERE name = 'a'),"
                " x'31', NULL, ?, 0, NULL, 0, 0)",
                (NOW,),
            )
        assert await store.load_channels() == {
            "a": ChannelConfig(visibility_ms=1000, max_attempts=3, trace=False)
        }
        assert await store.history("a", 1) == [] and await store.history("a", 2) == []

        # The first traced write adds it, in its own transaction; old rows have no history.
        await store.insert("a", [Message(3, b"3", None, NOW)], 0, events=[ENQUEUED])
        assert "history" in _columns(path)
        await store.lease("a", [(2, 1), (3, 1)], NOW + 100, [DELIVERED, DELIVERED])
        assert await store.history("a", 2) == [DELIVERED]
        assert await store.history("a", 3) == [ENQUEUED, DELIVERED]
        assert await store.history("a", 1) == []
    finally:
        await store.close()


async def test_sqlite_settings_from_a_newer_version_still_load(tmp_path: Path) -> None:
    store = SQLiteStore(str(tmp_path / "s.db"), clock=ManualClock(NOW))
    await store.open()
    try:
        await store.save_channel("a", ChannelConfig(trace=True))
        stored = {"visibility_ms": 1000, "trace": True, "some_later_setting": 7}
        await store._write(
            lambda c: c.execute(
                "UPDATE channels SET config = ? WHERE name = 'a'", (json.dumps(stored),)
            ),
            None,
        )
        assert await store.load_channels() == {"a": ChannelConfig(visibility_ms=1000, trace=True)}
    finally:
        await store.close()


async def test_mongodb_documents_without_history_or_trace(tmp_path: Path) -> None:
    client: Any = AsyncMongoMockClient()
    store = MongoStore(client=client, database="old", clock=ManualClock(NOW))
    await store.open()
    try:
        db = client["old"]
        # As an older version wrote them.
        await db.channels.insert_one({"_id": "a", "visibility_ms": 1000, "max_attempts": 3})
        await db.messages.insert_one(
            {
                "_id": 1,
                "channel": "a",
                "body": b"1",
                "enqueued_at": NOW,
                "available_at": 0,
                "attempt": 0,
                "leased": False,
            }
        )
        assert await store.load_channels() == {
            "a": ChannelConfig(visibility_ms=1000, max_attempts=3, trace=False)
        }
        assert await store.history("a", 1) == []
        await store.lease("a", [(1, 1)], NOW + 100, [DELIVERED])
        assert await store.history("a", 1) == [DELIVERED]
        await store.release("a", [1], 0, [ENQUEUED])
        assert await store.history("a", 1) == [DELIVERED, ENQUEUED]
        assert (await store.page_ready("a", 0, NOW, 10))[0].attempt == 1
    finally:
        await store.close()
