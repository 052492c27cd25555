"""Every error leaves the node as RFC 9457 problem details (application/problem+json)."""

from __future__ import annotations

import logging
from http import HTTPStatus

import msgspec
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response
from starlette.routing import Match, Mount

from app.errors import LionMQError

log = logging.getLogger("lionmq.api")

PROBLEM_JSON = "application/problem+json"


class Problem(msgspec.Struct):
    """An error answer: `detail` says what went wrong and what to do about it."""

    type: str
    title: str
    status: int
    detail: str


def problem(status: int, detail: str, title: str | None = None, **headers: str) -> Response:
    body = Problem(
        type="about:blank",
        title=title or HTTPStatus(status).phrase,
        status=status,
        detail=detail,
    )
    return Response(
        msgspec.json.encode(body), status_code=status, media_type=PROBLEM_JSON, headers=headers
    )


def problem_for(exc: LionMQError) -> Response:
    if exc.status >= 500:
        log.warning("%s: %s", exc.title, exc.detail)
    extra = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else {}
    if exc.retry_after is not None:
        extra["Retry-After"] = str(exc.retry_after)
    return problem(exc.status, exc.detail, exc.title, **extra)


def _validation_detail(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
        parts.append(f"{where}: {err.get('msg', 'invalid')}" if where else str(err.get("msg")))
    return "; ".join(parts) or "the request is invalid"


_METHODS = ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH")


def _allowed_methods(request: Request) -> str:
    """The methods some route serves at the request's path (asked of each route, as the router
    asks; mounts are left out: they take any method and refuse inside)."""
    routes = [r for r in request.app.router.routes if not isinstance(r, Mount)]
    return ", ".join(
        method
        for method in _METHODS
        if any(r.matches({**request.scope, "method": method})[0] is Match.FULL for r in routes)
    )


def install(app: FastAPI) -> None:
    async def domain(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, LionMQError)
        return problem_for(exc)

    async def validation(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        return problem(422, _validation_detail(exc), "Invalid request")

    async def http(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        detail = exc.detail if isinstance(exc.detail, str) else HTTPStatus(exc.status_code).phrase
        if exc.status_code == 404 and detail == "Not Found":
            detail = f"no endpoint at {request.url.path}; see /docs for the API"
        elif exc.status_code == 405:
            detail = f"{request.method} is not allowed on {request.url.path}; see /docs"
            # A 405 names the methods the resource has (RFC 9110); the router's own Allow
            # names only those of the first route that matched the path.
            allowed = _allowed_methods(request)
            return problem(405, detail, **({"Allow": allowed} if allowed else {}))
        return problem(exc.status_code, detail)

    async def unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return problem(500, "the node hit an unexpected error; its log has the details")

    app.add_exception_handler(LionMQError, domain)
    app.add_exception_handler(RequestValidationError, validation)
    app.add_exception_handler(StarletteHTTPException, http)
    app.add_exception_handler(Exception, unexpected)
