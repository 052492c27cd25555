"""The snapshot a node sends to `/ingest` every interval, validated with msgspec.

Every string is bounded and every number range-checked, so a frame that decodes is safe to keep.
Version 2 (app/telemetry.py's SCHEMA_VERSION, kept in step) added the node's `totals` and
`channels_total`: a node with many channels lists only some of them (its deepest and busiest) in
`channels`. A version 1 snapshot lists every channel, and its totals are added up here.
Version 3 added `cluster`: the node's own `GET /cluster` document (see /work/CLUSTER.md), the
fields the watcher shows; older nodes send none and show as standalone.
Version 4 lists every dead-letter channel holding messages (up to 50) among `channels`, however
shallow, so the watcher sees one grow (watcher/alerts.py); from an older node, a dead-letter
channel missing from a snapshot may merely not have been listed.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

Text = Annotated[str, msgspec.Meta(max_length=256)]
Name = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
Count = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]
Rate = Annotated[float, msgspec.Meta(ge=0.0, le=1e12)]
Millis = Annotated[float, msgspec.Meta(ge=0.0, le=1e13)]

SCHEMA_VERSION = 4
# A topology holds at most 63 shards (lionmq.topology's MAX_SHARDS - 1); a view lists at most as
# many nodes as the watcher tracks.
MAX_CLUSTER_SHARDS = 64
MAX_CLUSTER_NODES = 256
ShardId = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
Url = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
# Lease expiry may be negative (expired) in a view read from the store.
SignedMillis = Annotated[int, msgspec.Meta(ge=-(10**13), le=10**13)]


class StoreInfo(msgspec.Struct, frozen=True, forbid_unknown_fields=False):
    kind: Text
    healthy: bool


class ChannelSnapshot(msgspec.Struct, frozen=True):
    name: Name
    ready: Count
    delayed: Count
    in_flight: Count
    enqueue_rate: Rate = 0.0
    dequeue_rate: Rate = 0.0
    ack_rate: Rate = 0.0
    nack_rate: Rate = 0.0
    dead_lettered: Count = 0
    redelivered: Count = 0
    oldest_ready_age_ms: Millis | None = None
    ack_p50_ms: Millis | None = None
    ack_p99_ms: Millis | None = None
    enqueued_total: Count = 0
    dequeued_total: Count = 0
    acked_total: Count = 0
    nacked_total: Count = 0


class NodeTotals(msgspec.Struct, frozen=True):
    """Every channel of the node added up (rates over the last interval)."""

    ready: Count = 0
    delayed: Count = 0
    in_flight: Count = 0
    enqueue_rate: Rate = 0.0
    dequeue_rate: Rate = 0.0
    ack_rate: Rate = 0.0
    nack_rate: Rate = 0.0
    dead_lettered: Count = 0
    redelivered: Count = 0
    ack_p50_ms: Millis | None = None
    ack_p99_ms: Millis | None = None


class ClusterShard(msgspec.Struct, frozen=True):
    """One shard as the reporting node sees it: configured members and the acting owner."""

    id: ShardId
    slot: Annotated[int, msgspec.Meta(ge=0, le=MAX_CLUSTER_SHARDS - 1)] = 0
    primary: Url | None = None
    backups: Annotated[list[Url], msgspec.Meta(max_length=MAX_CLUSTER_NODES)] = []
    owner: Url | None = None
    owner_id: Text | None = None
    epoch: Count = 0
    lease_expires_in_ms: SignedMillis | None = None
    channels: Count | None = None


class ClusterMember(msgspec.Struct, frozen=True):
    """One node of the cluster as the reporting node sees it (from the store's member reports)."""

    url: Url
    id: Text | None = None
    role: Literal["primary", "backup", "standalone", "unassigned"] = "unassigned"
    shards: Annotated[list[ShardId], msgspec.Meta(max_length=MAX_CLUSTER_SHARDS)] = []
    status: Literal["up", "suspect", "down"] = "up"
    heartbeat_age_ms: Count | None = None
    # Beats behind its primary, per shard it backs (known to the primary).
    lag: Annotated[dict[ShardId, Count], msgspec.Meta(max_length=MAX_CLUSTER_SHARDS)] | None = None
    applied_version: Count | None = None


class ClusterSelf(msgspec.Struct, frozen=True):
    id: Text = ""
    url: Text = ""
    role: Text = ""


class ClusterView(msgspec.Struct, frozen=True):
    """A node's `GET /cluster` document (the fields the watcher uses)."""

    version: Count = 0
    node: ClusterSelf | None = None
    shards: Annotated[list[ClusterShard], msgspec.Meta(max_length=MAX_CLUSTER_SHARDS)] = []
    nodes: Annotated[list[ClusterMember], msgspec.Meta(max_length=MAX_CLUSTER_NODES)] = []


NO_CLUSTER = msgspec.Raw(b"null")


class NodeSnapshot(msgspec.Struct, frozen=True):
    type: Literal["snapshot"]
    node_id: Name
    interval_ms: Annotated[int, msgspec.Meta(ge=100, le=60_000)]
    url: Text = ""
    ip: Text = ""
    role: Text = "standalone"
    status: Text = "ok"
    ts_ms: Count = 0
    uptime_s: Millis = 0.0
    cpu_percent: Annotated[float, msgspec.Meta(ge=0.0, le=100_000.0)] = 0.0
    memory_rss_bytes: Count = 0
    memory_percent: Annotated[float, msgspec.Meta(ge=0.0, le=100.0)] = 0.0
    system_cpu_percent: Annotated[float, msgspec.Meta(ge=0.0, le=100.0)] = 0.0
    system_memory_percent: Annotated[float, msgspec.Meta(ge=0.0, le=100.0)] = 0.0
    store: StoreInfo | None = None
    channels: list[ChannelSnapshot] = []
    # How many channels the node holds; at least as many as `channels` lists (0: version 1).
    channels_total: Count = 0
    totals: NodeTotals | None = None
    # Decoded on its own (`cluster_decoder`): a view the watcher cannot read is dropped and
    # counted, and the rest of the snapshot is kept.
    cluster: msgspec.Raw = NO_CLUSTER
    v: Annotated[int, msgspec.Meta(ge=1, le=SCHEMA_VERSION)] = 1


decoder = msgspec.json.Decoder(NodeSnapshot)
cluster_decoder = msgspec.json.Decoder(ClusterView | None)
encoder = msgspec.json.Encoder()
