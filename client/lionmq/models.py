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
