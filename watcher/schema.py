"""The snapshot a node sends to `/ingest` every interval (schema version 1), validated with msgspec.

Every string is bounded and every number range-checked, so a frame that decodes is safe to keep.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

Text = Annotated[str, msgspec.Meta(max_length=256)]
Name = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
Count = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]
Rate = Annotated[float, msgspec.Meta(ge=0.0, le=1e12)]
Millis = Annotated[float, msgspec.Meta(ge=0.0, le=1e13)]


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
    v: Annotated[int, msgspec.Meta(ge=1)] = 1


decoder = msgspec.json.Decoder(NodeSnapshot)
encoder = msgspec.json.Encoder()
