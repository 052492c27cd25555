"""Telemetry for the watcher: a pure snapshot builder and the task that pushes snapshots.

`WatcherPusher` keeps one WebSocket to WATCHER_URL (the token goes in the handshake's
`Authorization: Bearer` header) and sends a snapshot every METRICS_INTERVAL_MS. It never slows the
node: snapshots are built in a few microseconds from in-memory counters and go into a small buffer
that drops the oldest; a separate task sends them with a timeout, and when the watcher is away it
reconnects with capped exponential backoff and jitter while the node carries on.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import math
import random
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import urlsplit

import msgspec
import psutil
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidStatus

from app.clock import Clock
from app.models import ChannelStats
from app.settings import Settings

log = logging.getLogger("lionmq.telemetry")

SCHEMA_VERSION = 1


class EngineStats(Protocol):
    """What the pusher reads from the queue engine."""

    def channel_stats(self, now: int, /) -> list[ChannelStats]: ...

    def take_ack_latencies(self) -> dict[str, list[int]]:
        """Enqueue-to-ack times (ms) per channel since the last call."""
        ...


class StoreHealth(Protocol):
    @property
    def kind(self) -> str: ...

    async def ping(self) -> None: ...


@dataclass(frozen=True, slots=True)
class ProcessSample:
    """The node's process and machine, as psutil sees them."""

    cpu_percent: float  # this process, percent of one core
    memory_rss_bytes: int
    memory_percent: float  # this process's RSS, percent of the machine's memory
    system_cpu_percent: float = 0.0
    system_memory_percent: float = 0.0


def percentile(values: Sequence[int], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..1) of `values`; None when there are none."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q * len(ordered)))
    return float(ordered[min(rank, len(ordered)) - 1])


def _rate(now: int, before: int, elapsed_s: float) -> float:
    # Counters are lifetime totals; a channel deleted and created again starts over at zero.
    return round(max(0, now - before) / elapsed_s, 3)


def build_snapshot(
    *,
    node_id: str,
    url: str,
    ip: str,
    role: str,
    status: str,
    now_ms: int,
    started_ms: int,
    interval_ms: int,
    elapsed_ms: int,
    process: ProcessSample,
    store_kind: str,
    store_healthy: bool,
    stats: Sequence[ChannelStats],
    previous: Mapping[str, ChannelStats],
    latencies: Mapping[str, Sequence[int]],
) -> dict[str, Any]:
    """One snapshot, as the watcher's `/ingest` expects it (schema version 1).

    Rates are counter deltas against `previous` (the stats of the last snapshot; a channel missing
    there counts from zero) over `elapsed_ms`; `dead_lettered` is the number of moves to a
    dead-letter channel in that time; the ack percentiles are over `latencies` (this interval's).
    """
    elapsed_s = max(elapsed_ms, 1) / 1000
    channels = []
    for st in stats:
        before = previous.get(st.name)
        b_enq = before.enqueued if before else 0
        b_deq = before.dequeued if before else 0
        b_ack = before.acked if before else 0
        b_nack = before.nacked if before else 0
        b_dead = before.dead_lettered if before else 0
        b_redo = before.redelivered if before else 0
        lat = latencies.get(st.name, ())
        channels.append(
            {
                "name": st.name,
                "ready": st.ready,
                "delayed": st.delayed,
                "in_flight": st.in_flight,
                "enqueue_rate": _rate(st.enqueued, b_enq, elapsed_s),
                "dequeue_rate": _rate(st.dequeued, b_deq, elapsed_s),
                "ack_rate": _rate(st.acked, b_ack, elapsed_s),
                "nack_rate": _rate(st.nacked, b_nack, elapsed_s),
                "dead_lettered": max(0, st.dead_lettered - b_dead),
                "redelivered": max(0, st.redelivered - b_redo),
                "oldest_ready_age_ms": st.oldest_ready_age_ms,
                "ack_p50_ms": percentile(lat, 0.50),
                "ack_p99_ms": percentile(lat, 0.99),
                "enqueued_total": st.enqueued,
                "dequeued_total": st.dequeued,
                "acked_total": st.acked,
                "nacked_total": st.nacked,
            }
        )
    return {
        "type": "snapshot",
        "v": SCHEMA_VERSION,
        "node_id": node_id,
        "url": url,
        "ip": ip,
        "role": role,
        "status": status,
        "ts_ms": now_ms,
        "interval_ms": interval_ms,
        "uptime_s": round(max(0, now_ms - started_ms) / 1000, 3),
        "cpu_percent": round(process.cpu_percent, 2),
        "memory_rss_bytes": process.memory_rss_bytes,
        "memory_percent": round(process.memory_percent, 3),
        "system_cpu_percent": round(process.system_cpu_percent, 2),
        "system_memory_percent": round(process.system_memory_percent, 2),
        "store": {"kind": store_kind, "healthy": store_healthy},
        "channels": channels,
    }


class PsutilSampler:
    """Reads this process and its machine; each call costs a few /proc reads."""

    def __init__(self) -> None:
        self._proc = psutil.Process()
        self._proc.cpu_percent(None)  # the first reading only starts the measurement
        psutil.cpu_percent(None)

    def __call__(self) -> ProcessSample:
        try:
            mem = self._proc.memory_info()
            return ProcessSample(
                cpu_percent=self._proc.cpu_percent(None),
                memory_rss_bytes=mem.rss,
                memory_percent=self._proc.memory_percent(),
                system_cpu_percent=psutil.cpu_percent(None),
                system_memory_percent=psutil.virtual_memory().percent,
            )
        except psutil.Error:  # pragma: no cover - /proc unreadable
            return ProcessSample(0.0, 0, 0.0)


@dataclass(slots=True)
class PusherCounters:
    built: int = 0
    sent: int = 0
    dropped: int = 0
    connects: int = 0
    failures: int = 0


def advertised_ip(server_host: str) -> str:
    """The IP in the advertised URL, when it names one (not 0.0.0.0 or ::)."""
    host = urlsplit(server_host).hostname or ""
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        return ""
    return "" if addr.is_unspecified else str(addr)


def _standalone() -> str:
    return "standalone"


class WatcherPusher:
    """Pushes a snapshot to the watcher every interval; does nothing when WATCHER_URL is unset.

    Wire it into the app lifespan: `pusher = WatcherPusher(settings, engine, store, clock)`,
    `await pusher.start()` after the engine is ready, `await pusher.stop()` before it closes.
    Tests call `tick(now_ms)` themselves and leave `start()` out, or start with `autotick=False`.
    """

    def __init__(
        self,
        settings: Settings,
        engine: EngineStats,
        store: StoreHealth,
        clock: Clock,
        *,
        buffer_size: int = 8,
        send_timeout_s: float = 5.0,
        backoff_initial_s: float = 0.2,
        backoff_max_s: float = 10.0,
        role: Callable[[], str] = _standalone,
        sampler: Callable[[], ProcessSample] | None = None,
        rng: random.Random | None = None,
        autotick: bool = True,
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.store = store
        self.clock = clock
        self.url = settings.watcher_url
        self.enabled = bool(settings.watcher_url)
        self.interval_ms = settings.metrics_interval_ms
        self.send_timeout_s = send_timeout_s
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self.role = role
        self.autotick = autotick
        self.counters = PusherCounters()
        self.buffer: deque[bytes] = deque(maxlen=buffer_size)
        self.ip = advertised_ip(settings.server_host)
        self.started_ms = clock.now_ms()
        self._sampler = sampler
        self._rng = rng or random.Random()
        self._encoder = msgspec.json.Encoder()
        self._previous: dict[str, ChannelStats] = {}
        self._previous_ms = self.started_ms
        self._wakeup = asyncio.Event()
        self._ws: ClientConnection | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._attempt = 0

    # -- building ---------------------------------------------------------------------------
    async def _store_healthy(self) -> bool:
        try:
            await asyncio.wait_for(self.store.ping(), min(2.0, self.interval_ms / 2000))
        except Exception:
            return False
        return True

    async def tick(self, now_ms: int | None = None, status: str | None = None) -> dict[str, Any]:
        """Build one snapshot and queue it for sending (the oldest goes when the buffer is full)."""
        if self._sampler is None:
            self._sampler = PsutilSampler()
        healthy = await self._store_healthy()
        now = self.clock.now_ms() if now_ms is None else now_ms
        elapsed = now - self._previous_ms
        stats = self.engine.channel_stats(now)
        snapshot = build_snapshot(
            node_id=self.settings.node_id,
            url=self.settings.server_host,
            ip=self.ip,
            role=self.role(),
            status=status or ("ok" if healthy else "degraded"),
            now_ms=now,
            started_ms=self.started_ms,
            interval_ms=self.interval_ms,
            elapsed_ms=elapsed if elapsed > 0 else self.interval_ms,
            process=self._sampler(),
            store_kind=self.store.kind,
            store_healthy=healthy,
            stats=stats,
            previous=self._previous,
            latencies=self.engine.take_ack_latencies(),
        )
        self._previous = {st.name: st for st in stats}
        self._previous_ms = now
        self.counters.built += 1
        if len(self.buffer) == self.buffer.maxlen:
            self.counters.dropped += 1
        self.buffer.append(self._encoder.encode(snapshot))
        self._wakeup.set()
        return snapshot

    # -- running ----------------------------------------------------------------------------
    async def start(self) -> None:
        if not self.enabled or self._tasks:
            return
        self.started_ms = self._previous_ms = self.clock.now_ms()
        if self._sampler is None:
            self._sampler = PsutilSampler()
        self._tasks.append(asyncio.create_task(self._send_loop(), name="watcher-sender"))
        if self.autotick:
            self._tasks.append(asyncio.create_task(self._tick_loop(), name="watcher-ticker"))
        log.info("pushing metrics to %s every %d ms", self.url, self.interval_ms)

    async def stop(self) -> None:
        """Stop ticking; tell the watcher this node stopped (briefly, best effort); close."""
        if not self._tasks:
            return
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        ws = self._ws
        if ws is not None:
            with contextlib.suppress(Exception):
                snapshot = await asyncio.wait_for(self.tick(status="stopped"), 1.0)
                await asyncio.wait_for(ws.send(self._encoder.encode(snapshot)), 1.0)
        self.buffer.clear()
        await self._disconnect()

    async def _tick_loop(self) -> None:
        loop = asyncio.get_running_loop()
        period = self.interval_ms / 1000
        next_at = loop.time()
        while True:
            try:
                await self.tick()
            except Exception:  # a bug here must never take the node down
                log.exception("building a watcher snapshot failed")
            next_at += period
            delay = next_at - loop.time()
            if delay < 0:  # fell behind (a stalled loop): skip the missed ticks
                next_at = loop.time() + period
                delay = period
            await asyncio.sleep(delay)

    def backoff_s(self, attempt: int) -> float:
        """Capped exponential backoff with equal jitter: half fixed, half random."""
        cap = min(self.backoff_max_s, self.backoff_initial_s * 2.0 ** min(attempt, 30))
        return cap / 2 + self._rng.uniform(0, cap / 2)

    async def _send_loop(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self.buffer:
                try:
                    ws = self._ws or await self._connect()
                    data = self.buffer.popleft()
                    await asyncio.wait_for(ws.send(data), self.send_timeout_s)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    self.counters.failures += 1
                    await self._disconnect()
                    delay = self.backoff_s(self._attempt)
                    self._attempt += 1
                    level = logging.WARNING if self._attempt == 1 else logging.DEBUG
                    if isinstance(exc, InvalidStatus) and exc.response.status_code in (401, 403):
                        level = logging.ERROR if self._attempt == 1 else logging.DEBUG
                        exc = PermissionError("the watcher refused WATCHER_TOKEN")
                    log.log(level, "watcher %s unreachable (%s); retrying", self.url, exc)
                    await asyncio.sleep(delay)
                    continue
                self.counters.sent += 1
                if self._attempt:
                    log.info("watcher %s reachable again", self.url)
                    self._attempt = 0

    async def _connect(self) -> ClientConnection:
        ws = await connect(
            self.url,
            additional_headers={"Authorization": f"Bearer {self.settings.watcher_token}"},
            open_timeout=self.send_timeout_s,
            close_timeout=1.0,
            proxy=None,
            max_size=64 * 1024,
            compression=None,
        )
        self._ws = ws
        self.counters.connects += 1
        if not self.ip:
            with contextlib.suppress(Exception):
                self.ip = str(ws.local_address[0])
        return ws

    async def _disconnect(self) -> None:
        ws, self._ws = self._ws, None
        if ws is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(ws.close(), 1.0)
