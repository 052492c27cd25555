"""The node's app factory: `create_app(settings)`; resources open in the lifespan."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import msgspec
from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app import __version__
from app.api import (
    browse,
    channels,
    cluster,
    docs,
    health,
    hotpath,
    internal,
    messages,
    problems,
)
from app.api.auth import OPEN_PATHS, BearerAuth
from app.api.codec import install_schemas
from app.api.deps import Node
from app.api.forward import Forwarder, end_long_polls
from app.api.guard import Guard
from app.assemble import open_cluster
from app.clock import Clock, SystemClock
from app.engine.ids import ReceiptSigner
from app.engine.maintenance import Maintenance
from app.engine.queue import EngineLimits, QueueEngine
from app.errors import ConfigError, LionMQError
from app.models import ChannelConfig
from app.settings import Settings
from app.store import build_store
from app.store.base import Store

log = logging.getLogger("lionmq")


def engine_limits(settings: Settings) -> EngineLimits:
    return EngineLimits(
        window_size=settings.window_size,
        dedup_window_ms=settings.dedup_window_ms,
        defaults=ChannelConfig(
            visibility_ms=settings.default_visibility_ms,
            max_attempts=settings.default_max_attempts,
            max_length=settings.default_max_length,
            ttl_ms=settings.default_ttl_ms,
        ),
    )


def check_store_limits(settings: Settings, store: Store) -> None:
    """Refuse to start, rather than clamp, when MAX_MESSAGE_BYTES exceeds what the store can
    hold: producers were promised that size, and clamping would break them at run time with
    413s nobody configured. The operator lowers the setting (or picks another store)."""
    if settings.max_message_bytes > store.max_message_bytes:
        raise ConfigError(
            f"MAX_MESSAGE_BYTES is {settings.max_message_bytes}, but the {store.kind} store holds"
            f" messages of at most {store.max_message_bytes} bytes; lower MAX_MESSAGE_BYTES"
        )


class NodeApp(FastAPI):
    """FastAPI with the guard against pages (app.api.guard), the bearer-token check and the
    message operations in front of its own middleware stack: the operations carry nearly all
    the traffic and need none of it."""

    def __init__(self, *, settings: Settings, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._settings = settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            send = self._quiet_start_failure(send)
        await super().__call__(scope, receive, send)

    def _quiet_start_failure(self, send: Send) -> Send:
        """A start-up that failed for a reason the node names (`state.start_failure`: a store
        it cannot open or write, a limit it cannot keep) is reported by `python -m app` in one
        line: the server is not handed the traceback Starlette formats for it."""

        async def quiet(message: Message) -> None:
            failed = message["type"] == "lifespan.startup.failed"
            if failed and getattr(self.state, "start_failure", None) is not None:
                message = {"type": message["type"], "message": ""}
            await send(message)

        return quiet

    def build_middleware_stack(self) -> ASGIApp:
        s = self._settings
        app: ASGIApp = hotpath.HotPath(super().build_middleware_stack(), s.node_id)
        app = Forwarder(app, s.max_request_bytes)
        app = BearerAuth(app, s.api_token) if s.api_token else app
        return Guard(app, s.allowed_host_names, any_host=s.any_host)


async def before_stop(app: FastAPI) -> None:
    """What a node does on SIGTERM while its server still serves (app/server.py NodeServer):
    a cluster node hands its shards to up-to-date backups (app/cluster/handoff.py); then the
    long polls, local and forwarded, answer at once, so the server's drain of the requests
    under way that follows is not held for up to a poll's wait (30 s)."""
    node: Node | None = getattr(app.state, "node", None)
    if node is not None:
        try:
            await node.cluster.leave()
        finally:
            node.engine.end_waits()
            end_long_polls(app)


def create_app(
    settings: Settings, *, clock: Clock | None = None, store: Store | None = None
) -> FastAPI:
    """Build a node. Nothing connects until the lifespan starts."""
    clock = clock or SystemClock()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Each part is closed, in reverse order, whatever fails: opening it or a later one,
        # serving, or closing another. Each is registered before it opens, as a part that
        # fails half-way through opening may hold something already (closing is harmless).
        started = False
        try:
            async with AsyncExitStack() as resources:
                the_store = store or build_store(settings)
                check_store_limits(settings, the_store)
                resources.push_async_callback(the_store.close)
                await the_store.open()
                engine = QueueEngine(the_store, clock, engine_limits(settings))
                resources.push_async_callback(engine.stop)
                maintenance = Maintenance(engine, clock)
                resources.push_async_callback(maintenance.stop)
                await maintenance.start()
                receipts = ReceiptSigner(await the_store.secret())
                # No engine.start(): the runtime adopts the channels of the shards it gains.
                runtime = await open_cluster(resources, app, settings, the_store, engine, clock)
                node = Node(
                    settings,
                    clock,
                    the_store,
                    engine,
                    clock.now_ms(),
                    maintenance,
                    receipts,
                    runtime,
                )
                app.state.node = node
                app.state.metrics = health.metrics_registry(node)
                if settings.watcher_url:
                    from app.telemetry import WatcherPusher

                    async def view() -> dict[str, Any]:
                        doc = await cluster.cluster_document(node)
                        return msgspec.to_builtins(doc)  # type: ignore[no-any-return]

                    pusher = WatcherPusher(
                        settings, engine, the_store, clock, role=runtime.role, cluster_view=view
                    )
                    resources.push_async_callback(pusher.stop)
                    await pusher.start()
                log.info(
                    "node %s ready on %s (store: %s)",
                    settings.node_id,
                    settings.server_host,
                    settings.store_label,
                )
                started = True
                yield
        except LionMQError as exc:
            if not started:  # named in one line by `python -m app` (see NodeApp)
                app.state.start_failure = f"cannot start ({settings.store_label}): {exc.detail}"
            raise

    app = NodeApp(
        settings=settings,
        title="LionMQ node",
        version=__version__,
        description="A durable HTTP message queue: enqueue, dequeue under a lease, ack.",
        lifespan=lifespan,
        docs_url=None,  # served by app.api.docs, without a CDN
        redoc_url=None,
        # FastAPI's native OpenTelemetry asks the global providers (environment lookups) on
        # every request to see whether it is on; the node exports /metrics and no traces.
        telemetry={"tracing": False, "metrics": False, "logs": False},
    )
    problems.install(app)
    docs.install(app)
    app.include_router(channels.router)
    app.include_router(browse.router)
    app.include_router(health.router)
    app.include_router(cluster.router)
    app.include_router(internal.router(settings.cluster_secret))
    schemas: list[type[Any]] = [
        *messages.SCHEMAS,
        *channels.SCHEMAS,
        *browse.SCHEMAS,
        *health.SCHEMAS,
        *cluster.SCHEMAS,
        problems.Problem,
    ]
    open_paths = OPEN_PATHS if settings.api_token else None
    install_schemas(app, schemas, hotpath.openapi_paths(), open_paths=open_paths)
    return app


__all__ = ["before_stop", "check_store_limits", "create_app", "engine_limits"]
