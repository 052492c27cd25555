"""Alerts: what is wrong now, raised and cleared as the watcher's picture changes.

Two halves, as in the rest of the watcher:

- `evaluate(facts, thresholds, now_ms)` is pure: from the facts the watcher holds (each node's
  status, memory, listed channels; each shard's owner; each backup's lag) it answers the
  conditions that hold now. Tests drive it from tables.
- `AlertBook.update(conditions, now_ms)` remembers when each condition started, keeps it while
  it holds and clears it when it no longer does (keeping the last cleared ones, with their end).

`gather` reads the facts out of the hub's state and cluster state. The conditions mirror the
Prometheus rules in deploy/prometheus/alerts.yml over the node's /metrics names.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from app.models import DEAD_LETTER_SUFFIX
from watcher.cluster import ClusterState, normalize
from watcher.settings import WatcherSettings
from watcher.state import NodeRecord, Status, WatcherState

Kind = Literal[
    "node_down",
    "node_suspect",
    "shard_unowned",
    "backup_lag",
    "dead_letters_growing",
    "oldest_ready",
    "memory",
]
Severity = Literal["critical", "warning"]
NodeStatus = Literal["up", "suspect", "down", "failed"]

SEVERITY: dict[Kind, Severity] = {
    "node_down": "critical",
    "node_suspect": "warning",
    "shard_unowned": "critical",
    "backup_lag": "warning",
    "dead_letters_growing": "warning",
    "oldest_ready": "warning",
    "memory": "warning",
}
# Critical first in every list, then by start time.
_RANK: dict[Severity, int] = {"critical": 0, "warning": 1}


@dataclass(frozen=True, slots=True)
class Thresholds:
    backup_lag_beats: int = 5
    dead_letter_growth: int = 1
    dead_letter_window_ms: int = 600_000
    oldest_ready_ms: float = 300_000.0  # 0: off
    memory_bytes: int = 1024**3  # 0: off

    @classmethod
    def of(cls, settings: WatcherSettings) -> Thresholds:
        return cls(
            backup_lag_beats=settings.alert_backup_lag_beats,
            dead_letter_growth=settings.alert_dead_letter_growth,
            # No further back than the history the watcher keeps.
            dead_letter_window_ms=min(settings.alert_dead_letter_window_s, settings.history_s)
            * 1000,
            oldest_ready_ms=settings.alert_oldest_ready_s * 1000,
            memory_bytes=settings.alert_memory_bytes,
        )


@dataclass(frozen=True, slots=True)
class ChannelFacts:
    ready: int
    oldest_ready_age_ms: float | None = None


@dataclass(frozen=True, slots=True)
class NodeFacts:
    """One node as the watcher sees it. `name` is its id (or URL when only peers know it);
    `dead_letters`: each dead-letter channel it lists, as (watcher time, ready) samples, oldest
    first, the last one now's."""

    name: str
    status: NodeStatus
    url: str = ""
    stopped: bool = False
    memory_rss_bytes: int | None = None
    channels: Mapping[str, ChannelFacts] = field(default_factory=dict)
    dead_letters: Mapping[str, Sequence[tuple[int, int]]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ShardFacts:
    id: str
    owner: str | None
    # The last owner seen, and since when none is (None: not known).
    last_owner: str | None = None
    unowned_since_ms: int | None = None


@dataclass(frozen=True, slots=True)
class Facts:
    nodes: Sequence[NodeFacts] = ()
    shards: Sequence[ShardFacts] = ()
    # Heartbeats behind, per backup URL and shard.
    lag: Mapping[str, Mapping[str, int]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Condition:
    """A condition that holds now; `key` names it across evaluations (kind and subject)."""

    key: str
    kind: Kind
    subject: str
    message: str
    node: str | None = None
    value: float | None = None
    threshold: float | None = None

    @property
    def severity(self) -> Severity:
        return SEVERITY[self.kind]


def _condition(
    kind: Kind,
    subject: str,
    message: str,
    node: str | None = None,
    value: float | None = None,
    threshold: float | None = None,
) -> Condition:
    return Condition(f"{kind}:{subject}", kind, subject, message, node, value, threshold)


def _mib(n: float) -> str:
    return f"{n / 1024**2:.0f} MiB"


def _growth(samples: Sequence[tuple[int, int]], since_ms: int) -> tuple[int, int] | None:
    """(ready at the start of the window, ready now) of a channel's samples, or None."""
    if not samples:
        return None
    for t, ready in samples:
        if t >= since_ms:
            return ready, samples[-1][1]
    return samples[-1][1], samples[-1][1]


def evaluate(facts: Facts, thresholds: Thresholds, now_ms: int) -> list[Condition]:
    """Every condition that holds now (pure). A channel reported by two nodes (its old owner's
    last report and its new owner's) counts once, with the worst value."""
    out: dict[str, Condition] = {}

    def add(cond: Condition) -> None:
        old = out.get(cond.key)
        if old is None or (cond.value or 0.0) > (old.value or 0.0):
            out[cond.key] = cond

    for node in facts.nodes:
        where = f" ({node.url})" if node.url and node.url != node.name else ""
        if node.status in ("down", "failed"):
            why = {
                "failed": "a primary that stopped reporting and that no peer sees up",
                "down": "said it stopped" if node.stopped else "stopped reporting",
            }[node.status]
            message = f"node {node.name}{where} is down: {why}"
            add(_condition("node_down", node.name, message, node.name))
            continue  # what it reported last is stale: its channels and memory do not count
        if node.status == "suspect":
            add(
                _condition(
                    "node_suspect",
                    node.name,
                    f"node {node.name}{where} is late with its reports (suspect)",
                    node.name,
                )
            )
        rss = node.memory_rss_bytes
        if thresholds.memory_bytes and rss is not None and rss > thresholds.memory_bytes:
            add(
                _condition(
                    "memory",
                    node.name,
                    f"node {node.name} uses {_mib(rss)} of memory (RSS), above "
                    f"{_mib(thresholds.memory_bytes)}",
                    node.name,
                    rss,
                    thresholds.memory_bytes,
                )
            )
        limit = thresholds.oldest_ready_ms
        for name, ch in node.channels.items():
            age = ch.oldest_ready_age_ms
            if limit and ch.ready and age is not None and age > limit:
                add(
                    _condition(
                        "oldest_ready",
                        name,
                        f"channel {name}: the oldest ready message has waited {age / 1000:.0f} s "
                        f"(above {limit / 1000:.0f} s): are its consumers stuck?",
                        node.name,
                        age,
                        limit,
                    )
                )
        window = thresholds.dead_letter_window_ms
        for name, samples in node.dead_letters.items():
            seen = _growth(samples, now_ms - window)
            if seen is None:
                continue
            then, ready = seen
            if ready - then >= thresholds.dead_letter_growth:
                add(
                    _condition(
                        "dead_letters_growing",
                        name,
                        f"dead-letter channel {name} grew from {then} to {ready} ready "
                        f"messages in {window / 1000:.0f} s",
                        node.name,
                        ready - then,
                        thresholds.dead_letter_growth,
                    )
                )
    for shard in facts.shards:
        if shard.owner is None and (shard.last_owner or shard.unowned_since_ms is not None):
            last = f" (last owner {shard.last_owner})" if shard.last_owner else ""
            add(_condition("shard_unowned", shard.id, f"shard {shard.id} has no owner{last}"))
    for backup, lags in facts.lag.items():
        for shard_id, beats in lags.items():
            if beats > thresholds.backup_lag_beats:
                add(
                    _condition(
                        "backup_lag",
                        f"{shard_id}@{backup}",
                        f"backup {backup} of shard {shard_id} is {beats} heartbeats behind "
                        f"(above {thresholds.backup_lag_beats})",
                        backup,
                        beats,
                        thresholds.backup_lag_beats,
                    )
                )
    return list(out.values())


@dataclass(slots=True)
class Alert:
    condition: Condition
    started_ms: int
    ended_ms: int | None = None

    def as_dict(self) -> dict[str, Any]:
        c = self.condition
        return {
            "id": c.key,
            "kind": c.kind,
            "severity": c.severity,
            "subject": c.subject,
            "node": c.node,
            "message": c.message,
            "value": c.value,
            "threshold": c.threshold,
            "started_ms": self.started_ms,
            "ended_ms": self.ended_ms,
        }


class AlertBook:
    """The alerts raised and not yet cleared, and the last `keep_cleared` cleared ones."""

    def __init__(self, keep_cleared: int = 50) -> None:
        self.active: dict[str, Alert] = {}
        self.cleared: deque[Alert] = deque(maxlen=keep_cleared)

    def update(
        self, conditions: Iterable[Condition], now_ms: int
    ) -> tuple[list[Alert], list[Alert]]:
        """Raise the new conditions, refresh those still holding (their start stays), clear the
        others; returns (raised, cleared)."""
        raised: list[Alert] = []
        holding: set[str] = set()
        for cond in conditions:
            holding.add(cond.key)
            alert = self.active.get(cond.key)
            if alert is None:
                alert = self.active[cond.key] = Alert(cond, now_ms)
                raised.append(alert)
            else:
                alert.condition = cond
        cleared: list[Alert] = []
        for key in [k for k in self.active if k not in holding]:
            alert = self.active.pop(key)
            alert.ended_ms = now_ms
            self.cleared.append(alert)
            cleared.append(alert)
        return raised, cleared

    def picture(self, now_ms: int) -> dict[str, Any]:
        active = sorted(
            self.active.values(),
            key=lambda a: (_RANK[a.condition.severity], a.started_ms, a.condition.key),
        )
        return {
            "now_ms": now_ms,
            "alerts": [a.as_dict() for a in active],
            "cleared": [a.as_dict() for a in reversed(self.cleared)],
        }


def _card_status(card: Mapping[str, Any]) -> NodeStatus:
    status = card["status"]
    return status if status in ("up", "suspect", "down", "failed") else "down"


def gather(
    state: WatcherState,
    cluster: ClusterState,
    telemetry: Mapping[str, tuple[str, Status, bool]],
    now_ms: int,
    window_ms: int,
) -> Facts:
    """The facts `evaluate` needs, from the watcher's state: each reporting node (its status
    merged with its peers' view when it is in a cluster), the nodes only peers report, the
    shards and the backups' lag."""
    cards = {c["url"]: c for c in cluster.node_cards(now_ms, dict(telemetry))}
    nodes: list[NodeFacts] = []
    covered: set[str] = set()
    for record in state.nodes.values():
        snap = record.latest
        url = normalize(snap.url)
        card = cards.get(url) if url else None
        status: NodeStatus = (
            _card_status(card) if card is not None else state.status_of(record, now_ms)
        )
        if url:
            covered.add(url)
        channels = {ch.name: ChannelFacts(ch.ready, ch.oldest_ready_age_ms) for ch in snap.channels}
        nodes.append(
            NodeFacts(
                name=record.node_id,
                status=status,
                url=snap.url,
                stopped=snap.status == "stopped",
                memory_rss_bytes=snap.memory_rss_bytes,
                channels=channels,
                dead_letters=_dead_letter_samples(record, now_ms - window_ms, snap.v >= 4),
            )
        )
    for url, card in cards.items():
        if url not in covered:  # known from peers' views only
            nodes.append(NodeFacts(name=card["id"] or url, status=_card_status(card), url=url))
    shards = [
        ShardFacts(row["id"], row["owner"], row["last_owner"], row["unowned_since_ms"])
        for row in cluster.shard_rows(now_ms, dict(telemetry))
    ]
    lag = {
        c["url"]: c["lag"]
        for c in cards.values()
        if c["lag"] and c["status"] not in ("down", "failed")
    }
    return Facts(nodes, shards, lag)


def _dead_letter_samples(
    record: NodeRecord, since_ms: int, lists_every_one: bool
) -> dict[str, list[tuple[int, int]]]:
    """Each dead-letter channel the node lists now with ready messages, sampled over the window
    from its history. Snapshots of version 4 list every such channel, so one missing from a
    point was empty then; an older node's point may simply not list it (skipped)."""
    snap = record.latest
    names = [ch.name for ch in snap.channels if ch.name.endswith(DEAD_LETTER_SUFFIX)]
    if not names:
        return {}
    samples: dict[str, list[tuple[int, int]]] = {name: [] for name in names}
    for point in record.history:
        if point.t < since_ms:
            continue
        for name in names:
            kept = point.channels.get(name)
            if kept is not None:
                samples[name].append((point.t, kept.ready))
            elif lists_every_one:
                samples[name].append((point.t, 0))
    for ch in snap.channels:
        if ch.name in samples:
            samples[ch.name].append((record.received_ms, ch.ready))
    return samples
