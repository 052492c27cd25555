"""Alerts, pure parts: `evaluate` from tables, the book that tracks start and clear times, and
the hub that feeds them from what nodes report (its own clock, no processes)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import msgspec
import pytest

from watcher.alerts import (
    AlertBook,
    ChannelFacts,
    Condition,
    Facts,
    NodeFacts,
    ShardFacts,
    Thresholds,
    evaluate,
)
from watcher.hub import Hub
from watcher.schema import ChannelSnapshot, ClusterView, NodeSnapshot, cluster_decoder
from watcher.settings import WatcherSettings, load_settings

NOW = 1_700_000_000_000
T = Thresholds(
    backup_lag_beats=5,
    dead_letter_growth=2,
    dead_letter_window_ms=60_000,
    oldest_ready_ms=30_000,
    memory_bytes=1000,
)
GiB = 1024**3


def node(name: str = "n1", status: Any = "up", **kw: Any) -> NodeFacts:
    return NodeFacts(name=name, status=status, **kw)


CASES: list[tuple[str, Facts, set[str]]] = [
    ("all well", Facts([node(memory_rss_bytes=1000)]), set()),
    ("suspect", Facts([node(status="suspect")]), {"node_suspect:n1"}),
    ("down", Facts([node(status="down", stopped=True)]), {"node_down:n1"}),
    ("failed primary", Facts([node(status="failed")]), {"node_down:n1"}),
    ("memory above", Facts([node(memory_rss_bytes=1001)]), {"memory:n1"}),
    ("memory off", Facts([node(memory_rss_bytes=10**12)]), set()),
    (
        "a down node's stale numbers do not count",
        Facts([node(status="down", memory_rss_bytes=10**9)]),
        {"node_down:n1"},
    ),
    (
        "a suspect node's numbers still do",
        Facts([node(status="suspect", memory_rss_bytes=10**9)]),
        {"node_suspect:n1", "memory:n1"},
    ),
    (
        "oldest ready above, at, and empty",
        Facts(
            [
                node(
                    channels={
                        "stuck": ChannelFacts(3, 30_001),
                        "fine": ChannelFacts(3, 30_000),
                        "unknown": ChannelFacts(3, None),
                        "empty": ChannelFacts(0, 90_000),
                    }
                )
            ]
        ),
        {"oldest_ready:stuck"},
    ),
    (
        "a channel reported by two nodes counts once",
        Facts(
            [
                node("a", channels={"stuck": ChannelFacts(1, 40_000)}),
                node("b", channels={"stuck": ChannelFacts(1, 50_000)}),
            ]
        ),
        {"oldest_ready:stuck"},
    ),
    (
        "dead letters grew by the growth within the window",
        Facts([node(dead_letters={"jobs.dlq": [(NOW - 70_000, 0), (NOW - 60_000, 1), (NOW, 3)]})]),
        {"dead_letters_growing:jobs.dlq"},
    ),
    (
        "dead letters grew before the window, flat within it",
        Facts([node(dead_letters={"jobs.dlq": [(NOW - 70_000, 0), (NOW - 59_000, 9), (NOW, 9)]})]),
        set(),
    ),
    (
        "dead letters grew by less than the growth",
        Facts([node(dead_letters={"jobs.dlq": [(NOW - 30_000, 4), (NOW, 5)]})]),
        set(),
    ),
    (
        "dead letters being drained",
        Facts([node(dead_letters={"jobs.dlq": [(NOW - 30_000, 9), (NOW, 2)]})]),
        set(),
    ),
    (
        "shard without owner",
        Facts(
            shards=[
                ShardFacts("s0", None, "http://a", NOW - 5000),
                ShardFacts("s1", "http://b", "http://b"),
                ShardFacts("s2", None),  # never seen yet: nothing known
            ]
        ),
        {"shard_unowned:s0"},
    ),
    (
        "backup lag above N",
        Facts(lag={"http://b": {"s0": 6, "s1": 5}}),
        {"backup_lag:s0@http://b"},
    ),
]


# Cases run with T unless named here.
OTHER_THRESHOLDS = {"memory off": replace(T, memory_bytes=0)}


@pytest.mark.parametrize(("name", "facts", "expected"), CASES, ids=[c[0] for c in CASES])
def test_evaluate(name: str, facts: Facts, expected: set[str]) -> None:
    got = evaluate(facts, OTHER_THRESHOLDS.get(name, T), NOW)
    assert {c.key for c in got} == expected
    for c in got:
        assert c.message and c.severity in ("critical", "warning")


def test_the_worst_value_of_a_channel_is_kept_and_messages_say_why() -> None:
    facts = Facts(
        [
            node("a", channels={"stuck": ChannelFacts(1, 40_000)}),
            node("b", channels={"stuck": ChannelFacts(1, 50_000)}),
        ]
    )
    (cond,) = evaluate(facts, T, NOW)
    assert cond.value == 50_000 and cond.node == "b" and cond.threshold == 30_000
    assert "50 s" in cond.message and "stuck" in cond.message
    (down,) = evaluate(Facts([node(status="down", stopped=True, url="http://x")]), T, NOW)
    assert down.severity == "critical" and "said it stopped" in down.message


def cond(key: str, message: str = "m") -> Condition:
    kind, _, subject = key.partition(":")
    return Condition(key, kind, subject, message)  # type: ignore[arg-type]


def test_the_book_keeps_the_start_time_and_clears() -> None:
    book = AlertBook(keep_cleared=2)
    raised, cleared = book.update([cond("memory:a")], NOW)
    assert [a.condition.key for a in raised] == ["memory:a"] and cleared == []
    # Still holding a second later, with a new value: the same alert, its start unchanged.
    raised, cleared = book.update([cond("memory:a", "m2"), cond("node_down:b")], NOW + 1000)
    assert [a.condition.key for a in raised] == ["node_down:b"]
    picture = book.picture(NOW + 1000)
    # Critical first.
    assert [a["id"] for a in picture["alerts"]] == ["node_down:b", "memory:a"]
    assert picture["alerts"][1]["started_ms"] == NOW and picture["alerts"][1]["message"] == "m2"
    raised, cleared = book.update([cond("node_down:b")], NOW + 2000)
    assert raised == [] and [a.condition.key for a in cleared] == ["memory:a"]
    picture = book.picture(NOW + 2000)
    assert [a["id"] for a in picture["alerts"]] == ["node_down:b"]
    assert picture["cleared"] == [
        {**picture["cleared"][0], "id": "memory:a", "started_ms": NOW, "ended_ms": NOW + 2000}
    ]
    # Raised again later: a new alert with a new start.
    book.update([cond("memory:a")], NOW + 3000)
    assert book.active["memory:a"].started_ms == NOW + 3000
    book.update([], NOW + 4000)
    assert len(book.cleared) == 2  # bounded


# -- the hub, fed snapshots with its own clock ---------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> int:
        return self.now


def settings(**kw: Any) -> WatcherSettings:
    return WatcherSettings(_env_file=None, token="t" * 12, **kw)  # type: ignore[call-arg]


def feed(hub: Hub, clock: Clock, snapshot: NodeSnapshot, view: ClusterView | None = None) -> None:
    kept = hub.state.accept(snapshot, clock())
    assert kept is not None
    hub.node_updated(*kept, view)


def snap(*channels: ChannelSnapshot, **kw: Any) -> NodeSnapshot:
    kw.setdefault("node_id", "n1")
    kw.setdefault("v", 4)
    return NodeSnapshot(type="snapshot", interval_ms=1000, channels=list(channels), **kw)


def active(hub: Hub) -> dict[str, dict[str, Any]]:
    hub.check_alerts()
    return {a["id"]: a for a in hub.alerts.picture(hub.clock())["alerts"]}


def test_the_hub_raises_and_clears_a_growing_dead_letter_channel() -> None:
    clock = Clock()
    hub = Hub(settings(alert_dead_letter_window_s=10, history_step_ms=1000), clock)
    dlq = "jobs.dlq"
    # Flat for a while: the channel listed with 2, then one more arrives.
    for i in range(5):
        clock.now = NOW + i * 1000
        feed(hub, clock, snap(ChannelSnapshot(name=dlq, ready=2, delayed=0, in_flight=0)))
    assert active(hub) == {}
    clock.now += 1000
    feed(hub, clock, snap(ChannelSnapshot(name=dlq, ready=3, delayed=0, in_flight=0)))
    alert = active(hub)[f"dead_letters_growing:{dlq}"]
    started = clock.now
    assert alert["started_ms"] == started and "from 2 to 3" in alert["message"]
    # No growth for a whole window: cleared.
    for _ in range(10):
        clock.now += 1000
        feed(hub, clock, snap(ChannelSnapshot(name=dlq, ready=3, delayed=0, in_flight=0)))
        if clock.now - started < 10_000:
            assert active(hub)[f"dead_letters_growing:{dlq}"]["started_ms"] == started
    clock.now += 1000
    feed(hub, clock, snap(ChannelSnapshot(name=dlq, ready=3, delayed=0, in_flight=0)))
    assert active(hub) == {}
    assert hub.alerts.picture(clock.now)["cleared"][0]["ended_ms"] == clock.now


def test_a_dead_letter_channel_new_in_a_version_4_snapshot_grew_from_empty() -> None:
    clock = Clock()
    hub = Hub(settings(alert_dead_letter_window_s=10, history_step_ms=1000), clock)
    feed(hub, clock, snap(ChannelSnapshot(name="orders", ready=1, delayed=0, in_flight=0)))
    clock.now += 1000
    dlq = ChannelSnapshot(name="orders.dlq", ready=1, delayed=0, in_flight=0)
    feed(hub, clock, snap(dlq))
    assert "dead_letters_growing:orders.dlq" in active(hub)
    # From an older node, a channel missing from a snapshot may merely not have been listed.
    clock = Clock()
    hub = Hub(settings(alert_dead_letter_window_s=10, history_step_ms=1000), clock)
    feed(hub, clock, snap(ChannelSnapshot(name="orders", ready=1, delayed=0, in_flight=0), v=3))
    clock.now += 1000
    feed(hub, clock, snap(dlq, v=3))
    assert active(hub) == {}


def test_the_hub_alerts_on_memory_and_a_silent_node_then_clears() -> None:
    clock = Clock()
    hub = Hub(settings(alert_memory_bytes=GiB), clock)
    feed(hub, clock, snap(memory_rss_bytes=GiB + 1))
    assert set(active(hub)) == {"memory:n1"}
    clock.now += 2000  # two intervals without a report: suspect
    hub.sweep()
    assert set(active(hub)) == {"memory:n1", "node_suspect:n1"}
    clock.now += 1000
    hub.sweep()
    assert set(active(hub)) == {"node_down:n1"}
    feed(hub, clock, snap(memory_rss_bytes=GiB))
    assert active(hub) == {}


def test_the_hub_alerts_on_a_shard_without_owner_and_a_lagging_backup() -> None:
    clock = Clock()
    hub = Hub(settings(alert_backup_lag_beats=3), clock)

    def view(owner: str, lag: int) -> ClusterView:
        doc = {
            "version": 1,
            "node": {"id": "p", "url": "http://p", "role": "primary"},
            "shards": [
                {
                    "id": "s0",
                    "primary": "http://p",
                    "backups": ["http://b"],
                    "owner": owner,
                    "epoch": 1,
                    "lease_expires_in_ms": 1500,
                }
            ],
            "nodes": [
                {"url": "http://p", "id": "p", "role": "primary", "shards": ["s0"]},
                {"url": "http://b", "id": "b", "role": "backup", "lag": {"s0": lag}},
            ],
        }
        decoded = cluster_decoder.decode(msgspec.json.encode(doc))
        assert decoded is not None
        return decoded

    feed(hub, clock, snap(node_id="p", url="http://p"), view("http://p", 1))
    assert active(hub) == {}
    clock.now += 1000
    feed(hub, clock, snap(node_id="p", url="http://p"), view("http://p", 4))
    assert set(active(hub)) == {"backup_lag:s0@http://b"}
    # The primary goes silent and its lease runs out: down, and its shard has no owner (its
    # backup, known only from the primary's view, is unknown now: down too).
    clock.now += 3000
    hub.sweep()
    assert set(active(hub)) == {"node_down:p", "node_down:b", "shard_unowned:s0"}


def test_alert_settings_come_from_the_environment_and_the_window_fits_the_history(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("WATCHER_TOKEN", "t" * 12)
    monkeypatch.setenv("WATCHER_ALERT_OLDEST_READY_S", "2.5")
    monkeypatch.setenv("WATCHER_ALERT_MEMORY_BYTES", "0")
    monkeypatch.setenv("WATCHER_ALERT_BACKUP_LAG_BEATS", "9")
    monkeypatch.setenv("WATCHER_ALERT_DEAD_LETTER_GROWTH", "4")
    monkeypatch.setenv("WATCHER_ALERT_DEAD_LETTER_WINDOW_S", "3600")
    monkeypatch.setenv("WATCHER_HISTORY_S", "600")
    t = Thresholds.of(load_settings(_env_file=None))
    assert t == Thresholds(
        backup_lag_beats=9,
        dead_letter_growth=4,
        dead_letter_window_ms=600_000,
        oldest_ready_ms=2500.0,
        memory_bytes=0,
    )
    monkeypatch.setenv("WATCHER_ALERT_BACKUP_LAG_BEATS", "0")
    with pytest.raises(Exception, match="WATCHER_ALERT_BACKUP_LAG_BEATS"):
        load_settings(_env_file=None)
