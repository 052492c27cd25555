"""`python -m watcher`: read the settings, then serve. A bad setting is one line, no traceback."""

from __future__ import annotations

import logging
import sys

import uvicorn

from watcher.app import create_app
from watcher.settings import WatcherConfigError, load_settings


def main() -> int:
    try:
        settings = load_settings()
    except WatcherConfigError as exc:
        print(f"watcher: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    app = create_app(settings)
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        # Frames above max_frame_bytes are dropped and counted by /ingest; far larger ones
        # are cut off by the server before they are read into memory.
        ws_max_size=4 * settings.max_frame_bytes,
        ws_ping_interval=20.0,
        ws_ping_timeout=20.0,
        proxy_headers=False,
        server_header=False,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
