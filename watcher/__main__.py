"""`python -m watcher`: read the settings (flags, then the environment, then `.env`), then serve.
A bad setting is one line, no traceback."""

from __future__ import annotations

import logging
import sys

import uvicorn

from app import __version__
from app.errors import ConfigError
from app.server import (
    AccessLog,
    ConnectionGuard,
    OneLineParser,
    connection_cap,
    flag_overrides,
    guarded_protocol,
    log_config,
)
from app.settings import BODY_TIMEOUT_MS, HEADER_TIMEOUT_MS
from watcher.app import create_app
from watcher.settings import WatcherConfigError, WatcherSettings, load_settings


def parser() -> OneLineParser:
    p = OneLineParser(
        prog="python -m watcher",
        description="Start the LionMQ watcher dashboard. Every setting is also a WATCHER_* "
        "environment variable or a line of .env (see .env.example); a flag wins over both.",
    )
    p.add_argument("--version", action="version", version=f"lionmq-watcher {__version__}")
    p.add_argument("--host", help="address to listen on (WATCHER_HOST, default 127.0.0.1)")
    p.add_argument("--port", help="port to listen on (WATCHER_PORT, default 8080)")
    p.add_argument(
        "--log-level", metavar="{debug,info,warning,error}", help="WATCHER_LOG_LEVEL, default info"
    )
    alerts = p.add_argument_group(
        "alerts",
        "The watcher also raises an alert, without a threshold, for a node down or suspect and "
        "for a shard without an owner; see GET /alerts.",
    )
    for name, field in WatcherSettings.model_fields.items():
        if name.startswith("alert_"):
            alerts.add_argument(
                "--" + name.replace("_", "-"),
                metavar="N",
                help=f"{field.description} (WATCHER_{name.upper()}, default {field.default})",
            )
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        settings = load_settings(**flag_overrides(args))
        max_connections = connection_cap(None)
    except WatcherConfigError as exc:
        print(f"watcher: {exc}", file=sys.stderr)
        return 2
    except ConfigError as exc:
        print(f"watcher: {exc.detail}", file=sys.stderr)
        return 2
    app = create_app(settings)
    # The node's connection cap and deadlines: idle or slow clients cannot exhaust it either.
    guard = ConnectionGuard(max_connections, HEADER_TIMEOUT_MS / 1000, BODY_TIMEOUT_MS / 1000)
    access = logging.getLogger("watcher.access")
    uvicorn.run(
        AccessLog(app, access) if settings.log_level == "debug" else app,
        host=settings.host,
        port=settings.port,
        http=guarded_protocol(guard),
        log_config=log_config(settings.log_level, ("watcher", "uvicorn")),
        log_level=settings.log_level,
        access_log=False,
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
