"""Request bodies decoded and validated by msgspec (fast, batch-friendly), documented in OpenAPI.

FastAPI's own body handling would build a pydantic object per message; on the hot path the node
decodes the raw bytes straight into msgspec structs and leaves message bodies unparsed.
"""

from __future__ import annotations

from typing import Any, TypeVar

import msgspec
from fastapi import FastAPI
from starlette.requests import Request

from app.errors import InvalidInput, MalformedRequest, PayloadTooLarge

T = TypeVar("T")

_REF = "#/components/schemas/{name}"


def refuse_declared_oversize(content_length: bytes | str | None, limit: int) -> None:
    """413 up front for a body whose `Content-Length` already passes `limit`: nothing is read
    (or awaited) first. Every body reader calls this before its first `receive`."""
    if content_length is not None and content_length.isdigit() and int(content_length) > limit:
        size = content_length.decode() if isinstance(content_length, bytes) else content_length
        raise PayloadTooLarge(f"the request body is {size} bytes; the limit is {limit}")


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it passes `limit` bytes."""
    refuse_declared_oversize(request.headers.get("content-length"), limit)
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


def json_body_doc(model: type[Any], required: bool = True) -> dict[str, Any]:
    return {
        "requestBody": {
            "required": required,
            "content": {"application/json": {"schema": {"$ref": _REF.format(name=model.__name__)}}},
        }
    }


def install_schemas(
    app: FastAPI, models: list[type[Any]], paths: dict[str, Any] | None = None
) -> None:
    """Merge the msgspec models' JSON schemas (and paths not routed by FastAPI) into OpenAPI."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = generate()
        schema["paths"] = {**(paths or {}), **schema.get("paths", {})}
        _, components = msgspec.json.schema_components(models, ref_template=_REF)
        schema.setdefault("components", {}).setdefault("schemas", {}).update(components)
        schema["components"].setdefault("securitySchemes", {})["bearer"] = {
            "type": "http",
            "scheme": "bearer",
            "description": "API_TOKEN, when the node has one",
        }
        schema["security"] = [{"bearer": []}]
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
