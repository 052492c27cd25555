"""The message operations served straight from ASGI.

`POST /channels/{channel}/{enqueue,dequeue,ack,nack,extend}` carry nearly all of a node's traffic.
Routing them through the framework's router, dependency solver and middleware layers cost more
than the work itself, so this small ASGI layer matches them first and hands everything else on
to the FastAPI app. Errors still come out as the same problem details.
"""

from __future__ import annotations

import logging
from typing import Any

from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Receive, Scope, Send

from app.api.codec import json_body_doc, json_response_doc, problem_docs, refuse_declared_oversize
from app.api.deps import Node
from app.api.messages import OPERATIONS
from app.api.problems import problem, problem_for
from app.errors import LionMQError, PayloadTooLarge
from app.models import CHANNEL_NAME_PATTERN

log = logging.getLogger("lionmq.api")

_PREFIX = "/channels/"
NODE_HEADER = "x-lionmq-node"  # names the node that served a message operation
_JSON_HEADERS = [(b"content-type", b"application/json")]


class HotPath:
    def __init__(self, app: ASGIApp, node_id: str) -> None:
        self.app = app
        # Every answer names the node that served it (X-LionMQ-Node): built once, not per answer.
        self.node = (NODE_HEADER.encode(), node_id.encode())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope.get("path", "")
        if scope["type"] == "websocket":
            # No route takes a WebSocket; the router would refuse with a bare, empty 403.
            detail = f"this node serves no WebSocket (asked at {path}); see /docs for the API"
            await problem(404, detail)(scope, receive, send)
            return
        if scope["type"] != "http" or not path.startswith(_PREFIX):
            await self.app(scope, receive, send)
            return
        channel, _, verb = path[len(_PREFIX) :].rpartition("/")
        operation = OPERATIONS.get(verb)
        if operation is None or not channel or "/" in channel:
            await self.app(scope, receive, send)
            return
        if scope["method"] != "POST":
            detail = f"{scope['method']} is not allowed on {path}; use POST (see /docs)"
            await problem(405, detail, Allow="POST")(scope, receive, send)
            return
        node: Node = scope["app"].state.node
        try:
            body = await _read_body(scope, receive, node.settings.max_request_bytes)
            status, payload = await operation.handler(node, channel, body, receive, scope)
        except LionMQError as exc:
            refusal = problem_for(exc)
            refusal.raw_headers.append(self.node)
            await refusal(scope, receive, send)
            return
        except ClientDisconnect:
            return  # gone before its body was whole: nothing was done, no one to answer
        except Exception:
            log.exception("unexpected error on POST %s", path)
            detail = "the node hit an unexpected error; its log has the details"
            await problem(500, detail)(scope, receive, send)
            return
        headers = [*_JSON_HEADERS, self.node, (b"content-length", str(len(payload)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": payload})


async def _read_body(scope: Scope, receive: Receive, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it passes `limit` bytes (or declares to)."""
    for name, value in scope["headers"]:
        if name == b"content-length":
            refuse_declared_oversize(value, limit)
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect  # a part of a body is not a request
        chunk: bytes = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"the request body passes the limit of {limit} bytes")
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def openapi_paths() -> dict[str, Any]:
    """The OpenAPI entries of the operations served here, built from their msgspec structs."""
    paths: dict[str, Any] = {}
    for verb, op in OPERATIONS.items():
        responses = json_response_doc(op.response, op.status, "Success")
        responses.update(problem_docs(*_PROBLEMS.get(verb, _COMMON_PROBLEMS)))
        paths[f"{_PREFIX}{{channel}}/{verb}"] = {
            "post": {
                "tags": ["messages"],
                "summary": op.summary,
                "description": op.description,
                "operationId": f"{verb}_messages",
                "parameters": [
                    {"name": "channel", "in": "path", "required": True, "schema": _CHANNEL}
                ],
                **json_body_doc(op.request, op.body_required),
                "responses": {str(k): v for k, v in responses.items()},
            }
        }
    return paths


# What a message operation can answer besides success (and 401 with a token); `default`
# covers the rest. Only enqueue can find a channel full.
_COMMON_PROBLEMS = (400, 413, 422, 503)
_PROBLEMS = {"enqueue": (400, 413, 422, 429, 503)}
_CHANNEL = {"type": "string", "pattern": CHANNEL_NAME_PATTERN}
