"""Request bodies decoded and validated by msgspec (fast, batch-friendly), documented in OpenAPI.

FastAPI's own body handling would build a pydantic object per message; on the hot path the node
decodes the raw bytes straight into msgspec structs and leaves message bodies unparsed.
"""

from __future__ import annotations

import re
from typing import Any, TypeVar

import msgspec
from fastapi import FastAPI
from starlette.requests import Request
from starlette.responses import Response

from app.api.problems import PROBLEM_JSON
from app.errors import InvalidInput, MalformedRequest, PayloadTooLarge

T = TypeVar("T")

_REF = "#/components/schemas/{name}"


_response_encoder = msgspec.json.Encoder()


def json_response(value: object, status: int = 200) -> Response:
    """`value` (a msgspec struct, or builtins) as a JSON response: one encoder for every
    ordinary route (the hot path encodes its own answers, app/api/messages.py)."""
    return Response(_response_encoder.encode(value), status, media_type="application/json")


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


# How deep a message body may nest arrays and objects. Bodies are stored as sent and handed to
# every consumer, so they must parse with strict parsers' defaults too (.NET's is 64, serde_json's
# 128); deeper JSON would also exhaust msgspec's recursion before any limit of ours applied.
MAX_JSON_DEPTH = 64
_DEPTH_DETAIL = f"the JSON nests deeper than MAX_JSON_DEPTH ({MAX_JSON_DEPTH}) arrays and objects"
# Each level costs at least two bytes ("[]"): JSON this short cannot be too deep. Callers test it
# inline, before calling `check_depth`, which keeps the per-message cost one comparison.
SHALLOW_JSON_BYTES = 2 * MAX_JSON_DEPTH + 1
# A number no consumer can parse (msgspec and most JSON libraries refuse 1e400 or 10**5000)
# would be stored, and then fail every dequeue batch that holds it. It needs a three-digit
# exponent or a run of 200 or more digits (a double ends near 1.8e308, Python's int parsing at
# 4300 digits). Two C-speed scans find every such number (and a few harmless look-alikes, in
# strings too): only those requests are parsed in full.
# One C-speed pass maps every digit to 9 and E to e and drops "+": a three-digit exponent then
# reads "9e999", a long number a run of nines. A look-alike (in a string, say) costs one full
# parse, which refuses nothing valid.
_NUMBER_SHAPES = bytes.maketrans(b"0123456789E", b"9999999999e")
_BIG_EXPONENT = b"9e999"
_LONG_DIGIT_RUN = b"9" * 200
_HUGE_DETAIL = "a number no JSON consumer could parse; send it as a string"
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')
_BRACKETS = bytes.maketrans(b"[]{}", b"()()")
_NOT_BRACKETS = bytes(set(range(256)) - set(b"[]{}"))


def decode(data: bytes, decoder: msgspec.json.Decoder[T]) -> T:
    """Decode and validate a request body: 400 unless it is JSON in UTF-8, 422 unless it fits the
    schema. msgspec checks that a string it decodes is UTF-8 (raising UnicodeDecodeError, not
    DecodeError) but passes raw values (message bodies) unchecked, so the whole body is checked
    once here; escaped lone surrogates ("\\ud800") msgspec refuses anywhere, bodies included.
    Numbers in raw values are not checked either: one that may be out of range (see
    _NUMBER_SHAPES) has the whole body parsed once more, which refuses it as it would a field."""
    if not data.isascii():
        try:
            data.decode()
        except UnicodeDecodeError as exc:
            raise MalformedRequest(
                f"the body is not valid UTF-8 (byte {exc.start}); JSON must be sent in UTF-8"
            ) from None
    try:
        value = decoder.decode(data)
    except msgspec.ValidationError as exc:
        raise InvalidInput(str(exc)) from None
    except msgspec.DecodeError as exc:
        raise MalformedRequest(f"the body is not valid JSON: {exc}") from None
    except RecursionError:
        raise InvalidInput(_DEPTH_DETAIL) from None
    shapes = data.translate(_NUMBER_SHAPES, b"+")
    if _BIG_EXPONENT in shapes or _LONG_DIGIT_RUN in shapes:
        _refuse_huge_numbers(data)
    return value


def _refuse_huge_numbers(data: bytes) -> None:
    """Parse all of `data` (valid JSON), raw values included: 422 for a number out of range."""
    try:
        msgspec.json.decode(data)
    except msgspec.DecodeError as exc:
        raise InvalidInput(f"{exc}: {_HUGE_DETAIL}") from None
    except RecursionError:
        raise InvalidInput(_DEPTH_DETAIL) from None


def check_depth(value: bytes) -> None:
    """Refuse a JSON value (already known to be valid) nested deeper than MAX_JSON_DEPTH.

    Most values are settled by their length (see SHALLOW_JSON_BYTES) or their count of brackets;
    only a value with many of them is measured: strings dropped, brackets kept, innermost pairs
    removed level by level (each pass one C-speed scan of what is left)."""
    if value.count(b"[") + value.count(b"{") <= MAX_JSON_DEPTH:
        return
    if b"\\" in value:  # an escaped quote may hide in a string: find strings by the grammar
        value = _STRING.sub(b"", value)
    elif b'"' in value:  # every other quote opens or closes a string
        value = b"".join(value.split(b'"')[::2])
    nest = value.translate(_BRACKETS, _NOT_BRACKETS)
    for _ in range(MAX_JSON_DEPTH):
        if not nest:
            return
        nest = nest.replace(b"()", b"")
    if nest:
        raise InvalidInput(_DEPTH_DETAIL)


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
