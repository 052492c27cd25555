"""The hot path: enqueue, dequeue, ack, nack and extend, with their schemas."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Annotated

import msgspec
from fastapi import APIRouter, Request
from starlette.responses import Response
from starlette.types import Receive

from app.api.codec import decode, json_body_doc, json_response_doc, read_body
from app.api.deps import Node, channel_name, node
from app.engine.ids import receipt
from app.engine.queue import MAX_DELAY_MS, NewMessage, Outcome
from app.errors import InvalidInput, PayloadTooLarge
from app.models import Lease

router = APIRouter(prefix="/channels/{channel}", tags=["messages"])

Receipt = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
Receipts = Annotated[list[Receipt], msgspec.Meta(min_length=1)]
Visibility = Annotated[int, msgspec.Meta(ge=1000, le=43_200_000)]


class EnqueueRequest(msgspec.Struct, forbid_unknown_fields=True):
    messages: Annotated[list[NewMessage], msgspec.Meta(min_length=1)]


class EnqueueResponse(msgspec.Struct):
    ids: list[str]


class DequeueRequest(msgspec.Struct, forbid_unknown_fields=True):
    max: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 1
    wait_ms: Annotated[int, msgspec.Meta(ge=0, le=30_000)] = 0
    visibility_ms: Visibility | None = None


class Delivered(msgspec.Struct):
    id: str
    body: msgspec.Raw
    headers: msgspec.Raw
    receipt: str
    attempt: int
    enqueued_at: int


class DequeueResponse(msgspec.Struct):
    messages: list[Delivered]


class AckRequest(msgspec.Struct, forbid_unknown_fields=True):
    receipts: Receipts


class AckResponse(msgspec.Struct):
    acked: int
    stale: list[str]


class NackRequest(msgspec.Struct, forbid_unknown_fields=True):
    receipts: Receipts
    delay_ms: Annotated[int, msgspec.Meta(ge=0, le=MAX_DELAY_MS)] = 0
    dead_letter: bool = False


class NackResponse(msgspec.Struct):
    nacked: int
    stale: list[str]


class ExtendRequest(msgspec.Struct, forbid_unknown_fields=True):
    receipts: Receipts
    visibility_ms: Visibility


class ExtendResponse(msgspec.Struct):
    extended: int
    stale: list[str]


SCHEMAS: list[type[msgspec.Struct]] = [
    EnqueueRequest,
    EnqueueResponse,
    DequeueRequest,
    DequeueResponse,
    AckRequest,
    AckResponse,
    NackRequest,
    NackResponse,
    ExtendRequest,
    ExtendResponse,
]

_enqueue = msgspec.json.Decoder(EnqueueRequest)
_dequeue = msgspec.json.Decoder(DequeueRequest)
_ack = msgspec.json.Decoder(AckRequest)
_nack = msgspec.json.Decoder(NackRequest)
_extend = msgspec.json.Decoder(ExtendRequest)
_encoder = msgspec.json.Encoder()
_NO_HEADERS = msgspec.Raw(b"{}")


def _json(value: msgspec.Struct, status: int = 200) -> Response:
    return Response(_encoder.encode(value), status_code=status, media_type="application/json")


@router.post(
    "/enqueue",
    status_code=201,
    summary="Enqueue a batch of messages",
    description="All or nothing: 201 only once every message of the batch is durable.",
    openapi_extra=json_body_doc(EnqueueRequest),
    responses=json_response_doc(EnqueueResponse, 201, "The ids, one per message, in order"),
)
async def enqueue(channel: str, request: Request) -> Response:
    n = node(request)
    name = channel_name(channel)
    req = decode(await read_body(request, n.settings.max_request_bytes), _enqueue)
    _check_batch(n, req.messages)
    ids = await n.engine.enqueue(name, req.messages)
    return _json(EnqueueResponse(ids=[str(i) for i in ids]), 201)


def _check_batch(n: Node, messages: list[NewMessage]) -> None:
    limit = n.settings.max_batch
    if len(messages) > limit:
        raise PayloadTooLarge(f"the batch has {len(messages)} messages; MAX_BATCH is {limit}")
    most = n.settings.max_message_bytes
    for i, m in enumerate(messages):
        size = len(m.body)
        if m.headers:
            size += sum(len(k) + len(v) for k, v in m.headers.items())
        if size > most:
            raise PayloadTooLarge(
                f"message {i} is {size} bytes with its headers; MAX_MESSAGE_BYTES is {most}"
            )


@router.post(
    "/dequeue",
    summary="Lease up to `max` ready messages, waiting up to `wait_ms` for one",
    openapi_extra=json_body_doc(DequeueRequest, required=False),
    responses=json_response_doc(DequeueResponse, 200, "The leased messages (maybe none)"),
)
async def dequeue(channel: str, request: Request) -> Response:
    n = node(request)
    name = channel_name(channel)
    body = await read_body(request, 4096)
    req = decode(body, _dequeue) if body.strip() else DequeueRequest()
    engine = n.engine
    if req.wait_ms == 0:
        leases = await engine.dequeue(name, req.max, 0, req.visibility_ms)
    else:
        leases = await _long_poll(n, name, req, request.receive)
    return _json(DequeueResponse(messages=[_delivered(lease) for lease in leases]))


async def _long_poll(n: Node, name: str, req: DequeueRequest, receive: Receive) -> list[Lease]:
    """Wait for messages, but stop waiting when the consumer hangs up: never lease to no one."""
    poll = asyncio.ensure_future(n.engine.dequeue(name, req.max, req.wait_ms, req.visibility_ms))
    gone = asyncio.ensure_future(_disconnected(receive))
    try:
        await asyncio.wait((poll, gone), return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if poll.done():
        return poll.result()
    poll.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        leases = await poll
        # Leased in the instant the consumer left: hand them straight back.
        if leases:
            receipts = [receipt(lease.message.id, lease.attempt) for lease in leases]
            await n.engine.nack(name, receipts, 0, False)
    return []


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


def _delivered(lease: Lease) -> Delivered:
    m = lease.message
    return Delivered(
        id=str(m.id),
        body=msgspec.Raw(m.body),
        headers=msgspec.Raw(m.headers) if m.headers else _NO_HEADERS,
        receipt=receipt(m.id, lease.attempt),
        attempt=lease.attempt,
        enqueued_at=m.enqueued_at,
    )


def _check_receipts(n: Node, receipts: list[str]) -> list[str]:
    if len(receipts) > n.settings.max_batch:
        raise InvalidInput(f"{len(receipts)} receipts; at most MAX_BATCH={n.settings.max_batch}")
    return receipts


@router.post(
    "/ack",
    summary="Acknowledge deliveries: those messages are gone for good",
    openapi_extra=json_body_doc(AckRequest),
    responses=json_response_doc(AckResponse, 200, "How many were acked; receipts without a lease"),
)
async def ack(channel: str, request: Request) -> Response:
    n = node(request)
    name = channel_name(channel)
    req = decode(await read_body(request, n.settings.max_request_bytes), _ack)
    out: Outcome = await n.engine.ack(name, _check_receipts(n, req.receipts))
    return _json(AckResponse(acked=out.done, stale=out.stale))


@router.post(
    "/nack",
    summary="Give deliveries back: ready again (after delay_ms) or dead-lettered",
    openapi_extra=json_body_doc(NackRequest),
    responses=json_response_doc(
        NackResponse, 200, "How many were nacked; receipts without a lease"
    ),
)
async def nack(channel: str, request: Request) -> Response:
    n = node(request)
    name = channel_name(channel)
    req = decode(await read_body(request, n.settings.max_request_bytes), _nack)
    receipts = _check_receipts(n, req.receipts)
    out = await n.engine.nack(name, receipts, req.delay_ms, req.dead_letter)
    return _json(NackResponse(nacked=out.done, stale=out.stale))


@router.post(
    "/extend",
    summary="Extend leases: they now end visibility_ms from now",
    openapi_extra=json_body_doc(ExtendRequest),
    responses=json_response_doc(ExtendResponse, 200, "How many were extended; stale receipts"),
)
async def extend(channel: str, request: Request) -> Response:
    n = node(request)
    name = channel_name(channel)
    req = decode(await read_body(request, n.settings.max_request_bytes), _extend)
    receipts = _check_receipts(n, req.receipts)
    out = await n.engine.extend(name, receipts, req.visibility_ms)
    return _json(ExtendResponse(extended=out.done, stale=out.stale))
