"""Probes and Prometheus metrics."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import msgspec
from fastapi import APIRouter, Request
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from starlette.responses import JSONResponse, PlainTextResponse, Response

from app import __version__
from app.api.codec import json_response_doc, problem_docs
from app.api.deps import Node, node
from app.errors import NotReady, StoreError

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
    summary="The store answers (503 otherwise)",
    responses={**json_response_doc(Ready, 200, "The store answers"), **problem_docs(503)},
)
async def ready(request: Request) -> JSONResponse:
    n = node(request)
    try:
        await asyncio.wait_for(n.store.ping(), timeout=5)
    except (StoreError, TimeoutError) as exc:
        detail = getattr(exc, "detail", "the store did not answer within 5 s")
        raise NotReady(detail) from exc
    return JSONResponse({"status": "ready", "store": n.store.kind})


@router.get(
    "/metrics",
    summary="Prometheus metrics, labelled by channel",
    response_class=PlainTextResponse,
    responses={200: {"description": "Prometheus text format 0.0.4"}, **problem_docs()},
)
async def metrics(request: Request) -> Response:
    registry: CollectorRegistry = request.app.state.metrics
    return Response(generate_latest(registry), media_type="text/plain; version=0.0.4")


class EngineCollector(Collector):
    """Reads the engine's counters at scrape time: nothing is counted twice on the hot path."""

    def __init__(self, n: Node) -> None:
        self._node = n

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        stats = self._node.engine.channel_stats(self._node.clock.now_ms())
        gauges = {
            "ready": ("lionmq_channel_ready", "Messages ready for delivery"),
            "delayed": ("lionmq_channel_delayed", "Messages waiting for their delay"),
            "in_flight": ("lionmq_channel_in_flight", "Messages leased and not yet acked"),
        }
        counters = {
            "enqueued": ("lionmq_enqueued", "Messages enqueued"),
            "dequeued": ("lionmq_dequeued", "Deliveries made"),
            "acked": ("lionmq_acked", "Messages acked"),
            "nacked": ("lionmq_nacked", "Deliveries nacked"),
            "redelivered": ("lionmq_redeliveries", "Deliveries after the first"),
            "dead_lettered": ("lionmq_dead_lettered", "Messages moved to dead letters or dropped"),
        }
        for field, (metric, doc) in gauges.items():
            g = GaugeMetricFamily(metric, doc, labels=["channel"])
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
        for field, (metric, doc) in counters.items():
            c = CounterMetricFamily(metric, doc, labels=["channel"])
            for s in stats:
                c.add_metric([s.name], getattr(s, field))
            yield c


def metrics_registry(n: Node) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(EngineCollector(n))
    return registry
