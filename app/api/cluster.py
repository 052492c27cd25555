"""The cluster's endpoints: its view (GET /cluster), where a channel lives, set-nodes, and the
node-to-node routes under /cluster/internal/ (authenticated by CLUSTER_SECRET, not API_TOKEN).

Two credentials besides the API token, each checked here in constant time:
`Authorization: Bearer <ADMIN_TOKEN>` for PUT /cluster/nodes (cluster control), and
`X-LionMQ-Cluster-Secret: <CLUSTER_SECRET>` for /cluster/internal/... (app.api.auth leaves
these paths to this module, so a node with API_TOKEN still takes them).
"""

from __future__ import annotations

import asyncio
import hmac
from typing import Annotated

import httpx
import msgspec
from fastapi import APIRouter, Depends, Request
from lionmq.topology import (
    InvalidTopology,
    SetNodes,
    Topology,
    decode_topology,
    next_topology,
    normalize_url,
    validate_set_nodes,
)
from starlette.responses import Response

from app.api.auth import check_cluster_secret
from app.api.codec import decode, json_response, json_response_doc, problem_docs, read_body
from app.api.deps import Node, channel_name, node
from app.api.forward import FORWARDED
from app.cluster.decide import live, status_of
from app.cluster.handoff import Adopt, Adopted
from app.cluster.keeper import HandoffRecord, MemberDoc
from app.cluster.route import Local, Remote
from app.errors import (
    Forbidden,
    HandoffRefused,
    InvalidInput,
    OwnerUnreachable,
    ShardNotFound,
    StoreUnavailable,
    Unauthorized,
)
from app.settings import CLUSTER_SECRET_HEADER

router = APIRouter(prefix="/cluster", tags=["cluster"])

ADMIN_PATH = "/cluster/nodes"
INTERNAL_PREFIX = "/cluster/internal/"
_SWAP_TRIES = 5
_BODY_LIMIT = 1024 * 1024
# The new owner answers the old one's hand-off call once its channels are adopted, or after this.
_ADOPT_WAIT_S = 1.5


class NodeRef(msgspec.Struct):
    id: str
    url: str
    role: str


class ShardView(msgspec.Struct):
    id: str
    slot: int
    primary: str | None
    backups: list[str]
    owner: str | None
    owner_id: str | None
    epoch: int
    lease_expires_in_ms: int | None
    channels: int | None  # known where this node serves the shard


class NodeView(msgspec.Struct):
    url: str
    id: str | None
    role: str  # primary, backup, standalone or unassigned
    shards: list[str]
    status: str  # up, suspect or down
    heartbeat_age_ms: int | None
    lag: dict[str, int] | None
    applied_version: int | None


class ClusterView(msgspec.Struct):
    version: int
    node: NodeRef
    shards: list[ShardView]
    nodes: list[NodeView]
    # The latest hand-off any member reported (a rolling restart, POST .../handoff), or null.
    last_handoff: HandoffRecord | None = None


class RouteView(msgspec.Struct):
    channel: str
    shard: str
    owner: str | None


class Poke(msgspec.Struct, forbid_unknown_fields=True):
    channel: str


class Poked(msgspec.Struct):
    served: bool


class HandoffAsk(msgspec.Struct, forbid_unknown_fields=True):
    """POST /cluster/shards/{id}/handoff: to this backup (a topology URL), or null: the first
    up-to-date one."""

    to: str | None = None


SCHEMAS: list[type[msgspec.Struct]] = [ClusterView, RouteView, Poke, Poked]
_set_nodes_decoder = msgspec.json.Decoder(SetNodes)
_poke_decoder = msgspec.json.Decoder(Poke)
_handoff_decoder = msgspec.json.Decoder(HandoffAsk)
_adopt_decoder = msgspec.json.Decoder(Adopt)
# A hand-off asked of a node that does not own the shard is forwarded once to its owner, which
# answers within this (the hand-off itself takes well under a second).
_HANDOFF_FORWARD_S = 10.0


def cluster_secret(request: Request) -> Node:
    """The dependency of every node-to-node route: the CLUSTER_SECRET header, or 401."""
    n = node(request)
    check_cluster_secret(n.settings.cluster_secret, request.headers.get(CLUSTER_SECRET_HEADER))
    return n


def admin(request: Request) -> Node:
    """Cluster control (PUT /cluster/nodes, POST /cluster/shards/{id}/handoff):
    `Authorization: Bearer <ADMIN_TOKEN>` (not the API token)."""
    n = node(request)
    token = n.settings.admin_token
    if not token:
        raise Forbidden("cluster control is off on this node: set ADMIN_TOKEN to allow it")
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(
        given.strip().encode(), token.encode()
    ):
        raise Unauthorized(
            f"{request.method} {request.url.path[:200]} needs 'Authorization: Bearer <ADMIN_TOKEN>'"
        )
    return n


@router.get(
    "",
    summary="The cluster: topology, shard owners and leases, every node's role and status",
    responses={
        **json_response_doc(ClusterView, 200, "The cluster as this node sees it"),
        **problem_docs(503),
    },
)
async def cluster_view(request: Request) -> Response:
    return json_response(await cluster_document(node(request)))


async def cluster_document(n: Node) -> ClusterView:
    """GET /cluster's answer (also what the watcher is sent)."""
    rt = n.cluster
    keeper = rt.keeper
    members = await rt.members()
    store_now = await n.store.store_time_ms()
    leases = await n.store.leases()
    topology = rt.topology
    owned = rt.owned()
    counts: dict[str, int] = {}
    for name in n.engine.channels:
        shard = keeper.shard_of(name)
        counts[shard] = counts.get(shard, 0) + 1
    shards = []
    holders: set[str] = set()
    for shard_id in keeper.shard_ids:
        seat = topology.shard(shard_id) if topology else None
        lease = leases.get(shard_id)
        held = lease is not None and live(lease, store_now)
        if held and lease:
            holders.add(lease.owner_url)
        shards.append(
            ShardView(
                id=shard_id,
                slot=seat.slot if seat else 0,
                primary=seat.primary if seat else None,
                backups=list(seat.backups) if seat else [],
                owner=lease.owner_url if held and lease else None,
                owner_id=lease.owner if held and lease else None,
                epoch=lease.epoch if lease else 0,
                lease_expires_in_ms=lease.expires_at - store_now if held and lease else None,
                channels=counts.get(shard_id, 0) if shard_id in owned else None,
            )
        )
    urls = [u for s in topology.shards for u in s.members] if topology else []
    urls += sorted(u for u in members if u not in urls)
    alive = _alive(members, n.settings.lease_ms)
    # What each owner says of its backups' lag, by backup URL.
    seen_by_owner: dict[str, dict[str, int]] = {}
    for _, report in members.values():
        for backup, beats in (report.backups or {}).items():
            seen_by_owner.setdefault(backup, {}).update(beats)
    nodes = []
    for url in urls:
        age: int | None = None
        doc: MemberDoc | None = None
        if url in members:
            age, doc = members[url]
        nodes.append(
            NodeView(
                url=url,
                id=doc.id if doc else None,
                role=_role(url, topology, holders, len(alive)),
                shards=sorted(doc.shards) if doc else [],
                status="down" if doc and doc.stopped else status_of(age, n.settings.lease_ms),
                heartbeat_age_ms=age,
                lag=_lag(doc.lag if doc else None, seen_by_owner.get(url)),
                applied_version=doc.applied_version if doc else None,
            )
        )
    me = NodeRef(rt.node_id, rt.url, _role(rt.url, topology, holders, len(alive)))
    handoffs = [doc.last_handoff for _, doc in members.values() if doc.last_handoff]
    last = max(handoffs, key=lambda r: r.at, default=None)
    return ClusterView(topology.version if topology else 0, me, shards, nodes, last)


def _alive(members: dict[str, tuple[int, MemberDoc]], lease_ms: int) -> list[str]:
    return [
        u
        for u, (age, doc) in members.items()
        if not doc.stopped and status_of(age, lease_ms) == "up"
    ]


async def acting_role(n: Node) -> str:
    """This node's role as GET /cluster names it (`standalone` included), for /metrics."""
    rt = n.cluster
    store_now = await n.store.store_time_ms()
    holders = {
        lease.owner_url for lease in (await n.store.leases()).values() if live(lease, store_now)
    }
    alive = _alive(await rt.members(), n.settings.lease_ms)
    return _role(rt.url, rt.topology, holders, len(alive))


def _role(url: str, topology: Topology | None, holders: set[str], alive: int) -> str:
    """The acting role: the holder of a shard's live lease is its primary (a backup that took
    over is one; a configured primary back from the dead is not until it holds a lease again),
    another member a backup."""
    if topology is None:
        if alive <= 1:
            return "standalone"
        return "primary" if url in holders else "backup"
    if url in holders:
        return "primary"
    if any(url in shard.members for shard in topology.shards):
        return "backup"
    return "unassigned"


def _lag(own: dict[str, int] | None, owner: dict[str, int] | None) -> dict[str, int] | None:
    """A backup's lag per shard: the larger of its own count of beats missed and its owner's
    count of beats it is behind."""
    if own is None and owner is None:
        return None
    merged = dict(own or {})
    for shard, beats in (owner or {}).items():
        merged[shard] = max(beats, merged.get(shard, 0))
    return merged


@router.get(
    "/route/{channel}",
    summary="The shard a channel is placed on and the node serving it now",
    responses={**json_response_doc(RouteView, 200, "Where the channel lives"), **problem_docs(422)},
)
async def route_of(request: Request, channel: str) -> Response:
    n = node(request)
    name = channel_name(channel)
    route = n.cluster.route(name)
    owner: str | None = None
    if isinstance(route, Local):
        owner = n.cluster.url
    elif isinstance(route, Remote):
        owner = route.url
    return json_response(RouteView(name, route.shard, owner))


# Cluster control is left out of the API schema (its credential is ADMIN_TOKEN, not the API
# token the schema describes); README and .env.example document it.
@router.put("/nodes", include_in_schema=False)
async def set_nodes(request: Request, n: Annotated[Node, Depends(admin)]) -> Response:
    if not n.settings.cluster_secret:
        raise Forbidden("set CLUSTER_SECRET on every node before giving the cluster a topology")
    body = await read_body(request, _BODY_LIMIT)
    try:
        wanted = validate_set_nodes(decode(body, _set_nodes_decoder))
        if not wanted.shards:
            raise InvalidTopology("Invalid topology", "a topology needs at least one shard")
    except InvalidTopology as exc:
        raise InvalidInput(str(exc)) from None
    _check_stays(n.cluster.url, wanted)
    for _ in range(_SWAP_TRIES):
        stored = await n.store.topology()
        current = decode_topology(stored[1]) if stored else None
        try:
            new = next_topology(current, wanted)
        except InvalidTopology as exc:
            raise InvalidInput(str(exc)) from None
        if current is not None and new.version == current.version:
            return json_response(new)  # nothing changes
        expected = current.version if current else None
        if await n.store.swap_topology(expected, new.version, msgspec.json.encode(new)):
            return json_response(new)
    raise StoreUnavailable("the topology kept changing under this request; try again")


def _check_stays(url: str, wanted: SetNodes) -> None:
    """Refuse a topology that leaves out the node asked to store it: one that names none of the
    running nodes (a typo, the wrong cluster's file) would leave every shard without an owner,
    and nothing could be served again until a right one came. Removing a node is done through
    a node that stays."""
    if not any(url in shard.members for shard in wanted.shards):
        raise InvalidInput(
            f"the new topology leaves out this node ({url}); send it to a node that stays in"
            " the cluster (a topology naming no running node would leave every shard ownerless)"
        )


@router.post(
    "/internal/poke",
    summary="Node to node: messages were moved into a channel this node serves; re-read it",
    include_in_schema=False,
)
async def poke(request: Request, n: Annotated[Node, Depends(cluster_secret)]) -> Response:
    body = await read_body(request, _BODY_LIMIT)
    name = channel_name(decode(body, _poke_decoder).channel)
    return json_response(Poked(await n.cluster.poked(name)))


@router.post("/shards/{shard}/handoff", include_in_schema=False)
async def handoff(request: Request, shard: str, n: Annotated[Node, Depends(admin)]) -> Response:
    """Hand the shard to an up-to-date backup now (app/cluster/handoff.py). Asked of a node
    that does not own it, the call is forwarded once to the owner (409 when there is none, or
    when the owner in turn sees another)."""
    body = await read_body(request, _BODY_LIMIT)
    ask = decode(body, _handoff_decoder) if body.strip() else HandoffAsk()
    rt = n.cluster
    if shard not in rt.keeper.shard_ids:
        raise ShardNotFound(
            f"no shard {shard[:100]!r} in the cluster ({', '.join(rt.keeper.shard_ids)})"
        )
    wanted = None
    if ask.to is not None:
        try:
            wanted = normalize_url(ask.to)
        except InvalidTopology as exc:
            raise InvalidInput(f"to: {exc}") from None
    if rt.handover is None:
        raise HandoffRefused("this node takes no part in a cluster's hand-offs")
    if shard in rt.keeper.held:
        record = await rt.handover.hand_off(shard, wanted)
        return json_response(
            Handoff(record.shard, record.from_url, record.to, record.epoch, record.took_ms)
        )
    route = rt.route_shard(shard)
    if not isinstance(route, Remote) or FORWARDED in request.headers:
        owner = f"its owner is {route.url}" if isinstance(route, Remote) else "it has no owner now"
        raise HandoffRefused(
            f"shard {shard} is not owned by this node ({rt.url}); {owner}: ask that node"
        )
    return await _forward_handoff(n, request, route, body)


class Handoff(msgspec.Struct):
    shard: str
    from_url: str = msgspec.field(name="from")
    to: str
    epoch: int
    took_ms: int


async def _forward_handoff(n: Node, request: Request, owner: Remote, body: bytes) -> Response:
    """The hand-off asked of the shard's owner, its answer passed back as it is."""
    assert n.cluster.handover is not None
    headers = {
        "authorization": request.headers.get("authorization", ""),
        "content-type": "application/json",
        FORWARDED: n.cluster.node_id,
    }
    try:
        answer = await n.cluster.handover.http.post(
            owner.url + request.url.path, content=body, headers=headers, timeout=_HANDOFF_FORWARD_S
        )
    except httpx.HTTPError as exc:
        raise OwnerUnreachable(
            f"the owner of shard {owner.shard}, {owner.node_id} at {owner.url}, did not answer"
            f" ({type(exc).__name__}); retry"
        ) from None
    kept = {k: v for k, v in answer.headers.items() if k.lower() in ("content-type", "retry-after")}
    return Response(answer.content, answer.status_code, headers=kept)


@router.post("/internal/shards/{shard}/adopt", include_in_schema=False)
async def adopt(
    request: Request, shard: str, n: Annotated[Node, Depends(cluster_secret)]
) -> Response:
    """Node to node: the shard's owner transferred its lease to this node; serve it now."""
    given = decode(await read_body(request, _BODY_LIMIT), _adopt_decoder)
    keeper = n.cluster.keeper
    h = await keeper.adopt_given(shard, given.epoch, keeper.mono())
    if h is not None and h.adopting is not None:
        await asyncio.wait({h.adopting}, timeout=_ADOPT_WAIT_S)
    return json_response(Adopted(keeper.serving(shard) is not None))


@router.post("/internal/shards/{shard}/look", include_in_schema=False)
async def look(shard: str, n: Annotated[Node, Depends(cluster_secret)]) -> Response:
    """Node to node: the shard was handed to another node; read the leases again now."""
    await n.cluster.keeper.look()
    return json_response(Poked(isinstance(n.cluster.route_shard(shard), Local)))
