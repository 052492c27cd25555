"""What the watcher knows: each node's latest snapshot, a bounded history, and its status.

Pure: every method takes the current time (`now_ms`), so tests drive it with their own clock.
A node is *up* while it reports on time, *suspect* after `suspect_after` of its own intervals
without a report, and *down* after `down_after` intervals (or at once when it says it stopped).
"""

from __future__ import annotations

from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import msgspec

from watcher.schema import NodeSnapshot

Status = Literal["up", "suspect", "down"]


class ChannelPoint(msgspec.Struct, array_like=True, frozen=True):
    """One channel at one moment; sent as a JSON array in this field order."""

    ready: int
    delayed: int
    in_flight: int
    enqueue_rate: float
    dequeue_rate: float
    ack_rate: float
    nack_rate: float
    dead_lettered: int
    oldest_ready_age_ms: float | None
    ack_p50_ms: float | None
    ack_p99_ms: float | None


class HistoryPoint(msgspec.Struct, array_like=True, frozen=True):
    """One node at one moment (watcher time); sent as
    `[t, cpu, rss, mem%, host cpu%, host mem%, {channel: [...]}, [node totals]]`: the channels
    are those the node listed (its deepest and busiest), the totals cover all of them."""

    t: int
    cpu_percent: float
    memory_rss_bytes: int
    memory_percent: float
    system_cpu_percent: float
    system_memory_percent: float
    channels: dict[str, ChannelPoint]
    totals: ChannelPoint


@dataclass(slots=True)
class IngestCounters:
    connections: int = 0
    refused: int = 0
    accepted: int = 0
    malformed: int = 0
    invalid: int = 0
    oversized: int = 0
    rate_limited: int = 0
    wrong_node: int = 0
    too_many: int = 0
    # Snapshots kept without their cluster view, which did not fit the schema.
    invalid_cluster: int = 0
    closed_for_flood: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass(slots=True)
class NodeRecord:
    node_id: str
    latest: NodeSnapshot
    received_ms: int
    first_seen_ms: int
    history: deque[HistoryPoint]
    status: Status = "up"
    connection: int = 0
    connected: bool = True
    reports: int = 0
    # Dead-letter moves reported since the last history point (history is downsampled).
    pending_dead: dict[str, int] = field(default_factory=dict)
    pending_dead_total: int = 0


def totals(snap: NodeSnapshot) -> dict[str, float]:
    """The node's totals: as it sent them (version 2), or its channels added up (rates add; the
    oldest age and p99 take the maximum). The oldest age is over the listed channels."""
    channels = snap.channels
    oldest = max((ch.oldest_ready_age_ms or 0.0 for ch in channels), default=0.0)
    node = snap.totals
    if node is not None:
        return {
            "channels": max(snap.channels_total, len(channels)),
            "listed": len(channels),
            "ready": node.ready,
            "delayed": node.delayed,
            "in_flight": node.in_flight,
            "enqueue_rate": node.enqueue_rate,
            "dequeue_rate": node.dequeue_rate,
            "ack_rate": node.ack_rate,
            "nack_rate": node.nack_rate,
            "dead_lettered": node.dead_lettered,
            "oldest_ready_age_ms": oldest,
            "ack_p99_ms": node.ack_p99_ms or 0.0,
        }
    out: dict[str, float] = {
        "channels": len(channels),
        "listed": len(channels),
        "ready": 0,
        "delayed": 0,
        "in_flight": 0,
        "enqueue_rate": 0.0,
        "dequeue_rate": 0.0,
        "ack_rate": 0.0,
        "nack_rate": 0.0,
        "dead_lettered": 0,
        "oldest_ready_age_ms": 0.0,
        "ack_p99_ms": 0.0,
    }
    for ch in channels:
        out["ready"] += ch.ready
        out["delayed"] += ch.delayed
        out["in_flight"] += ch.in_flight
        out["enqueue_rate"] += ch.enqueue_rate
        out["dequeue_rate"] += ch.dequeue_rate
        out["ack_rate"] += ch.ack_rate
        out["nack_rate"] += ch.nack_rate
        out["dead_lettered"] += ch.dead_lettered
        out["oldest_ready_age_ms"] = max(out["oldest_ready_age_ms"], ch.oldest_ready_age_ms or 0.0)
        out["ack_p99_ms"] = max(out["ack_p99_ms"], ch.ack_p99_ms or 0.0)
    return out


class WatcherState:
    def __init__(
        self,
        *,
        history_ms: int = 15 * 60 * 1000,
        step_ms: int = 1000,
        suspect_after: float = 2.0,
        down_after: float = 3.0,
        forget_after_ms: int = 15 * 60 * 1000,
        max_nodes: int = 256,
    ) -> None:
        self.history_ms = history_ms
        self.step_ms = step_ms
        self.suspect_after = suspect_after
        self.down_after = down_after
        self.forget_after_ms = forget_after_ms
        self.max_nodes = max_nodes
        self.max_points = history_ms // step_ms + 1
        self.nodes: dict[str, NodeRecord] = {}
        self.counters = IngestCounters()

    # -- status -----------------------------------------------------------------------------
    def status_of(self, record: NodeRecord, now_ms: int) -> Status:
        if record.latest.status == "stopped":
            return "down"
        age = now_ms - record.received_ms
        interval = record.latest.interval_ms
        if age >= interval * self.down_after:
            return "down"
        if age >= interval * self.suspect_after:
            return "suspect"
        return "up"

    # -- ingest -----------------------------------------------------------------------------
    def accept(
        self, snap: NodeSnapshot, now_ms: int, connection: int = 0
    ) -> tuple[NodeRecord, HistoryPoint | None] | None:
        """Keep a valid snapshot; returns the record and the history point it added, if any.

        None when the watcher already tracks `max_nodes` other nodes.
        """
        record = self.nodes.get(snap.node_id)
        if record is None:
            if len(self.nodes) >= self.max_nodes:
                self.counters.too_many += 1
                return None
            record = NodeRecord(
                node_id=snap.node_id,
                latest=snap,
                received_ms=now_ms,
                first_seen_ms=now_ms,
                history=deque(maxlen=self.max_points),
            )
            self.nodes[snap.node_id] = record
        record.latest = snap
        record.received_ms = now_ms
        record.connection = connection
        record.connected = True
        record.reports += 1
        record.status = self.status_of(record, now_ms)
        self.counters.accepted += 1
        for ch in snap.channels:
            if ch.dead_lettered:
                record.pending_dead[ch.name] = (
                    record.pending_dead.get(ch.name, 0) + ch.dead_lettered
                )
        record.pending_dead_total += int(totals(snap)["dead_lettered"])
        point: HistoryPoint | None = None
        last = record.history[-1].t if record.history else None
        if last is None or now_ms - last >= self.step_ms or now_ms < last:
            point = self._point(snap, now_ms, record.pending_dead, record.pending_dead_total)
            record.pending_dead = {}
            record.pending_dead_total = 0
            record.history.append(point)
        self._prune(record, now_ms)
        return record, point

    def disconnected(self, node_id: str, connection: int) -> None:
        record = self.nodes.get(node_id)
        if record is not None and record.connection == connection:
            record.connected = False

    @staticmethod
    def _point(
        snap: NodeSnapshot, now_ms: int, dead: dict[str, int], dead_total: int
    ) -> HistoryPoint:
        node = totals(snap)
        return HistoryPoint(
            t=now_ms,
            cpu_percent=snap.cpu_percent,
            memory_rss_bytes=snap.memory_rss_bytes,
            memory_percent=snap.memory_percent,
            system_cpu_percent=snap.system_cpu_percent,
            system_memory_percent=snap.system_memory_percent,
            channels={
                ch.name: ChannelPoint(
                    ready=ch.ready,
                    delayed=ch.delayed,
                    in_flight=ch.in_flight,
                    enqueue_rate=ch.enqueue_rate,
                    dequeue_rate=ch.dequeue_rate,
                    ack_rate=ch.ack_rate,
                    nack_rate=ch.nack_rate,
                    dead_lettered=dead.get(ch.name, 0),
                    oldest_ready_age_ms=ch.oldest_ready_age_ms,
                    ack_p50_ms=ch.ack_p50_ms,
                    ack_p99_ms=ch.ack_p99_ms,
                )
                for ch in snap.channels
            },
            totals=ChannelPoint(
                ready=int(node["ready"]),
                delayed=int(node["delayed"]),
                in_flight=int(node["in_flight"]),
                enqueue_rate=node["enqueue_rate"],
                dequeue_rate=node["dequeue_rate"],
                ack_rate=node["ack_rate"],
                nack_rate=node["nack_rate"],
                dead_lettered=dead_total,
                oldest_ready_age_ms=node["oldest_ready_age_ms"] or None,
                ack_p50_ms=snap.totals.ack_p50_ms if snap.totals else None,
                ack_p99_ms=node["ack_p99_ms"] or None,
            ),
        )

    def _prune(self, record: NodeRecord, now_ms: int) -> None:
        horizon = now_ms - self.history_ms
        history = record.history
        while history and history[0].t < horizon:
            history.popleft()

    # -- time passing -----------------------------------------------------------------------
    def sweep(self, now_ms: int) -> tuple[dict[str, Status], list[str]]:
        """Recompute statuses; returns the nodes whose status changed and those forgotten."""
        changed: dict[str, Status] = {}
        removed: list[str] = []
        for node_id, record in list(self.nodes.items()):
            status = self.status_of(record, now_ms)
            if status != record.status:
                record.status = status
                changed[node_id] = status
            self._prune(record, now_ms)
            if (
                status == "down"
                and self.forget_after_ms
                and now_ms - record.received_ms >= self.forget_after_ms
            ):
                del self.nodes[node_id]
                removed.append(node_id)
        return changed, removed

    # -- views for the browser feed ---------------------------------------------------------
    def view(self, record: NodeRecord, now_ms: int) -> dict[str, Any]:
        snap = record.latest
        return {
            "id": record.node_id,
            "status": self.status_of(record, now_ms),
            "connected": record.connected,
            "received_ms": record.received_ms,
            "first_seen_ms": record.first_seen_ms,
            "reports": record.reports,
            "url": snap.url,
            "ip": snap.ip,
            "role": snap.role,
            "node_status": snap.status,
            "interval_ms": snap.interval_ms,
            "ts_ms": snap.ts_ms,
            "uptime_s": snap.uptime_s,
            "cpu_percent": snap.cpu_percent,
            "memory_rss_bytes": snap.memory_rss_bytes,
            "memory_percent": snap.memory_percent,
            "system_cpu_percent": snap.system_cpu_percent,
            "system_memory_percent": snap.system_memory_percent,
            "store": snap.store,
            "channels": snap.channels,
            "totals": totals(snap),
        }

    def picture(self, now_ms: int) -> dict[str, Any]:
        """Everything a freshly opened page needs: every node now, and its history."""
        return {
            "type": "hello",
            "now_ms": now_ms,
            "window_ms": self.history_ms,
            "step_ms": self.step_ms,
            "nodes": [self.view(r, now_ms) for r in self.nodes.values()],
            "history": {node_id: list(r.history) for node_id, r in self.nodes.items()},
            "ingest": self.counters.as_dict(),
        }
