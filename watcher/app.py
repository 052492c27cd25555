"""The watcher's FastAPI app. Nothing happens at import time: `create_app` builds it, and its
lifespan creates the shared state and the status sweeper."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles

from watcher import feed, ingest
from watcher.hub import Hub, wall_clock_ms
from watcher.settings import WatcherSettings

STATIC = Path(__file__).parent / "static"

SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}


def create_app(
    settings: WatcherSettings,
    *,
    clock: Callable[[], int] = wall_clock_ms,
    sweep_period_s: float = 0.25,
) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        hub = Hub(settings, clock)
        app.state.hub = hub
        hub.start(sweep_period_s)
        try:
            yield
        finally:
            await hub.stop()

    app = FastAPI(
        title="LionMQ watcher", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None
    )

    @app.middleware("http")
    async def security_headers(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        response = await call_next(request)
        for name, value in SECURITY_HEADERS.items():
            response.headers.setdefault(name, value)
        if request.url.path in ("/", "/index.html"):
            response.headers["Cache-Control"] = "no-cache"
        return response

    @app.get("/health")
    async def health(request: Request) -> dict[str, Any]:
        hub: Hub = request.app.state.hub
        now = hub.clock()
        statuses = {"up": 0, "suspect": 0, "down": 0}
        for record in hub.state.nodes.values():
            statuses[hub.state.status_of(record, now)] += 1
        return {
            "status": "ok",
            "nodes": statuses,
            "browsers": len(hub.browsers),
            "ingest": hub.state.counters.as_dict(),
        }

    @app.get("/alerts")
    async def alerts(request: Request) -> Response:
        """The alerts raised now and the last cleared ones, for scripts and probes. With
        WATCHER_VIEW_TOKEN set it asks for it as `Authorization: Bearer`, as the page's feed
        does (there as a subprotocol)."""
        hub: Hub = request.app.state.hub
        expected = settings.view_token
        if expected and not ingest.token_ok(request.headers.get("authorization"), expected):
            return JSONResponse(
                {"title": "Unauthorized", "status": 401, "detail": "viewer token required"},
                status_code=401,
                media_type="application/problem+json",
                headers={"WWW-Authenticate": "Bearer"},
            )
        hub.check_alerts()
        return JSONResponse(hub.alerts.picture(hub.clock()))

    app.include_router(ingest.router)
    app.include_router(feed.router)
    app.mount("/", StaticFiles(directory=STATIC, html=True), name="static")
    return app
