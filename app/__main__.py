"""`python -m app`: start a node with the settings from the environment and `.env`."""

from __future__ import annotations

import logging
import sys

import uvicorn

from app.errors import ConfigError, StoreUnavailable
from app.main import create_app
from app.settings import load_settings


def main() -> int:
    try:
        settings = load_settings()
    except ConfigError as exc:
        print(f"lionmq: {exc.detail}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        access_log=False,  # one log line per message batch would cost more than the batch
        proxy_headers=False,  # the node reads no client address; parsing them costs per request
        lifespan="on",
    )
    server = uvicorn.Server(config)
    try:
        server.run()
    except StoreUnavailable as exc:
        print(f"lionmq: cannot open the store: {exc.detail}", file=sys.stderr)
        return 1
    return 0 if server.started else 1


if __name__ == "__main__":
    sys.exit(main())
