"""Fill a SQLite store file with many channels fast, before a node starts on it.

The schema is the store's own (`_SCHEMA`, what `SQLiteStore.open` runs); the rows go in with raw
SQL in one transaction, which makes 100,000 channels in about a second. Synchronous, so sync and
async tests alike can call it.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path

from app.models import ChannelConfig
from app.store.sqlite import _SCHEMA


def seed_channels(
    db: Path, count: int, *, depths: Mapping[str, int] | None = None, now_ms: int = 1
) -> list[str]:
    """Create `count` empty channels `c000000`… and the channels in `depths` holding that many
    ready messages each; returns every channel name made."""
    depths = dict(depths or {})
    names = [f"c{i:06d}" for i in range(count)]
    names += [name for name in depths if name not in set(names)]
    config = json.dumps(asdict(ChannelConfig()))
    conn = sqlite3.connect(str(db), isolation_level=None)
    try:
        conn.executescript(_SCHEMA)
        conn.execute("BEGIN")
        (base,) = conn.execute("SELECT COALESCE(MAX(key), 0) FROM channels").fetchone()
        conn.executemany(
            "INSERT INTO channels (name, key, config) VALUES (?, ?, ?)",
            ((name, base + 1 + i, config) for i, name in enumerate(names)),
        )
        keys = dict(conn.execute("SELECT name, key FROM channels").fetchall())
        (next_id,) = conn.execute("SELECT COALESCE(MAX(id), 0) + 1 FROM messages").fetchone()
        rows = []
        for name, depth in depths.items():
            for _ in range(depth):
                rows.append((next_id, keys[name], b'"m"', None, now_ms, 0, None, 0, 0))
                next_id += 1
        conn.executemany(
            "INSERT INTO messages (id, ch, body, headers, enqueued_at, available_at, expires_at,"
            " attempt, leased) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            rows,
        )
        conn.execute("COMMIT")
    finally:
        conn.close()
    return names
