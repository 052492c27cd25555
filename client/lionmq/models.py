"""What goes over the wire: msgspec Structs, so encoding and decoding stay off the hot path.

Response structs give every field but the name a default, so a node that adds or drops a
counter does not break older clients.
"""

from __future__ import annotations

from typing import Any

import msgspec


class NewMessage(msgspec.Struct, omit_defaults=True):
    """One message to enqueue with its own options; plain bodies are wrapped in one of these."""

    body: Any
    headers: dict[str, str] | None = None
    delay_ms: int | None = None
    ttl_ms: int | None = None
    dedup_id: str | None = None


class Delivery(msgspec.Struct):
    """A dequeued message as the node sends it."""

    id: str
    receipt: str
    body: Any = None
    headers: dict[str, str] | None = None
    attempt: int = 1
    enqueued_at: int = 0


class ChannelSettings(msgspec.Struct):
    visibility_ms: int | None = None
    max_attempts: int | None = None
    dead_letter: str | None = None
    max_length: int | None = None
    ttl_ms: int | None = None
    trace: bool = False
    """Per-message history is recorded (a node from before tracing reports False)."""


class ChannelCounts(msgspec.Struct):
    ready: int = 0
    delayed: int = 0
    in_flight: int = 0


class ChannelTotals(msgspec.Struct):
    enqueued: int = 0
    dequeued: int = 0
    acked: int = 0
    nacked: int = 0
    dead_lettered: int = 0
    redelivered: int = 0


class ChannelInfo(msgspec.Struct):
    name: str
    settings: ChannelSettings = msgspec.field(default_factory=ChannelSettings)
    counts: ChannelCounts = msgspec.field(default_factory=ChannelCounts)
    totals: ChannelTotals = msgspec.field(default_factory=ChannelTotals)
    oldest_ready_age_ms: int | None = None


class Settled(msgspec.Struct, kw_only=True):
    """What ack, nack and extend have in common: the receipts that no longer held a lease."""

    stale: list[str] = msgspec.field(default_factory=list)


class AckResult(Settled, kw_only=True):
    acked: int = 0


class NackResult(Settled, kw_only=True):
    nacked: int = 0


class ExtendResult(Settled, kw_only=True):
    extended: int = 0


class EnqueueBody(msgspec.Struct):
    messages: list[NewMessage]


class EnqueueReply(msgspec.Struct):
    ids: list[str]


class DequeueBody(msgspec.Struct, omit_defaults=True):
    max: int
    wait_ms: int
    visibility_ms: int | None = None


class DequeueReply(msgspec.Struct):
    messages: list[Delivery] = msgspec.field(default_factory=list)


class ReceiptsBody(msgspec.Struct, omit_defaults=True):
    receipts: list[str]
    delay_ms: int | None = None
    dead_letter: bool | None = None
    visibility_ms: int | None = None


class ChannelList(msgspec.Struct):
    channels: list[ChannelInfo] = msgspec.field(default_factory=list)


class PurgeReply(msgspec.Struct):
    purged: int = 0


# -- browsing and redriving messages ------------------------------------------------------------


class MessageView(msgspec.Struct):
    """A message as browsing shows it, without leasing it. Times are epoch milliseconds."""

    id: str
    state: str = "ready"
    """"ready", "delayed" or "in_flight"."""
    body: Any = None
    headers: dict[str, str] | None = None
    attempt: int = 0
    enqueued_at: int = 0
    available_at: int | None = None
    """When a delayed message falls due."""
    lease_deadline: int | None = None
    """When the lease of an in-flight message ends."""
    expires_at: int | None = None


class MessageDetail(MessageView):
    """One message (`get_message`), with its history when its channel traces."""

    history: list[dict[str, Any]] | None = None
    """Events, oldest first: each has `at` (ms) and `event` ("enqueued", "delivered", "nacked",
    "lease_expired", "dead_lettered", "redriven", ...) plus the event's details. None when the
    channel does not trace."""


class MessagePage(msgspec.Struct):
    """A page of `peek`, in id order; `next` is the `after` of the next page (None: no more)."""

    channel: str
    messages: list[MessageView] = msgspec.field(default_factory=list)
    next: str | None = None


class RedriveBody(msgspec.Struct):
    to: str | None
    max: int
    rate: float | None


class RedriveResult(msgspec.Struct):
    """What one redrive call did: `remaining` counts the ready messages left in the source."""

    moved: int = 0
    skipped: int = 0
    remaining: int = 0


class HandoffBody(msgspec.Struct):
    to: str | None = None


class HandoffResult(msgspec.Struct, frozen=True):
    """A shard handed from its owner (`from_`, "from" on the wire) to a backup."""

    shard: str
    from_: str = msgspec.field(name="from")
    to: str = ""
    epoch: int = 0
    took_ms: int = 0


# -- the cluster (GET /cluster) ----------------------------------------------------------------


class ClusterShard(msgspec.Struct, frozen=True):
    """A shard as `GET /cluster` shows it: its configured nodes and who serves it now."""

    id: str
    primary: str | None = None
    """The configured primary; None for the implicit shard of a store without a topology."""
    backups: tuple[str, ...] = ()
    owner: str | None = None
    """URL of the acting owner (the node holding the shard's lease); None during a failover."""
    owner_id: str | None = None
    epoch: int = 0
    lease_expires_in_ms: int | None = None
    channels: int | None = None
    slot: int | None = None

    @property
    def nodes(self) -> tuple[str, ...]:
        """Where the shard's channels are best sent, best first: the acting owner, then the
        configured nodes (a backup forwards, or answers 503 until it has taken over)."""
        ranked = (self.owner, self.primary, *self.backups)
        return tuple(dict.fromkeys(url for url in ranked if url))


class ClusterNode(msgspec.Struct, frozen=True):
    url: str
    id: str | None = None
    role: str = "unassigned"
    """"primary", "backup", "standalone" or "unassigned"."""
    shards: tuple[str, ...] = ()
    status: str = "up"
    """"up", "suspect" or "down", from the node's last report."""
    heartbeat_age_ms: int | None = None
    lag: dict[str, int] | None = None
    applied_version: int | None = None


class ClusterSelf(msgspec.Struct, frozen=True):
    """The node that answered."""

    id: str
    url: str
    role: str


class ClusterInfo(msgspec.Struct, frozen=True):
    """The cluster as `GET /cluster` shows it (`Client.cluster()`); version 0 means no topology
    is stored: one implicit shard served by whichever node holds its lease."""

    version: int
    shards: tuple[ClusterShard, ...]
    node: ClusterSelf | None = None
    nodes: tuple[ClusterNode, ...] = ()

    @property
    def urls(self) -> tuple[str, ...]:
        """Every node URL the document names, each once."""
        named = [url for shard in self.shards for url in shard.nodes]
        named += [node.url for node in self.nodes]
        if self.node is not None:
            named.append(self.node.url)
        return tuple(dict.fromkeys(named))
