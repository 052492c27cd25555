"""Telemetry for the watcher: a pure snapshot builder and the task that pushes snapshots.

`WatcherPusher` keeps one WebSocket to WATCHER_URL (the token goes in the handshake's
`Authorization: Bearer` header) and sends a snapshot every METRICS_INTERVAL_MS. It never slows the
node: snapshots are built from in-memory counters and go into a small buffer that drops the oldest;
a separate task sends them with a timeout, and when the watcher is away it reconnects with capped
exponential backoff and jitter while the node carries on.

A node may hold 100,000 channels, so a snapshot does not list them all: it carries the node's
totals, the number of channels, and in full only the deepest channels and the busiest of the
interval. The pusher keeps its own copy of every channel's counts (`ChannelTable`) and re-reads
only the channels the engine names as changed, so a snapshot of an idle node costs the same at
10 or 100,000 channels.

With a cluster, each snapshot also carries the node's own `GET /cluster` document (schema
version 3), read through the `cluster_view` callable the app passes in: the watcher pieces the
cluster's shards, owners and failovers together from every node's view.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import inspect
import ipaddress
import logging
import math
import random
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import urlsplit

import msgspec
import psutil
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidStatus

from app.clock import Clock
from app.models import DEAD_LETTER_SUFFIX, ChannelStats
from app.settings import Settings

log = logging.getLogger("lionmq.telemetry")

# Version 2 added the node totals and `channels_total`: `channels` lists only some channels.
# Version 3 added `cluster`: the node's view of the cluster (see `cluster_section`).
# Version 4 lists every dead-letter channel holding messages (up to TOP_DEAD_LETTER), however
# shallow: the watcher alerts when one grows, and reads a missing one as empty.
SCHEMA_VERSION = 4
# What a snapshot carries of a cluster view at most (the watcher refuses more): a topology holds
# at most 63 shards; the watcher tracks at most 256 nodes.
CLUSTER_MAX_SHARDS = 64
CLUSTER_MAX_NODES = 256
# Channels a snapshot lists in full: the deepest, and the busiest of the interval (well within
# the watcher's WATCHER_MAX_CHANNELS); the others count only in the totals.
TOP_BY_DEPTH = 50
TOP_BY_ACTIVITY = 20
TOP_DEAD_LETTER = 50
# Channels read per step when many changed at once (the first snapshot reads all of them); the
# loop serves requests between steps.
READ_CHUNK = 2000

_GAUGES = ("ready", "delayed", "in_flight")
_COUNTERS = ("enqueued", "dequeued", "acked", "nacked", "dead_lettered", "redelivered")


class EngineStats(Protocol):
    """What the pusher reads from the queue engine."""

    def take_activity(self) -> set[str]:
        """The channels whose counts changed since the last call (the first call: all)."""
        ...

    def stats_of(self, names: Iterable[str], now: int, /) -> list[ChannelStats]: ...

    def channel_count(self) -> int: ...

    def take_ack_latencies(self, names: Iterable[str], /) -> dict[str, list[int]]:
        """Enqueue-to-ack times (ms) of these channels since the last call."""
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


@dataclass(frozen=True, slots=True)
class NodeTotals:
    """Every channel of the node added up: depths now, counter increases over the interval."""

    channels: int
    ready: int = 0
    delayed: int = 0
    in_flight: int = 0
    enqueued: int = 0
    dequeued: int = 0
    acked: int = 0
    nacked: int = 0
    dead_lettered: int = 0
    redelivered: int = 0
    ack_latencies: Sequence[int] = ()


def _depth(st: ChannelStats) -> int:
    return st.ready + st.delayed + st.in_flight


def _increase(now: ChannelStats, before: ChannelStats | None, counter: str) -> int:
    # Counters are lifetime totals; a channel deleted and created again starts over at zero.
    was: int = getattr(before, counter) if before else 0
    return max(0, int(getattr(now, counter)) - was)


class ChannelTable:
    """The pusher's copy of each channel's counts, changed only where the engine saw activity.

    Holds the channels with anything to count (messages, or lifetime counters above zero), the
    node's depths as running sums, and the dead-letter channels holding messages, so keeping it
    costs O(changed channels).
    """

    def __init__(self) -> None:
        self.rows: dict[str, ChannelStats] = {}
        self.sums = dict.fromkeys(_GAUGES, 0)
        self.dead_letters: set[str] = set()

    def update(self, fresh: Sequence[ChannelStats], gone: Iterable[str]) -> dict[str, ChannelStats]:
        """Take fresh stats and forget deleted channels; returns each changed channel's
        previous row (a channel missing there had nothing to count)."""
        before: dict[str, ChannelStats] = {}
        for st in fresh:
            old = self.rows.pop(st.name, None)
            if old is not None:
                before[st.name] = old
                self._add(old, -1)
            if _depth(st) or any(getattr(st, c) for c in _COUNTERS):
                self.rows[st.name] = st
                self._add(st, 1)
        for name in gone:
            old = self.rows.pop(name, None)
            if old is not None:
                before[name] = old
                self._add(old, -1)
        return before

    def deepest(self, n: int, among: Iterable[str] | None = None) -> list[str]:
        """The `n` channels holding the most messages (those holding any), of all or `among`."""
        rows = self.rows
        pool = rows.values() if among is None else [rows[m] for m in set(among) if m in rows]
        top = heapq.nlargest(n, pool, key=_depth)
        return [st.name for st in top if _depth(st)]

    def rerank(
        self, top: list[str], n: int, changed: list[str], before: Mapping[str, ChannelStats]
    ) -> list[str]:
        """The new `n` deepest, given the last `top`, the channels that changed since, and their
        previous rows (`update`'s answer).

        While no channel of the last top lost messages, every channel outside it that did not
        change still holds no more than the top's least, so ranking the top with the changed
        channels is exact; otherwise (rarely) every channel is ranked again.
        """
        rows = self.rows
        for name in top:
            old = before.get(name)
            if old is not None and (name not in rows or _depth(rows[name]) < _depth(old)):
                return self.deepest(n)
        return self.deepest(n, [*top, *changed])

    def _add(self, st: ChannelStats, sign: int) -> None:
        for gauge in _GAUGES:
            self.sums[gauge] += sign * getattr(st, gauge)
        if st.name.endswith(DEAD_LETTER_SUFFIX):
            if sign > 0 and _depth(st):
                self.dead_letters.add(st.name)
            else:
                self.dead_letters.discard(st.name)


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
    totals: NodeTotals | None = None,
    cluster: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """One snapshot, as the watcher's `/ingest` expects it (schema version 4).

    `stats` are the channels listed in full. Rates are counter deltas against `previous` (the
    stats of the last snapshot; a channel missing there counts from zero) over `elapsed_ms`;
    `dead_lettered` is the number of moves to a dead-letter channel in that time; the ack
    percentiles are over `latencies` (this interval's). `totals` cover every channel of the node;
    without them the listed channels are all there is. `cluster` is the node's `GET /cluster`
    document (None: no cluster view; the snapshot then has no `cluster`).
    """
    elapsed_s = max(elapsed_ms, 1) / 1000
    if totals is None:
        increases = {
            c: sum(_increase(st, previous.get(st.name), c) for st in stats) for c in _COUNTERS
        }
        totals = NodeTotals(
            channels=len(stats),
            ready=sum(st.ready for st in stats),
            delayed=sum(st.delayed for st in stats),
            in_flight=sum(st.in_flight for st in stats),
            ack_latencies=[ms for values in latencies.values() for ms in values],
            **increases,
        )
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
    snapshot: dict[str, Any] = {
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
        "channels_total": max(totals.channels, len(channels)),
        "totals": {
            "ready": totals.ready,
            "delayed": totals.delayed,
            "in_flight": totals.in_flight,
            "enqueue_rate": round(totals.enqueued / elapsed_s, 3),
            "dequeue_rate": round(totals.dequeued / elapsed_s, 3),
            "ack_rate": round(totals.acked / elapsed_s, 3),
            "nack_rate": round(totals.nacked / elapsed_s, 3),
            "dead_lettered": totals.dead_lettered,
            "redelivered": totals.redelivered,
            "ack_p50_ms": percentile(totals.ack_latencies, 0.50),
            "ack_p99_ms": percentile(totals.ack_latencies, 0.99),
        },
        "channels": channels,
    }
    if cluster is not None:
        section = cluster_section(cluster)
        snapshot["cluster"] = section
        if section["node"] and section["node"].get("role"):
            snapshot["role"] = section["node"]["role"]
    return snapshot


ClusterDoc = Mapping[str, Any]
ClusterView = Callable[[], "ClusterDoc | Awaitable[ClusterDoc | None] | None"]

_SHARD_FIELDS = (
    "id",
    "slot",
    "primary",
    "backups",
    "owner",
    "owner_id",
    "epoch",
    "lease_expires_in_ms",
    "channels",
)
_MEMBER_FIELDS = (
    "url",
    "id",
    "role",
    "shards",
    "status",
    "heartbeat_age_ms",
    "lag",
    "applied_version",
)


def _pick(doc: Mapping[str, Any], fields: Sequence[str]) -> dict[str, Any]:
    return {k: doc[k] for k in fields if k in doc}


def cluster_section(doc: Mapping[str, Any]) -> dict[str, Any]:
    """The part of a node's `GET /cluster` document the watcher shows: version, the node itself,
    each shard (members, acting owner, epoch, lease expiry, channels) and each node (role,
    shards, status, heartbeat age, lag), within the watcher's limits."""
    node = doc.get("node")
    return {
        "version": doc.get("version", 0),
        "node": _pick(node, ("id", "url", "role")) if isinstance(node, Mapping) else None,
        "shards": [_pick(s, _SHARD_FIELDS) for s in doc.get("shards", ())][:CLUSTER_MAX_SHARDS],
        "nodes": [_pick(n, _MEMBER_FIELDS) for n in doc.get("nodes", ())][:CLUSTER_MAX_NODES],
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


@dataclass(frozen=True, slots=True)
class _Read:
    """What one snapshot says about the channels (see `WatcherPusher._read_channels`)."""

    listed: list[ChannelStats]
    previous: dict[str, ChannelStats]
    node: NodeTotals
    latencies: dict[str, list[int]]


@dataclass(slots=True)
class PusherCounters:
    built: int = 0
    sent: int = 0
    dropped: int = 0
    connects: int = 0
    failures: int = 0
    cluster_failures: int = 0


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
    In a cluster, pass `cluster_view`: a callable (plain or async) that answers the node's
    `GET /cluster` document, or None while there is none to show.
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
        cluster_view: ClusterView | None = None,
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
        self.cluster_view = cluster_view
        self.autotick = autotick
        self.counters = PusherCounters()
        self.buffer: deque[bytes] = deque(maxlen=buffer_size)
        self.ip = advertised_ip(settings.server_host)
        self.started_ms = clock.now_ms()
        self._sampler = sampler
        self._rng = rng or random.Random()
        self._encoder = msgspec.json.Encoder()
        self.table = ChannelTable()
        self._deepest: list[str] | None = None
        self._previous_ms = self.started_ms
        self._wakeup = asyncio.Event()
        self._ws: ClientConnection | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._attempt = 0
        self._stopping = False

    # -- building ---------------------------------------------------------------------------
    async def _store_healthy(self) -> bool:
        try:
            await asyncio.wait_for(self.store.ping(), min(2.0, self.interval_ms / 2000))
        except Exception:
            return False
        return True

    async def _cluster(self) -> ClusterDoc | None:
        """The node's cluster view; a failure to read it is logged and counted, and the snapshot
        goes without it (the watcher then keeps the node's last view)."""
        if self.cluster_view is None:
            return None
        try:
            doc = self.cluster_view()
            if inspect.isawaitable(doc):
                doc = await asyncio.wait_for(doc, min(2.0, self.interval_ms / 2000))
        except Exception as exc:
            self.counters.cluster_failures += 1
            level = logging.WARNING if self.counters.cluster_failures == 1 else logging.DEBUG
            log.log(level, "reading the cluster view for the watcher failed: %r", exc)
            return None
        return doc

    async def tick(self, now_ms: int | None = None, status: str | None = None) -> dict[str, Any]:
        """Build one snapshot and queue it for sending (the oldest goes when the buffer is full)."""
        if self._sampler is None:
            self._sampler = PsutilSampler()
        healthy = await self._store_healthy()
        cluster = await self._cluster()
        now = self.clock.now_ms() if now_ms is None else now_ms
        elapsed = now - self._previous_ms
        read = await self._read_channels(now)
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
            stats=read.listed,
            previous=read.previous,
            latencies=read.latencies,
            totals=read.node,
            cluster=cluster,
        )
        self._previous_ms = now
        self.counters.built += 1
        if len(self.buffer) == self.buffer.maxlen:
            self.counters.dropped += 1
        self.buffer.append(self._encoder.encode(snapshot))
        self._wakeup.set()
        return snapshot

    async def _read_channels(self, now: int) -> _Read:
        """Re-read the channels that changed, then pick the ones to list in full.

        Nothing changed: nothing is re-read or re-ranked; only the listed channels (whose oldest
        message ages) are read again.
        """
        engine = self.engine
        changed = list(engine.take_activity())
        fresh: list[ChannelStats] = []
        for i in range(0, len(changed), READ_CHUNK):
            if i:
                await asyncio.sleep(0)  # the first snapshot reads every channel: in steps
            fresh.extend(engine.stats_of(changed[i : i + READ_CHUNK], now))
        found = {st.name for st in fresh}
        before = self.table.update(fresh, (n for n in changed if n not in found))
        increases = dict.fromkeys(_COUNTERS, 0)
        activity: dict[str, int] = {}
        for st in fresh:
            old = before.get(st.name)
            for c in _COUNTERS:
                increases[c] += _increase(st, old, c)
            activity[st.name] = sum(
                _increase(st, old, c) for c in ("enqueued", "dequeued", "acked", "nacked")
            )
        if self._deepest is None:
            self._deepest = self.table.deepest(TOP_BY_DEPTH)
        elif changed:
            self._deepest = self.table.rerank(self._deepest, TOP_BY_DEPTH, changed, before)
        active = (name for name, amount in activity.items() if amount)
        busiest = heapq.nlargest(TOP_BY_ACTIVITY, active, key=activity.__getitem__)
        dead = heapq.nsmallest(TOP_DEAD_LETTER, self.table.dead_letters)
        listed = engine.stats_of(dict.fromkeys([*self._deepest, *busiest, *dead]), now)
        # A listed channel that did not change has the same counters as at the last snapshot.
        previous: dict[str, ChannelStats] = {}
        for st in listed:
            if st.name not in found:
                previous[st.name] = st
            elif st.name in before:
                previous[st.name] = before[st.name]
        latencies = engine.take_ack_latencies(changed)
        node = NodeTotals(
            channels=engine.channel_count(),
            **self.table.sums,
            **increases,
            ack_latencies=[ms for values in latencies.values() for ms in values],
        )
        return _Read(listed, previous, node, latencies)

    # -- running ----------------------------------------------------------------------------
    async def start(self) -> None:
        if not self.enabled or self._tasks:
            return
        self.started_ms = self._previous_ms = self.clock.now_ms()
        self._stopping = False
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
        # The flag as well as the cancel: on 3.11 wait_for can swallow a cancellation that
        # lands just as its inner wait completes, and a loop that lost it ran on for good (a
        # node whose port was taken hung in its shutdown, its first snapshot under way).
        self._stopping = True
        self._wakeup.set()
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
        while not self._stopping:
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
        while not self._stopping:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self.buffer and not self._stopping:
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
