"""The cluster's endpoints: its view (GET /cluster), where a channel lives, set-nodes, and the
node-to-node routes under /cluster/internal/ (authenticated by CLUSTER_SECRET, not API_TOKEN).

Two credentials besides the API token, each checked here in constant time:
`Authorization: Bearer <ADMIN_TOKEN>` for PUT /cluster/nodes (cluster control), and
`X-LionMQ-Cluster-Secret: <CLUSTER_SECRET>` for /cluster/internal/... (app.api.auth leaves
these paths to this module, so a node with API_TOKEN still takes them).
"""

from __future__ import annotations

import hmac
from typing import Annotated

import msgspec
from fastapi import APIRouter, Depends, Request
from lionmq.topology import (
    InvalidTopology,
    SetNodes,
    Topology,
    decode_topology,
    next_topology,
    validate_set_nodes,
)
from starlette.responses import Response

from app.api.auth import check_cluster_secret
from app.api.codec import decode, json_response_doc, problem_docs, read_body
from app.api.deps import Node, channel_name, node
from app.cluster.decide import live
from app.cluster.keeper import MemberDoc
from app.cluster.route import Local, Remote
from app.errors import Forbidden, InvalidInput, StoreUnavailable, Unauthorized
from app.settings import CLUSTER_SECRET_HEADER

router = APIRouter(prefix="/cluster", tags=["cluster"])

ADMIN_PATH = "/cluster/nodes"
INTERNAL_PREFIX = "/cluster/internal/"
_SWAP_TRIES = 5
_BODY_LIMIT = 1024 * 1024


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


class RouteView(msgspec.Struct):
    channel: str
    shard: str
    owner: str | None


class Poke(msgspec.Struct, forbid_unknown_fields=True):
    channel: str


class Poked(msgspec.Struct):
    served: bool


SCHEMAS: list[type[msgspec.Struct]] = [ClusterView, RouteView, Poke, Poked]
_set_nodes_decoder = msgspec.json.Decoder(SetNodes)
_poke_decoder = msgspec.json.Decoder(Poke)
_encoder = msgspec.json.Encoder()


def _json(value: object) -> Response:
    return Response(_encoder.encode(value), media_type="application/json")


def cluster_secret(request: Request) -> Node:
    """The dependency of every node-to-node route: the CLUSTER_SECRET header, or 401."""
    n = node(request)
    check_cluster_secret(n.settings.cluster_secret, request.headers.get(CLUSTER_SECRET_HEADER))
    return n


def admin(request: Request) -> Node:
    """PUT /cluster/nodes: `Authorization: Bearer <ADMIN_TOKEN>` (not the API token)."""
    n = node(request)
    token = n.settings.admin_token
    if not token:
        raise Forbidden("cluster control is off on this node: set ADMIN_TOKEN to allow it")
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(
        given.strip().encode(), token.encode()
    ):
        raise Unauthorized("PUT /cluster/nodes needs 'Authorization: Bearer <ADMIN_TOKEN>'")
    return n


def status_of(age_ms: int | None, lease_ms: int) -> str:
    """A member's status from how long ago it reported (by the store's clock)."""
    if age_ms is None:
        return "down"
    if age_ms < lease_ms:
        return "up"
    return "suspect" if age_ms < 3 * lease_ms else "down"


@router.get(
    "",
    summary="The cluster: topology, shard owners and leases, every node's role and status",
    responses={
        **json_response_doc(ClusterView, 200, "The cluster as this node sees it"),
        **problem_docs(503),
    },
)
async def cluster_view(request: Request) -> Response:
    return _json(await cluster_document(node(request)))


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
    return ClusterView(topology.version if topology else 0, me, shards, nodes)


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
    return _json(RouteView(name, route.shard, owner))


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
            return _json(new)  # nothing changes
        expected = current.version if current else None
        if await n.store.swap_topology(expected, new.version, msgspec.json.encode(new)):
            return _json(new)
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
    return _json(Poked(await n.cluster.poked(name)))
