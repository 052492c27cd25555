"""Request bodies decoded and validated by msgspec (fast, batch-friendly), documented in OpenAPI.

FastAPI's own body handling would build a pydantic object per message; on the hot path the node
decodes the raw bytes straight into msgspec structs and leaves message bodies unparsed.
"""

from __future__ import annotations

from typing import Any, TypeVar

import msgspec
from fastapi import FastAPI
from starlette.requests import Request

from app.api.problems import PROBLEM_JSON
from app.errors import InvalidInput, MalformedRequest, PayloadTooLarge

T = TypeVar("T")

_REF = "#/components/schemas/{name}"


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it passes `limit` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"the request body is {declared} bytes; the limit is {limit}")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"the request body passes the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def decode(data: bytes, decoder: msgspec.json.Decoder[T]) -> T:
    try:
        return decoder.decode(data)
    except msgspec.ValidationError as exc:
        raise InvalidInput(str(exc)) from None
    except msgspec.DecodeError as exc:
        raise MalformedRequest(f"the body is not valid JSON: {exc}") from None


def json_response_doc(model: type[Any], status: int, description: str) -> dict[int | str, Any]:
    return {
        status: {
            "description": description,
            "content": {"application/json": {"schema": {"$ref": _REF.format(name=model.__name__)}}},
        }
    }


_PROBLEM = {PROBLEM_JSON: {"schema": {"$ref": _REF.format(name="Problem")}}}
PROBLEMS: dict[int, str] = {
    400: "Malformed JSON, or a malformed receipt",
    401: "The bearer token is missing or wrong (only on a node with API_TOKEN)",
    404: "No such channel",
    413: "A message, the batch or the request body is too large",
    422: "A field or the channel name is invalid",
    429: "The channel is full (its max_length)",
    503: "The store is unavailable: nothing was changed, try again",
}
_DEFAULT_PROBLEM = {
    "description": (
        "Any other error, as problem details: 403 a cross-site browser request or a Host the"
        " node does not serve, 415 a body that is not JSON, 500 an unexpected error (logged)"
    ),
    "content": _PROBLEM,
}


def problem_docs(*statuses: int) -> dict[int | str, Any]:
    """The problem responses of a route: the statuses it answers for bad input or a failing
    store, each as application/problem+json, and `default` for the rest. 401 is added by
    `install_schemas` where a token is required."""
    docs: dict[int | str, Any] = {
        status: {"description": PROBLEMS[status], "content": _PROBLEM} for status in statuses
    }
    docs["default"] = _DEFAULT_PROBLEM
    return docs


def json_body_doc(model: type[Any], required: bool = True) -> dict[str, Any]:
    return {
        "requestBody": {
            "required": required,
            "content": {"application/json": {"schema": {"$ref": _REF.format(name=model.__name__)}}},
        }
    }


def install_schemas(
    app: FastAPI,
    models: list[type[Any]],
    paths: dict[str, Any] | None = None,
    *,
    open_paths: frozenset[str] | None = None,
) -> None:
    """Merge the msgspec models' JSON schemas (and paths not routed by FastAPI) into OpenAPI.

    `open_paths` is None on a node without API_TOKEN: nothing needs a token. Otherwise every
    operation but those paths requires the bearer token and documents its 401."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = generate()
        schema["paths"] = {**(paths or {}), **schema.get("paths", {})}
        _, components = msgspec.json.schema_components(models, ref_template=_REF)
        schema.setdefault("components", {}).setdefault("schemas", {}).update(components)
        if open_paths is not None:
            schema["components"]["securitySchemes"] = {
                "bearer": {"type": "http", "scheme": "bearer", "description": "API_TOKEN"}
            }
            schema["security"] = [{"bearer": []}]
            for path, operations in schema["paths"].items():
                for operation in operations.values():
                    if path in open_paths:
                        operation["security"] = []
                    else:
                        responses = operation["responses"]
                        responses["401"] = {"description": PROBLEMS[401], "content": _PROBLEM}
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
