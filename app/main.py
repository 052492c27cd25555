"""The node's app factory: `create_app(settings)`; resources open in the lifespan."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from starlette.types import ASGIApp

from app import __version__
from app.api import channels, docs, health, hotpath, messages, problems
from app.api.auth import OPEN_PATHS, BearerAuth
from app.api.codec import install_schemas
from app.api.deps import Node
from app.clock import Clock, SystemClock
from app.engine.maintenance import Maintenance
from app.engine.queue import EngineLimits, QueueEngine
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


class NodeApp(FastAPI):
    """FastAPI with the bearer-token check and the message operations in front of its own
    middleware stack: the operations carry nearly all the traffic and need none of it."""

    def __init__(self, *, api_token: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._api_token = api_token

    def build_middleware_stack(self) -> ASGIApp:
        app: ASGIApp = hotpath.HotPath(super().build_middleware_stack())
        return BearerAuth(app, self._api_token) if self._api_token else app


def create_app(
    settings: Settings, *, clock: Clock | None = None, store: Store | None = None
) -> FastAPI:
    """Build a node. Nothing connects until the lifespan starts."""
    clock = clock or SystemClock()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        the_store = store or build_store(settings)
        await the_store.open()
        engine = QueueEngine(the_store, clock, engine_limits(settings))
        maintenance = Maintenance(engine, clock)
        pusher = None
        try:
            await engine.start()
            await maintenance.start()
            node = Node(settings, clock, the_store, engine, clock.now_ms())
            app.state.node = node
            app.state.metrics = health.metrics_registry(node)
            if settings.watcher_url:
                from app.telemetry import WatcherPusher

                pusher = WatcherPusher(settings, engine, the_store, clock)
                await pusher.start()
            log.info(
                "node %s ready on %s (store: %s)",
                settings.node_id,
                settings.server_host,
                the_store.kind,
            )
            yield
        finally:
            if pusher is not None:
                await pusher.stop()
            await maintenance.stop()
            await engine.stop()
            await the_store.close()

    app = NodeApp(
        api_token=settings.api_token,
        title="LionMQ node",
        version=__version__,
        description="A durable HTTP message queue: enqueue, dequeue under a lease, ack.",
        lifespan=lifespan,
        docs_url=None,  # served by app.api.docs, without a CDN
        redoc_url=None,
    )
    problems.install(app)
    docs.install(app)
    app.include_router(channels.router)
    app.include_router(health.router)
    schemas: list[type[Any]] = [
        *messages.SCHEMAS,
        *channels.SCHEMAS,
        *health.SCHEMAS,
        problems.Problem,
    ]
    open_paths = OPEN_PATHS if settings.api_token else None
    install_schemas(app, schemas, hotpath.openapi_paths(), open_paths=open_paths)
    return app


__all__ = ["create_app", "engine_limits"]
