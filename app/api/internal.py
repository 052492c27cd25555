"""Node-to-node routes of the mirror, authenticated by the cluster secret (not the API token):
`POST /cluster/internal/heartbeat` (a backup takes an owner's deltas) and
`GET /cluster/internal/shards/{shard}/snapshot` (an owner gives a resyncing backup its image).

The lifespan puts the parts on `app.state.mirroring` (a `Mirroring`); the router is built with
the secret: `app.include_router(internal.router(settings.cluster_secret))`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import msgspec
from fastapi import APIRouter, Depends, Request
from starlette.responses import Response

from app.api.auth import check_cluster_secret
from app.api.codec import json_response, read_body
from app.cluster.heartbeat import HEARTBEAT_PATH, HeartbeatSender
from app.cluster.journal import Heartbeat
from app.cluster.mirror import Follower, snapshot_path
from app.errors import Forbidden, MalformedRequest, NotReady
from app.settings import CLUSTER_SECRET_HEADER


@dataclass(slots=True)
class Mirroring:
    """What the internal routes serve: the backup side and the owner side."""

    follower: Follower
    sender: HeartbeatSender
    # Why this node takes no heartbeat of (shard, owner URL), or None when it backs the shard up
    # and the owner is a member of it: a heartbeat makes this node fetch a snapshot from the
    # owner it names and send the secret there, and holds off its failover.
    refuses: Callable[[str, str], str | None]
    max_bytes: int  # the largest heartbeat body (MAX_REQUEST_BYTES)


_heartbeat_decoder = msgspec.json.Decoder(Heartbeat)


def _mirroring(request: Request) -> Mirroring:
    parts: Mirroring | None = getattr(request.app.state, "mirroring", None)
    if parts is None:
        raise NotReady("the node is starting: its cluster parts are not up yet")
    return parts


def router(secret: str) -> APIRouter:
    def authenticated(request: Request) -> None:
        check_cluster_secret(secret, request.headers.get(CLUSTER_SECRET_HEADER))

    r = APIRouter(include_in_schema=False, dependencies=[Depends(authenticated)])

    @r.post(HEARTBEAT_PATH)
    async def heartbeat(request: Request) -> Response:
        parts = _mirroring(request)
        try:
            hb = _heartbeat_decoder.decode(await read_body(request, parts.max_bytes))
        except msgspec.DecodeError as exc:
            raise MalformedRequest(f"heartbeat: {exc}") from exc
        refusal = parts.refuses(hb.shard, hb.owner_url)
        if refusal is not None:
            raise Forbidden(refusal)
        answer = parts.follower.heartbeat(hb)
        return json_response(answer)

    @r.get(snapshot_path("{shard}"))
    async def snapshot(shard: str, request: Request) -> Response:
        snap = _mirroring(request).sender.snapshot(shard)
        return json_response(snap)

    return r


__all__ = ["Mirroring", "router"]
