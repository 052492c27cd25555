"""Probes and Prometheus metrics."""

from __future__ import annotations

import asyncio
import heapq
from collections.abc import Iterator
from dataclasses import dataclass

import msgspec
from fastapi import APIRouter, Request
from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from starlette.responses import JSONResponse, PlainTextResponse, Response

from app import __version__
from app.api.cluster import acting_role
from app.api.codec import json_response_doc, problem_docs
from app.api.deps import Node, node
from app.engine.queue import QueueEngine
from app.errors import NotReady, StoreError
from app.models import DEAD_LETTER_SUFFIX, ChannelStats

router = APIRouter(tags=["operations"])


class Health(msgspec.Struct):
    """The process is up (it says nothing of the store: see /ready)."""

    status: str
    node_id: str
    version: str
    uptime_s: float


class Ready(msgspec.Struct):
    """The store answers: the node can take traffic."""

    status: str
    store: str


SCHEMAS: list[type[msgspec.Struct]] = [Health, Ready]


@router.get(
    "/health",
    summary="The process lives",
    responses={**json_response_doc(Health, 200, "The node is up"), **problem_docs()},
)
async def health(request: Request) -> JSONResponse:
    n = node(request)
    uptime_s = (n.clock.now_ms() - n.started_at) / 1000
    return JSONResponse(
        {
            "status": "ok",
            "node_id": n.settings.node_id,
            "version": __version__,
            "uptime_s": uptime_s,
        }
    )


@router.get(
    "/ready",
    summary="The store answers and maintenance keeps up (503 otherwise)",
    responses={
        **json_response_doc(Ready, 200, "The store answers and maintenance keeps up"),
        **problem_docs(503),
    },
)
async def ready(request: Request) -> JSONResponse:
    n = node(request)
    problem = n.maintenance.problem()
    if problem is not None:
        raise NotReady(problem)
    # The store first: when it fails, a shard without an owner is its consequence, not the cause.
    try:
        await asyncio.wait_for(n.store.ping(), timeout=5)
    except (StoreError, TimeoutError) as exc:
        detail = getattr(exc, "detail", "the store did not answer within 5 s")
        raise NotReady(detail) from exc
    problem = n.cluster.problem()
    if problem is not None:
        raise NotReady(problem)
    return JSONResponse({"status": "ready", "store": n.store.kind})


@router.get(
    "/metrics",
    summary="Prometheus metrics, labelled by channel",
    response_class=PlainTextResponse,
    responses={200: {"description": "Prometheus text format 0.0.4"}, **problem_docs()},
)
async def metrics(request: Request) -> Response:
    registry: NodeMetrics = request.app.state.metrics
    return Response(await registry.render(), media_type="text/plain; version=0.0.4")


# Channels read between two yields to the event loop while a scrape adds them up.
_SCRAPE_CHUNK = 5000
# Dead-letter channels holding messages a scrape labels even when they are not among the
# deepest, so an alert sees one grow (deploy/prometheus/alerts.yml).
_SCRAPE_DEAD_LETTERS = 100

_GAUGES = {
    "ready": ("channel_ready", "Messages ready for delivery"),
    "delayed": ("channel_delayed", "Messages waiting for their delay"),
    "in_flight": ("channel_in_flight", "Messages leased and not yet acked"),
}
_COUNTERS = {
    "enqueued": ("enqueued", "Messages enqueued"),
    "dequeued": ("dequeued", "Deliveries made"),
    "acked": ("acked", "Messages acked"),
    "nacked": ("nacked", "Deliveries nacked"),
    "redelivered": ("redeliveries", "Deliveries after the first"),
    "dead_lettered": ("dead_lettered", "Messages moved to dead letters or dropped"),
}


@dataclass(frozen=True, slots=True)
class ScrapeView:
    """The numbers one scrape exports: node sums, and the deepest channels in full."""

    channels: int
    sums: dict[str, int]
    deepest: list[ChannelStats]


async def scrape_view(engine: QueueEngine, now: int, per_channel: int) -> ScrapeView:
    """Add up every channel and keep the `per_channel` deepest (and the dead-letter channels
    holding messages), in steps of _SCRAPE_CHUNK channels between which the event loop serves
    other requests (a node may hold 100,000)."""
    sums = dict.fromkeys([*_GAUGES, *_COUNTERS], 0)
    heap: list[tuple[int, str]] = []  # (depth, name): the deepest so far, smallest on top
    dead: list[str] = []
    names = list(engine.channels)
    for i in range(0, len(names), _SCRAPE_CHUNK):
        if i:
            await asyncio.sleep(0)
        for name in names[i : i + _SCRAPE_CHUNK]:
            ch = engine.channels.get(name)
            if ch is None:  # deleted while the scrape yielded
                continue
            in_flight = ch.in_flight
            sums["ready"] += ch.ready_count
            sums["delayed"] += ch.delayed
            sums["in_flight"] += in_flight
            sums["enqueued"] += ch.enqueued
            sums["dequeued"] += ch.dequeued
            sums["acked"] += ch.acked
            sums["nacked"] += ch.nacked
            sums["redelivered"] += ch.redelivered
            sums["dead_lettered"] += ch.dead_lettered
            depth = max(ch.total, in_flight + ch.delayed)
            if not per_channel or not depth:
                continue
            if len(dead) < _SCRAPE_DEAD_LETTERS and name.endswith(DEAD_LETTER_SUFFIX):
                dead.append(name)
            if len(heap) < per_channel:
                heapq.heappush(heap, (depth, name))
            elif depth > heap[0][0]:
                heapq.heapreplace(heap, (depth, name))
    ranked = [name for _, name in sorted(heap, reverse=True)]
    listed = dict.fromkeys([*ranked, *dead])
    return ScrapeView(len(engine.channels), sums, engine.stats_of(listed, now))


class NodeMetrics(CollectorRegistry):
    """The node's Prometheus registry. Like RabbitMQ's plugin, whose /metrics aggregates per
    node unless per-object metrics are asked for, it exports node totals (`lionmq_node_*`) and,
    labelled by channel, only the METRICS_MAX_CHANNELS deepest channels: with 100,000 channels a
    full listing would be tens of megabytes per scrape."""

    def __init__(self, n: Node) -> None:
        super().__init__(auto_describe=False)
        self.node = n
        self.view = ScrapeView(0, {}, [])
        self.role = ""  # as GET /cluster names it, read with the view
        self.register(_ViewCollector(self))
        self.register(_ClusterCollector(self))
        # process_resident_memory_bytes, CPU seconds, open fds: read from /proc at each scrape.
        ProcessCollector(registry=self)

    async def render(self) -> bytes:
        n = self.node
        self.view = await scrape_view(n.engine, n.clock.now_ms(), n.settings.metrics_max_channels)
        try:
            self.role = await acting_role(n)
        except StoreError:  # /metrics answers while the store is down: the keeper's own view
            self.role = n.cluster.role()
        return generate_latest(self)


class _ViewCollector(Collector):
    def __init__(self, registry: NodeMetrics) -> None:
        self._registry = registry

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        view = self._registry.view
        yield GaugeMetricFamily("lionmq_channels", "Channels on this node", value=view.channels)
        yield GaugeMetricFamily(
            "lionmq_channels_exported",
            "Channels exported with a channel label (the METRICS_MAX_CHANNELS deepest, and "
            "dead-letter channels holding messages)",
            value=len(view.deepest),
        )
        for field, (metric, doc) in _GAUGES.items():
            name = metric.removeprefix("channel_")
            yield GaugeMetricFamily(
                f"lionmq_node_{name}", f"{doc}, all channels", value=view.sums.get(field, 0)
            )
        for field, (metric, doc) in _COUNTERS.items():
            # Sums of the channels' lifetime counters: deleting a channel lowers them, which
            # Prometheus reads as a counter reset.
            yield CounterMetricFamily(
                f"lionmq_node_{metric}", f"{doc}, all channels", value=view.sums.get(field, 0)
            )
        stats = view.deepest
        for field, (metric, doc) in _GAUGES.items():
            g = GaugeMetricFamily(f"lionmq_{metric}", doc, labels=["channel"])
            for s in stats:
                g.add_metric([s.name], getattr(s, field))
            yield g
        age = GaugeMetricFamily(
            "lionmq_channel_oldest_ready_age_seconds",
            "Age of the oldest ready message",
            labels=["channel"],
        )
        for s in stats:
            age.add_metric([s.name], (s.oldest_ready_age_ms or 0) / 1000)
        yield age
        for field, (metric, doc) in _COUNTERS.items():
            c = CounterMetricFamily(f"lionmq_{metric}", doc, labels=["channel"])
            for s in stats:
                c.add_metric([s.name], getattr(s, field))
            yield c


_ROLES = ("primary", "backup", "standalone", "unassigned")


class _ClusterCollector(Collector):
    """This node's part in the cluster: role, shards and epochs, heartbeat lag, takeovers."""

    def __init__(self, registry: NodeMetrics) -> None:
        self._registry = registry

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        rt = self._registry.node.cluster
        role = self._registry.role
        g = GaugeMetricFamily(
            "lionmq_cluster_role", "This node's role (1 for its role)", labels=["role"]
        )
        for name in _ROLES:
            g.add_metric([name], 1 if name == role else 0)
        yield g
        owned = rt.owned()
        epoch = GaugeMetricFamily(
            "lionmq_shard_epoch", "Epoch of the shard's lease this node holds", labels=["shard"]
        )
        served = GaugeMetricFamily(
            "lionmq_shard_owned", "1 while this node serves the shard", labels=["shard"]
        )
        for shard in rt.keeper.shard_ids:
            served.add_metric([shard], 1 if shard in owned else 0)
            if shard in owned:
                epoch.add_metric([shard], owned[shard])
        yield epoch
        yield served
        lag = GaugeMetricFamily(
            "lionmq_heartbeat_lag", "Heartbeats a backup of the shard is behind", labels=["shard"]
        )
        for shard, beats in ((rt.lag() if rt.lag else None) or {}).items():
            lag.add_metric([shard], beats)
        yield lag
        # The owner's side: how far each of its backups is behind (the backup's own count of
        # silence, above, cannot see beats it acked late or a resync under way).
        behind = GaugeMetricFamily(
            "lionmq_backup_lag",
            "Heartbeats a backup of a shard this node owns is behind, by the owner's count",
            labels=["shard", "backup"],
        )
        backups_lag = rt.keeper.backups_lag
        for backup, shards in (backups_lag() if backups_lag else {}).items():
            for shard, beats in shards.items():
                behind.add_metric([shard, backup], beats)
        yield behind
        yield CounterMetricFamily(
            "lionmq_failovers",
            "Shards this node took over from a lapsed owner",
            value=rt.counters.failovers,
        )
        yield CounterMetricFamily(
            "lionmq_handoffs",
            "Hand-offs this node made: shards to a backup (rolling restart, POST"
            " /cluster/shards/{id}/handoff) and channels moved by set_nodes",
            value=rt.counters.handoffs,
        )
        # The last shard this node handed to a backup: how long its channels were refused.
        last = rt.keeper.last_handoff
        took = GaugeMetricFamily(
            "lionmq_last_handoff_seconds",
            "How long the last shard this node handed to a backup was unavailable",
            labels=["shard", "to"],
        )
        at = GaugeMetricFamily(
            "lionmq_last_handoff_timestamp_seconds",
            "When the last shard this node handed to a backup was handed (store clock)",
            labels=["shard", "to"],
        )
        if last is not None:
            took.add_metric([last.shard, last.to], last.took_ms / 1000)
            at.add_metric([last.shard, last.to], last.at / 1000)
        yield took
        yield at


def metrics_registry(n: Node) -> NodeMetrics:
    return NodeMetrics(n)
