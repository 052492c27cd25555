"""The hot path: enqueue, dequeue, ack, nack and extend, with their schemas.

Each operation is a plain function from (node, channel, body) to (status, JSON bytes); `hotpath`
serves them straight from ASGI and `OPERATIONS` documents them in the OpenAPI schema.
"""

from __future__ import annotations

import asyncio
import functools
import operator
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated

import msgspec
from starlette.types import Receive, Scope

from app.api.codec import SHALLOW_JSON_BYTES, check_depth, decode
from app.api.consumer import consumer_of
from app.api.deps import Node, channel_name
from app.engine.queue import MAX_DELAY_MS, Consumer, NewMessage, Outcome
from app.errors import PayloadTooLarge
from app.models import Lease

Receipt = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
Receipts = Annotated[list[Receipt], msgspec.Meta(min_length=1)]
Visibility = Annotated[int, msgspec.Meta(ge=1000, le=43_200_000)]
# The longest long poll a dequeue may ask for (a forwarding node waits at least this long).
MAX_WAIT_MS = 30_000


class EnqueueRequest(msgspec.Struct, forbid_unknown_fields=True):
    messages: Annotated[list[NewMessage], msgspec.Meta(min_length=1)]


class EnqueueResponse(msgspec.Struct):
    ids: list[str]


class DequeueRequest(msgspec.Struct, forbid_unknown_fields=True):
    max: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 1
    wait_ms: Annotated[int, msgspec.Meta(ge=0, le=MAX_WAIT_MS)] = 0
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


_enqueue = msgspec.json.Decoder(EnqueueRequest)
_dequeue = msgspec.json.Decoder(DequeueRequest)
_ack = msgspec.json.Decoder(AckRequest)
_nack = msgspec.json.Decoder(NackRequest)
_extend = msgspec.json.Decoder(ExtendRequest)
_encoder = msgspec.json.Encoder()
_NO_HEADERS = msgspec.Raw(b"{}")

Reply = tuple[int, bytes]
_BODY = operator.attrgetter("body")
_HEADERS = operator.attrgetter("headers")


async def enqueue(
    n: Node, channel: str, body: bytes, receive: Receive, scope: Scope | None = None
) -> Reply:
    name = channel_name(channel)
    req = decode(body, _enqueue)
    _check_batch(n, req.messages)
    ids = await n.engine.enqueue(name, req.messages)
    return 201, _encoder.encode(EnqueueResponse(ids=[str(i) for i in ids]))


def _check_batch(n: Node, messages: list[NewMessage]) -> None:
    limit = n.settings.max_batch
    if len(messages) > limit:
        raise PayloadTooLarge(f"the batch has {len(messages)} messages; MAX_BATCH is {limit}")
    most = n.settings.max_message_bytes
    # The usual batch (small bodies, no headers) is settled at C speed, with no loop of ours.
    largest = max(map(len, map(_BODY, messages)))
    if largest <= min(most, SHALLOW_JSON_BYTES) and not any(map(_HEADERS, messages)):
        return
    for i, m in enumerate(messages):
        size = len(m.body)
        if size > SHALLOW_JSON_BYTES:
            check_depth(bytes(m.body))
        if m.headers:
            size += sum(len(k) + len(v) for k, v in m.headers.items())
        if size > most:
            raise PayloadTooLarge(
                f"message {i} is {size} bytes with its headers; MAX_MESSAGE_BYTES is {most}"
            )


async def dequeue(
    n: Node, channel: str, body: bytes, receive: Receive, scope: Scope | None = None
) -> Reply:
    name = channel_name(channel)
    req = decode(body, _dequeue) if body.strip() else DequeueRequest()
    # Who asks, worked out only if the channel traces (a partial is all this costs otherwise).
    consumer = None
    if scope is not None:
        consumer = functools.partial(consumer_of, scope, n.settings.cluster_secret)
    if req.wait_ms == 0:
        leases = await n.engine.dequeue(name, req.max, 0, req.visibility_ms, consumer)
    else:
        leases = await _long_poll(n, name, req, receive, consumer)
    sign = n.receipts.sign
    delivered = [_delivered(lease, sign(name, lease.message.id, lease.attempt)) for lease in leases]
    return 200, _encoder.encode(DequeueResponse(messages=delivered))


async def _long_poll(
    n: Node, name: str, req: DequeueRequest, receive: Receive, consumer: Consumer | None
) -> list[Lease]:
    """Wait for messages, but stop waiting when the consumer hangs up: never lease to no one."""
    poll = asyncio.ensure_future(
        n.engine.dequeue(name, req.max, req.wait_ms, req.visibility_ms, consumer)
    )
    gone = asyncio.ensure_future(_disconnected(receive))
    try:
        await asyncio.wait((poll, gone), return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        # Stop polling, whether the consumer left or this request was cancelled (a no-op if
        # the poll is done); a poll cancelled mid-lease gives that lease back itself.
        poll.cancel()
    if not gone.done() or gone.cancelled():
        return poll.result()
    # The consumer left. A poll that finished in the same instant holds leases no one will
    # see: they go back, attempt and all.
    await asyncio.wait((poll,))  # unlike `await poll`, a cancellation of ours is not swallowed
    if not poll.cancelled():
        await n.engine.give_back(name, poll.result())
    return []


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


def _delivered(lease: Lease, signed: str) -> Delivered:
    m = lease.message
    return Delivered(
        id=str(m.id),
        body=msgspec.Raw(m.body),
        headers=msgspec.Raw(m.headers) if m.headers else _NO_HEADERS,
        receipt=signed,
        attempt=lease.attempt,
        enqueued_at=m.enqueued_at,
    )


def _check_receipts(n: Node, channel: str, receipts: list[str]) -> list[str]:
    """Receipts of an ack, nack or extend: at most MAX_BATCH, each one issued for `channel`."""
    if len(receipts) > n.settings.max_batch:
        raise PayloadTooLarge(
            f"the batch has {len(receipts)} receipts; MAX_BATCH is {n.settings.max_batch}"
        )
    n.receipts.check(channel, receipts)
    return receipts


async def ack(
    n: Node, channel: str, body: bytes, receive: Receive, scope: Scope | None = None
) -> Reply:
    name = channel_name(channel)
    req = decode(body, _ack)
    out: Outcome = await n.engine.ack(name, _check_receipts(n, name, req.receipts))
    return 200, _encoder.encode(AckResponse(acked=out.done, stale=out.stale))


async def nack(
    n: Node, channel: str, body: bytes, receive: Receive, scope: Scope | None = None
) -> Reply:
    name = channel_name(channel)
    req = decode(body, _nack)
    receipts = _check_receipts(n, name, req.receipts)
    out = await n.engine.nack(name, receipts, req.delay_ms, req.dead_letter)
    return 200, _encoder.encode(NackResponse(nacked=out.done, stale=out.stale))


async def extend(
    n: Node, channel: str, body: bytes, receive: Receive, scope: Scope | None = None
) -> Reply:
    name = channel_name(channel)
    req = decode(body, _extend)
    receipts = _check_receipts(n, name, req.receipts)
    out = await n.engine.extend(name, receipts, req.visibility_ms)
    return 200, _encoder.encode(ExtendResponse(extended=out.done, stale=out.stale))


@dataclass(frozen=True, slots=True)
class Operation:
    handler: Callable[[Node, str, bytes, Receive, Scope], Awaitable[Reply]]
    summary: str
    request: type[msgspec.Struct]
    response: type[msgspec.Struct]
    status: int = 200
    body_required: bool = True
    description: str = ""


OPERATIONS: dict[str, Operation] = {
    "enqueue": Operation(
        enqueue,
        "Enqueue a batch of messages",
        EnqueueRequest,
        EnqueueResponse,
        201,
        description="All or nothing: 201 only once every message of the batch is durable.",
    ),
    "dequeue": Operation(
        dequeue,
        "Lease up to `max` ready messages, waiting up to `wait_ms` for one",
        DequeueRequest,
        DequeueResponse,
        body_required=False,
    ),
    "ack": Operation(
        ack, "Acknowledge deliveries: those messages are gone for good", AckRequest, AckResponse
    ),
    "nack": Operation(
        nack,
        "Give deliveries back: ready again (after delay_ms) or dead-lettered",
        NackRequest,
        NackResponse,
    ),
    "extend": Operation(
        extend, "Extend leases: they now end visibility_ms from now", ExtendRequest, ExtendResponse
    ),
}

SCHEMAS: list[type[msgspec.Struct]] = [
    t for op in OPERATIONS.values() for t in (op.request, op.response)
]
