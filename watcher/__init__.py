"""The LionMQ watcher: nodes stream snapshots to `/ingest`, browsers watch them live on `/`."""

from watcher.app import create_app

__all__ = ["create_app"]
