"""Channel resources: settings, stats, purge and delete."""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
from fastapi import APIRouter, Request
from starlette.responses import Response

from app.api import forward
from app.api.auth import check_cluster_secret
from app.api.codec import (
    decode,
    json_body_doc,
    json_response,
    json_response_doc,
    problem_docs,
    read_body,
)
from app.api.deps import channel_name, node
from app.engine.channel import ChannelState
from app.engine.queue import MAX_TTL_MS
from app.models import CHANNEL_NAME_PATTERN, CHANNEL_NAME_RULE, valid_channel_name
from app.settings import CLUSTER_SECRET_HEADER

router = APIRouter(prefix="/channels", tags=["channels"])

# msgspec checks a `pattern` with re.search, where `$` matches before a trailing newline, so the
# pattern is documentation only and `__post_init__` checks the name with `valid_channel_name`.
ChannelName = Annotated[
    str,
    msgspec.Meta(min_length=1, max_length=128, extra_json_schema={"pattern": CHANNEL_NAME_PATTERN}),
]
MaxLength = Annotated[int, msgspec.Meta(ge=1, le=10**12)]
TimeToLive = Annotated[int, msgspec.Meta(ge=1, le=MAX_TTL_MS)]


class ChannelSettings(msgspec.Struct, forbid_unknown_fields=True):
    """Fields left out keep their current value (a new channel's: the node's defaults)."""

    visibility_ms: Annotated[int, msgspec.Meta(ge=1000, le=43_200_000)] | msgspec.UnsetType = (
        msgspec.UNSET
    )
    max_attempts: Annotated[int, msgspec.Meta(ge=1, le=1000)] | msgspec.UnsetType = msgspec.UNSET
    dead_letter: ChannelName | msgspec.UnsetType | None = msgspec.UNSET
    max_length: MaxLength | msgspec.UnsetType | None = msgspec.UNSET
    ttl_ms: TimeToLive | msgspec.UnsetType | None = msgspec.UNSET
    # Record each message's history (GET /channels/{channel}/messages/{id}); costs nothing off.
    trace: bool | msgspec.UnsetType = msgspec.UNSET

    def __post_init__(self) -> None:
        if isinstance(self.dead_letter, str) and not valid_channel_name(self.dead_letter):
            raise ValueError(f"dead_letter is not a channel name: use {CHANNEL_NAME_RULE}")


class Settings(msgspec.Struct):
    visibility_ms: int
    max_attempts: int
    dead_letter: str | None
    max_length: int | None
    ttl_ms: int | None
    trace: bool


class Counts(msgspec.Struct):
    ready: int
    delayed: int
    in_flight: int


class Totals(msgspec.Struct):
    """Counted since the node started."""

    enqueued: int
    dequeued: int
    acked: int
    nacked: int
    dead_lettered: int
    redelivered: int


class ChannelInfo(msgspec.Struct):
    name: str
    settings: Settings
    counts: Counts
    totals: Totals
    oldest_ready_age_ms: int | None


class ChannelList(msgspec.Struct):
    channels: list[ChannelInfo]


_list_decoder = msgspec.json.Decoder(ChannelList)


class Purged(msgspec.Struct):
    purged: int


SCHEMAS: list[type[msgspec.Struct]] = [ChannelSettings, ChannelInfo, ChannelList, Purged]

_settings = msgspec.json.Decoder(ChannelSettings)


def _info(ch: ChannelState, now: int) -> ChannelInfo:
    s = ch.stats(now)
    c = ch.config
    return ChannelInfo(
        name=ch.name,
        settings=Settings(
            c.visibility_ms, c.max_attempts, c.dead_letter, c.max_length, c.ttl_ms, c.trace
        ),
        counts=Counts(ready=s.ready, delayed=s.delayed, in_flight=s.in_flight),
        totals=Totals(s.enqueued, s.dequeued, s.acked, s.nacked, s.dead_lettered, s.redelivered),
        oldest_ready_age_ms=s.oldest_ready_age_ms,
    )


@router.get(
    "",
    summary="Every channel with its counts",
    responses={**json_response_doc(ChannelList, 200, "Every channel"), **problem_docs()},
)
async def list_channels(request: Request) -> Response:
    """This node's channels and, unless the request was forwarded here, every other owner's:
    the list of the whole cluster, or 503 naming the owner that did not answer."""
    n = node(request)
    now = n.clock.now_ms()
    mine = [_info(ch, now) for ch in n.engine.channels.values()]
    parts = forward.forwarding_of(request.app)
    rt = n.cluster
    if parts is None:
        return json_response(ChannelList(channels=sorted(mine, key=lambda c: c.name)))
    if forward.FORWARDED in request.headers:
        # A peer's fan-out gets this node's part alone; it proves itself with the cluster
        # secret. A client that sent the mark would take a part for the whole list, and
        # asking the others again would bounce between nodes whose secrets differ. Nodes of
        # an implicit shard may run without a secret: then nothing tells a peer from a client.
        secret = n.settings.cluster_secret
        if secret:
            check_cluster_secret(secret, request.headers.get(CLUSTER_SECRET_HEADER))
        return json_response(ChannelList(channels=sorted(mine, key=lambda c: c.name)))
    others = forward.owners_to_ask(rt.route_shard(s) for s in rt.keeper.shard_ids)
    lists = await forward.fan_out(
        parts.session,
        others,
        "/channels",
        _list_decoder,
        node_id=rt.node_id,
        secret=rt.secret,
        authorization=request.headers.get("authorization"),
    )
    merged = forward.merge_by_name(mine, *(answer.channels for answer in lists))
    return json_response(ChannelList(channels=merged))


@router.get(
    "/{channel}",
    summary="A channel's settings and counts",
    responses={
        **json_response_doc(ChannelInfo, 200, "Settings, counts and totals"),
        **problem_docs(404, 422),
    },
)
async def get_channel(channel: str, request: Request) -> Response:
    n = node(request)
    ch = n.engine.get(channel_name(channel))
    return json_response(_info(ch, n.clock.now_ms()))


@router.put(
    "/{channel}",
    summary="Create a channel or change its settings",
    openapi_extra=json_body_doc(ChannelSettings),
    responses={
        **json_response_doc(ChannelInfo, 200, "The channel as it now is"),
        **problem_docs(400, 413, 422, 503),
    },
)
async def put_channel(channel: str, request: Request) -> Response:
    n = node(request)
    name = channel_name(channel)
    body = await read_body(request, 4096)
    req = decode(body, _settings) if body.strip() else ChannelSettings()
    changes: dict[str, Any] = {
        field: value
        for field in ChannelSettings.__struct_fields__
        if (value := getattr(req, field)) is not msgspec.UNSET
    }
    ch = await n.engine.configure(name, changes)
    return json_response(_info(ch, n.clock.now_ms()))


@router.post(
    "/{channel}/purge",
    summary="Delete every message of the channel (in flight too); keep its settings",
    responses={
        **json_response_doc(Purged, 200, "How many messages were deleted"),
        **problem_docs(404, 422, 503),
    },
)
async def purge_channel(channel: str, request: Request) -> Response:
    n = node(request)
    return json_response(Purged(purged=await n.engine.purge(channel_name(channel))))


@router.delete(
    "/{channel}",
    status_code=204,
    summary="Delete the channel, its settings and its messages",
    response_class=Response,
    responses={204: {"description": "Deleted"}, **problem_docs(404, 422, 503)},
)
async def delete_channel(channel: str, request: Request) -> Response:
    n = node(request)
    await n.engine.delete_channel(channel_name(channel))
    return Response(status_code=204)
