"""The hub between ingest and browsers: shared state, the browsers, and the status sweeper.

Each browser has its own bounded outbox; a browser too slow to keep up gets a fresh full picture
instead of an ever-growing backlog, so no browser can slow the ingest of node snapshots.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from watcher.alerts import AlertBook, Thresholds, evaluate, gather
from watcher.cluster import ClusterState, normalize
from watcher.schema import ClusterView, encoder
from watcher.settings import WatcherSettings
from watcher.state import HistoryPoint, NodeRecord, Status, WatcherState

log = logging.getLogger("watcher")

OUTBOX = 256


def wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


class Browser:
    """One open page: an outbox of encoded messages and a flag that wakes its sender."""

    def __init__(self) -> None:
        self.outbox: deque[str] = deque()
        self.ready = asyncio.Event()

    def offer(self, data: str) -> bool:
        """Queue a message; False when the outbox is full (the caller resyncs this browser)."""
        if len(self.outbox) >= OUTBOX:
            return False
        self.outbox.append(data)
        self.ready.set()
        return True

    def reset(self, picture: str) -> None:
        self.outbox.clear()
        self.outbox.append(picture)
        self.ready.set()


class Hub:
    def __init__(self, settings: WatcherSettings, clock: Callable[[], int] = wall_clock_ms) -> None:
        self.settings = settings
        self.clock = clock
        self.state = WatcherState(
            history_ms=settings.history_s * 1000,
            step_ms=settings.history_step_ms,
            suspect_after=settings.suspect_after_intervals,
            down_after=settings.down_after_intervals,
            forget_after_ms=settings.forget_after_s * 1000,
            max_nodes=settings.max_nodes,
        )
        self.cluster = ClusterState(
            max_events=settings.timeline_events, max_reporters=settings.max_nodes
        )
        self._cluster_dirty = False
        self._cluster_urgent = False
        self._last_cluster_ms = 0
        self.browsers: set[Browser] = set()
        self.connection_ids = itertools.count(1)
        self._sweeper: asyncio.Task[None] | None = None
        self._last_status_ms = 0
        self.thresholds = Thresholds.of(settings)
        self.alerts = AlertBook()
        self._alerts_sent: list[dict[str, Any]] = []

    # -- browsers ---------------------------------------------------------------------------
    def encoded_picture(self) -> str:
        now = self.clock()
        picture = self.state.picture(now)
        picture["cluster"] = self.cluster_picture(now)
        picture["alerts"] = self.alerts.picture(now)
        return encoder.encode(picture).decode()

    def telemetry(self, now: int) -> dict[str, tuple[str, Status, bool]]:
        """Each reporting node by its URL: id, status to the watcher, whether it said it stopped."""
        out: dict[str, tuple[str, Status, bool]] = {}
        for record in self.state.nodes.values():
            url = normalize(record.latest.url)
            if url:
                stopped = record.latest.status == "stopped"
                out[url] = (record.node_id, self.state.status_of(record, now), stopped)
        return out

    def cluster_picture(self, now: int) -> dict[str, Any]:
        return self.cluster.picture(now, self.telemetry(now))

    def add_browser(self) -> Browser:
        """Register a page; its first message is the full picture, then every later update."""
        browser = Browser()
        browser.reset(self.encoded_picture())
        self.browsers.add(browser)
        return browser

    def remove_browser(self, browser: Browser) -> None:
        self.browsers.discard(browser)

    def publish(self, message: dict[str, Any]) -> None:
        if not self.browsers:
            return
        data = encoder.encode(message).decode()
        picture: str | None = None
        for browser in self.browsers:
            if not browser.offer(data):
                picture = picture or self.encoded_picture()
                browser.reset(picture)

    # -- ingest -----------------------------------------------------------------------------
    def node_updated(
        self, record: NodeRecord, point: HistoryPoint | None, view: ClusterView | None = None
    ) -> None:
        """A node's snapshot was kept; `view` is its cluster view, when it sent a valid one."""
        now = self.clock()
        if record.reports == 1:
            log.info("node %r reporting (%s)", record.node_id, record.latest.url)
        if view is not None:
            interval = record.latest.interval_ms
            for event in self.cluster.observe(
                record.node_id, record.latest.url, view, now, interval
            ):
                log.warning(
                    "shard %s: %s %s -> %s (epoch %d, %s ms without owner)",
                    event.shard,
                    event.kind,
                    event.from_url,
                    event.to_url,
                    event.epoch,
                    event.gap_ms,
                )
                self._cluster_urgent = True
            self._cluster_dirty = True
        self.publish(
            {
                "type": "node",
                "now_ms": now,
                "node": self.state.view(record, now),
                "point": point,
            }
        )

    def node_disconnected(self, node_id: str, connection: int) -> None:
        self.state.disconnected(node_id, connection)
        record = self.state.nodes.get(node_id)
        if record is not None and not record.connected:
            self.publish_status({})

    def publish_status(self, changed: dict[str, str], removed: list[str] | None = None) -> None:
        now = self.clock()
        self.publish(
            {
                "type": "status",
                "now_ms": now,
                "nodes": {
                    node_id: {"status": r.status, "connected": r.connected}
                    for node_id, r in self.state.nodes.items()
                },
                "changed": changed,
                "removed": removed or [],
                "ingest": self.state.counters.as_dict(),
            }
        )

    # -- alerts -----------------------------------------------------------------------------
    def check_alerts(self) -> None:
        """Evaluate the conditions now: raise, refresh and clear alerts; the browsers hear of
        any change (a new or cleared alert, or a value that moved)."""
        now = self.clock()
        facts = gather(
            self.state,
            self.cluster,
            self.telemetry(now),
            now,
            self.thresholds.dead_letter_window_ms,
        )
        raised, cleared = self.alerts.update(evaluate(facts, self.thresholds, now), now)
        for alert in raised:
            log.warning("alert raised: %s", alert.condition.message)
        for alert in cleared:
            log.info("alert cleared: %s", alert.condition.message)
        picture = self.alerts.picture(now)
        if raised or cleared or picture["alerts"] != self._alerts_sent:
            self._alerts_sent = picture["alerts"]
            self.publish({"type": "alerts", **picture})

    # -- the sweeper ------------------------------------------------------------------------
    def sweep(self) -> None:
        changed, removed = self.state.sweep(self.clock())
        for node_id, status in changed.items():
            log.info("node %r is %s", node_id, status)
        for node_id in removed:
            log.info("node %r forgotten", node_id)
        if removed:
            self.cluster.keep_only(set(self.state.nodes))
        now = self.clock()
        if changed or removed or now - self._last_status_ms >= 1000:
            self._last_status_ms = now
            self.publish_status(dict(changed), removed)
            # Owners' leases run out and statuses age even when no view arrives.
            self._cluster_dirty = self._cluster_dirty or bool(self.cluster.reporters)
            self.check_alerts()
        # Views arrive from every node every interval: the picture (which reads every view) goes
        # at most twice a second, at once when the owner of a shard changed.
        if self._cluster_urgent or (self._cluster_dirty and now - self._last_cluster_ms >= 500):
            self._cluster_dirty = self._cluster_urgent = False
            self._last_cluster_ms = now
            self.publish({"type": "cluster", "now_ms": now, "cluster": self.cluster_picture(now)})

    async def _sweep_forever(self, period_s: float) -> None:
        while True:
            await asyncio.sleep(period_s)
            try:
                self.sweep()
            except Exception:  # pragma: no cover - a bug here must not stop the watcher
                log.exception("status sweep failed")

    def start(self, period_s: float = 0.25) -> None:
        self._sweeper = asyncio.create_task(self._sweep_forever(period_s), name="watcher-sweeper")

    async def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None
        self.browsers.clear()
