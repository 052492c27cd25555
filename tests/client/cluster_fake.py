"""An in-memory imitation of a cluster's HTTP API, for the client's routing rules.

Every node URL is served by one httpx.MockTransport handler: the nodes share one `FakeNode`
(the store, which keeps messages, leases and dedup ids), and each node answers as the
contract in CLUSTER.md says: `GET /cluster`, `PUT /cluster/nodes` (admin token), channel
requests served by the shard's acting owner with `X-LionMQ-Node`, forwarded one hop by any
other node with `X-LionMQ-Forwarded-By`, 503 + Retry-After while a shard has no owner, and a
connection error from a node that is down.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import unquote

import httpx
from lionmq import placement, topology
from lionmq_fake import FakeNode, problem

ADMIN = "adm1n"


def node_url(request: httpx.Request) -> str:
    return f"{request.url.scheme}://{request.url.host}:{request.url.port}"


def channel_on(shard: str, shard_ids: list[str], skip: int = 0) -> str:
    """A channel name that the shared placement puts on `shard`."""
    names = (f"ch{i}" for i in range(10_000))
    found = [n for n in names if placement.shard_for(n, shard_ids) == shard]
    return found[skip]


@dataclass
class Seen:
    node: str
    method: str
    path: str
    request: httpx.Request


@dataclass
class FakeCluster:
    shards: dict[str, list[str]]
    """Shard id -> [primary, *backups]."""
    token: str | None = None
    single: bool = False
    """Answer as a standalone node: one implicit shard (version 0), whatever `shards` says."""
    store: FakeNode = field(default_factory=FakeNode)
    owner: dict[str, str | None] = field(default_factory=dict)
    down: set[str] = field(default_factory=set)
    seen: list[Seen] = field(default_factory=list)
    version: int = 1
    admin_token: str | None = ADMIN
    retry_after: str = "0"
    before: Callable[[str, httpx.Request], None] | None = None
    """Called with (node, request) before a request is answered: tests change the cluster."""
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        for shard, nodes in self.shards.items():
            self.owner.setdefault(shard, nodes[0])

    @property
    def shard_ids(self) -> list[str]:
        return list(self.shards)

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.handle)

    # -- what tests look at ---------------------------------------------------------------

    def sent(self, path_suffix: str = "") -> list[Seen]:
        return [s for s in self.seen if s.path.endswith(path_suffix)]

    def fetches(self) -> int:
        return len([s for s in self.seen if s.path == "/cluster"])

    def fail_over(self, shard: str, to: str | None) -> None:
        """The shard's owner dies (down) and `to` serves it (None: nobody yet)."""
        with self.lock:
            dead = self.owner[shard]
            if dead is not None:
                self.down.add(dead)
            self.owner[shard] = to

    # -- the nodes ------------------------------------------------------------------------

    def handle(self, request: httpx.Request) -> httpx.Response:
        node = node_url(request)
        path = request.url.path
        if self.before is not None:
            self.before(node, request)
        with self.lock:
            self.seen.append(Seen(node, request.method, path, request))
            if node in self.down:
                raise httpx.ConnectError("connection refused", request=request)
            if path == "/cluster":
                return self._cluster(node, request)
            if path == "/cluster/nodes":
                return self._set_nodes(request)
            if not path.startswith("/channels/"):
                return self.store.respond(request)[0]
            channel = unquote(request.url.raw_path.decode().split("/")[2])
            shard = placement.shard_for(channel, self.shard_ids)
            owner = node if self.single else self.owner[shard]
            if owner is None:
                response = problem(503, "Shard has no owner", f"{shard} is failing over")
                response.headers["retry-after"] = self.retry_after
                return response
        response, wait = self.store.respond(request)
        if wait:  # an empty long poll: answer a little later, so idle consumers do not spin
            time.sleep(min(wait, 0.005))
        response.headers["x-lionmq-node"] = _node_id(owner)
        if owner != node:
            response.headers["x-lionmq-forwarded-by"] = _node_id(node)
        return response

    def _authorized(self, request: httpx.Request, token: str | None) -> bool:
        return token is None or request.headers.get("authorization") == f"Bearer {token}"

    def _cluster(self, node: str, request: httpx.Request) -> httpx.Response:
        if not self._authorized(request, self.token):
            return problem(401, "Unauthorized", "missing or wrong token")
        return httpx.Response(200, json=self.doc(node))

    def doc(self, node: str) -> dict[str, object]:
        if self.single:
            shards = [{"id": "s0", "slot": 0, "primary": None, "backups": [], "owner": node}]
            nodes = [{"url": node, "id": _node_id(node), "role": "standalone", "shards": ["s0"]}]
            return {"version": 0, "node": nodes[0], "shards": shards, "nodes": nodes}
        shards = []
        nodes = []
        for slot, (shard, members) in enumerate(self.shards.items(), 1):
            owner = self.owner[shard]
            shards.append(
                {
                    "id": shard,
                    "slot": slot,
                    "primary": members[0],
                    "backups": members[1:],
                    "owner": owner,
                    "owner_id": owner and _node_id(owner),
                    "epoch": 1,
                    "lease_expires_in_ms": 2000 if owner else None,
                    "channels": None,
                }
            )
            for url in members:
                role = "primary" if url == owner else "backup"
                status = "down" if url in self.down else "up"
                nodes.append({"url": url, "id": _node_id(url), "role": role, "status": status})
        me = {"id": _node_id(node), "url": node, "role": "primary"}
        return {"version": self.version, "node": me, "shards": shards, "nodes": nodes}

    def _set_nodes(self, request: httpx.Request) -> httpx.Response:
        if self.admin_token is None:
            return problem(403, "Forbidden", "ADMIN_TOKEN is not set on this node")
        if not self._authorized(request, self.admin_token):
            return problem(401, "Unauthorized", "missing or wrong admin token")
        try:
            wanted = topology.decode_set_nodes(request.content)
        except topology.InvalidTopology as exc:
            return problem(422, exc.title, exc.detail)
        current = topology.Topology(
            self.version,
            tuple(topology.Shard(s, m[0], tuple(m[1:])) for s, m in self.shards.items()),
        )
        stored = topology.next_topology(current, wanted)
        self.version = stored.version
        self.shards = {s.id: list(s.members) for s in stored.shards}
        self.owner = {s.id: self.owner.get(s.id) or s.primary for s in stored.shards}
        return httpx.Response(
            200,
            content=json.dumps(
                {
                    "version": stored.version,
                    "shard_seq": stored.shard_seq,
                    "shards": [
                        {"id": s.id, "primary": s.primary, "backups": list(s.backups)}
                        for s in stored.shards
                    ],
                }
            ),
        )


def _node_id(url: str) -> str:
    return url.split("//")[1].replace(":", "-")
