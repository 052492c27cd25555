"""Stores: one contract (`Store`), two backends, chosen by STORE_URL."""

from __future__ import annotations

from app.settings import Settings, mongo_database
from app.store.base import Store


def build_store(settings: Settings) -> Store:
    """Construct (not open) the store STORE_URL names."""
    if settings.store_url.startswith("sqlite:///"):
        from app.store.sqlite import SQLiteStore

        return SQLiteStore(settings.sqlite_path, exclusive=settings.sqlite_exclusive)
    from app.store.mongo import MongoStore

    return MongoStore(
        settings.store_url,
        database=mongo_database(settings.store_url),
        write_concern=settings.mongo_write_concern,
        journal=settings.mongo_journal,
        timeout_ms=settings.mongo_timeout_ms,
    )


__all__ = ["Store", "build_store"]
