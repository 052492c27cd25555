"""Looking at a channel's messages without consuming them, and redriving them.

`GET /channels/{channel}/messages` pages through messages by id (leasing nothing), `GET
/channels/{channel}/messages/{id}` shows one, and `POST /channels/{channel}/redrive` moves ready
messages back to where they were dead-lettered from (or to a channel named). All three live under
`/channels/{channel}/`, so on a cluster the Forwarder sends them to the channel's owner.
"""

from __future__ import annotations

from typing import Annotated, TypeVar

import msgspec
from fastapi import APIRouter, Request
from starlette.responses import Response

from app.api.channels import ChannelName
from app.api.codec import (
    decode,
    json_body_doc,
    json_response,
    json_response_doc,
    problem_docs,
    read_body,
)
from app.api.deps import channel_name, node
from app.engine import redrive as engine_redrive
from app.errors import InvalidInput, MessageNotFound
from app.models import Event, Message
from app.store.base import MESSAGE_STATES, MessageState, state_of

router = APIRouter(prefix="/channels", tags=["browse"])

_MAX_ID = 2**63 - 1


class MessageView(msgspec.Struct):
    """A message as the store holds it. `available_at` is when a delayed message falls due,
    `lease_deadline` when an in-flight one's lease ends (null otherwise)."""

    id: str
    state: MessageState
    body: msgspec.Raw
    headers: msgspec.Raw | None
    attempt: int
    enqueued_at: int
    available_at: int | None
    lease_deadline: int | None
    expires_at: int | None


class MessageDetail(MessageView):
    """One message; `history` lists what happened to it, oldest first (its last 100 events:
    `{"at": ms, "event": ..., details}`, see README), when its channel traces or it carries a
    history from one that did (a dead letter); else null."""

    history: list[Event] | None = None


class MessagePage(msgspec.Struct):
    """`next` is the `after` to ask for the next page; null when no message lies past this one.
    A page may be short (even empty) with a `next`: a page filtered by state examines at most
    10,000 messages of the channel, and a page ends once its bodies and headers reach 8 MB."""

    channel: str
    messages: list[MessageView]
    next: str | None


class RedriveRequest(msgspec.Struct, forbid_unknown_fields=True):
    """`to` null: each message back to the channel its `x-dead-letter-channel` header names.
    `rate` in messages per second (null: as fast as the store goes)."""

    to: ChannelName | None = None
    max: Annotated[int, msgspec.Meta(ge=1, le=engine_redrive.MAX_REDRIVE)] = (
        engine_redrive.DEFAULT_REDRIVE
    )
    rate: Annotated[float, msgspec.Meta(gt=0, le=1_000_000)] | None = None


class RedriveResponse(msgspec.Struct):
    """`remaining`: ready messages left in the channel (call again while it is not 0 and the
    last call moved some). A call works for at most 5 s, so `moved` may be below `max`."""

    moved: int
    skipped: int
    remaining: int


SCHEMAS: list[type[msgspec.Struct]] = [
    MessageView,
    MessageDetail,
    MessagePage,
    RedriveRequest,
    RedriveResponse,
]

_redrive = msgspec.json.Decoder(RedriveRequest)
_QUERY = frozenset({"state", "after", "limit"})
_STATES: dict[str, MessageState] = {state: state for state in MESSAGE_STATES}
V = TypeVar("V", bound=MessageView)


def _whole(text: str, most: int) -> int | None:
    """`text` as a whole number of ASCII digits up to `most`, else None. Its length is judged
    before `int()` reads it: a number of 4,300 digits or more would raise (a 500), and
    `isdigit()` alone also takes other scripts' digits (U+FF11 fullwidth one, '²')."""
    digits = (text.lstrip("0") or "0") if text.isascii() and text.isdigit() else ""
    if not digits or len(digits) > len(str(most)):
        return None
    value = int(digits)
    return value if value <= most else None


def message_id(text: str, what: str) -> int:
    """A message id as the API writes it (decimal digits), or 422 naming `what` it was."""
    value = _whole(text, _MAX_ID)
    if value is None:
        raise InvalidInput(f"{what} {text[:40]!r} is not a message id (a decimal number)")
    return value


def _view(m: Message, now: int, kind: type[V]) -> V:
    state = state_of(m, now)
    return kind(
        id=str(m.id),
        state=state,
        body=msgspec.Raw(m.body),
        headers=msgspec.Raw(m.headers) if m.headers else None,
        attempt=m.attempt,
        enqueued_at=m.enqueued_at,
        available_at=m.available_at if state == "delayed" else None,
        lease_deadline=m.available_at if state == "in_flight" else None,
        expires_at=m.expires_at,
    )


_STATE_PARAM = {"type": "string", "enum": list(MESSAGE_STATES)}
_PAGE_PARAMETERS = [
    {"name": "state", "in": "query", "required": False, "schema": _STATE_PARAM},
    {"name": "after", "in": "query", "required": False, "schema": {"type": "string"}},
    {
        "name": "limit",
        "in": "query",
        "required": False,
        "schema": {
            "type": "integer",
            "minimum": 1,
            "maximum": engine_redrive.MAX_PAGE,
            "default": engine_redrive.DEFAULT_PAGE,
        },
    },
]


@router.get(
    "/{channel}/messages",
    summary="Page through a channel's messages without leasing them",
    openapi_extra={"parameters": _PAGE_PARAMETERS},
    responses={
        **json_response_doc(MessagePage, 200, "A page of messages, in id order"),
        **problem_docs(404, 422, 503),
    },
)
async def list_messages(channel: str, request: Request) -> Response:
    n = node(request)
    name = channel_name(channel)
    query = request.query_params
    unknown = sorted(set(query) - _QUERY)
    if unknown:
        raise InvalidInput(
            f"unknown query parameter(s) {', '.join(unknown)}: use state, after, limit"
        )
    state: MessageState | None = None
    if "state" in query:
        state = _STATES.get(query["state"])
        if state is None:
            raise InvalidInput(
                f"state {query['state'][:40]!r} is not one of {', '.join(MESSAGE_STATES)}"
            )
    after = message_id(query["after"], "after") if "after" in query else 0
    limit_text = query.get("limit", str(engine_redrive.DEFAULT_PAGE))
    limit = _whole(limit_text, engine_redrive.MAX_PAGE)
    if not limit:
        raise InvalidInput(
            f"limit {limit_text[:40]!r} is not a whole number from 1 to {engine_redrive.MAX_PAGE}"
        )
    page = await engine_redrive.browse(n.engine, name, state, after, limit)
    now = n.clock.now_ms()
    views = [_view(m, now, MessageView) for m in page.messages]
    following = None if page.next is None else str(page.next)
    return json_response(MessagePage(channel=name, messages=views, next=following))


@router.get(
    "/{channel}/messages/{msg_id}",
    summary="One message of a channel, without leasing it",
    responses={
        **json_response_doc(MessageDetail, 200, "The message"),
        **problem_docs(404, 422, 503),
    },
)
async def get_message(channel: str, msg_id: str, request: Request) -> Response:
    n = node(request)
    name = channel_name(channel)
    wanted = message_id(msg_id, "message id")
    found = await engine_redrive.get_message(n.engine, name, wanted)
    if found is None:
        raise MessageNotFound(f"channel {name!r} holds no message {wanted} (acked, moved or never)")
    detail = _view(found, n.clock.now_ms(), MessageDetail)
    # Read after the message: an event recorded in between shows too (gone meanwhile: none).
    events = await n.engine.history(name, wanted)
    traced = n.engine.get(name).config.trace
    detail.history = events if events else ([] if traced else None)
    return json_response(detail)


@router.post(
    "/{channel}/redrive",
    summary="Move ready messages back from a dead-letter channel (or to a channel named)",
    openapi_extra=json_body_doc(RedriveRequest, required=False),
    responses={
        **json_response_doc(RedriveResponse, 200, "How many moved, were skipped, remain"),
        **problem_docs(400, 404, 413, 422, 503),
    },
)
async def redrive(channel: str, request: Request) -> Response:
    n = node(request)
    name = channel_name(channel)
    body = await read_body(request, 4096)
    req = decode(body, _redrive) if body.strip() else RedriveRequest()
    to = None if req.to is None else channel_name(req.to)
    done = await engine_redrive.redrive(n.engine, name, to, req.max, req.rate)
    return json_response(
        RedriveResponse(moved=done.moved, skipped=done.skipped, remaining=done.remaining)
    )
