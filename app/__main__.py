"""`python -m app`: start a node. Settings come from flags, then the environment, then `.env`."""

from __future__ import annotations

import logging
import sys

import uvicorn

from app import __version__
from app.errors import ConfigError
from app.main import before_stop, create_app
from app.server import (
    AccessLog,
    ConnectionGuard,
    NodeServer,
    OneLineParser,
    connection_cap,
    flag_overrides,
    guarded_protocol,
    log_config,
    tune_gc,
)
from app.settings import load_settings

PROG = "lionmq"


def parser() -> OneLineParser:
    p = OneLineParser(
        prog="python -m app",
        description="Start a LionMQ node. Every setting is also an environment variable or a "
        "line of .env (see .env.example); a flag wins over both.",
        epilog="A cluster is every node on one store; its settings are environment variables: "
        "CLUSTER_SECRET (node to node, required once a topology exists), ADMIN_TOKEN "
        "(PUT /cluster/nodes), CLUSTER_INIT (a JSON topology to seed an empty store with), "
        "HEARTBEAT_MS (default 500) and LEASE_MS (default 2000). See README.md, Running a "
        "cluster.",
    )
    p.add_argument("--version", action="version", version=f"lionmq-node {__version__}")
    p.add_argument("--host", help="address to listen on (HOST, default 127.0.0.1)")
    p.add_argument("--port", help="port to listen on (PORT, default 8000)")
    p.add_argument(
        "--store-url",
        help="sqlite:///path or mongodb://host:port/db (STORE_URL, default sqlite:///./data/lionmq.db)",
    )
    p.add_argument(
        "--node-id",
        help="this node's name, unique in a cluster (NODE_ID, default <host name>-<port>)",
    )
    p.add_argument(
        "--server-host",
        help="the URL clients reach this node at (SERVER_HOST, default http://HOST:PORT)",
    )
    p.add_argument(
        "--log-level", metavar="{debug,info,warning,error}", help="LOG_LEVEL, default info"
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        settings = load_settings(**flag_overrides(args))
        max_connections = connection_cap(settings.max_connections)
    except ConfigError as exc:
        print(f"{PROG}: {exc.detail}", file=sys.stderr)
        return 2
    app = create_app(settings)
    guard = ConnectionGuard(
        max_connections, settings.header_timeout_ms / 1000, settings.body_timeout_ms / 1000
    )
    # An access line per request would cost more than a message batch: only at debug.
    access = logging.getLogger("lionmq.access")
    config = uvicorn.Config(
        AccessLog(app, access) if settings.log_level == "debug" else app,
        host=settings.host,
        port=settings.port,
        http=guarded_protocol(guard),
        log_config=log_config(settings.log_level, ("lionmq", "app", "uvicorn")),
        log_level=settings.log_level,
        access_log=False,
        # The client address is the TCP peer (X-Forwarded-For is not believed; a traced
        # channel records it, app/api/consumer.py); parsing proxy headers costs per request.
        proxy_headers=False,
        lifespan="on",
    )
    server = NodeServer(config, lambda: before_stop(app))
    tune_gc()
    logging.getLogger("lionmq.server").info(
        "accepting up to %d connections; headers within %d ms, bodies within %d ms",
        max_connections,
        settings.header_timeout_ms,
        settings.body_timeout_ms,
    )
    try:
        server.run()
    except SystemExit:  # uvicorn's way out of a failed start-up (exit status 3)
        # A failure the node names (the lifespan recorded it and kept its traceback from
        # uvicorn): one line, not a traceback.
        failure: str | None = getattr(app.state, "start_failure", None)
        if failure is None:
            raise
        print(f"{PROG}: {failure}", file=sys.stderr)
        return 1
    return 0 if server.started else 1


if __name__ == "__main__":
    sys.exit(main())
