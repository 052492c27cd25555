"""The watcher's pure parts: status from report age, bounded history, totals, limits."""

from __future__ import annotations

import itertools
from typing import Any

import msgspec

from watcher.feed import origin_ok
from watcher.hub import Hub
from watcher.ingest import TokenBucket, _take, token_ok
from watcher.schema import ChannelSnapshot, NodeSnapshot, NodeTotals
from watcher.settings import WatcherSettings
from watcher.state import WatcherState, totals

T0 = 1_700_000_000_000


def snap(node_id: str = "n1", interval_ms: int = 1000, **kw: Any) -> NodeSnapshot:
    channels = kw.pop("channels", [ChannelSnapshot(name="orders", ready=3, delayed=1, in_flight=2)])
    return NodeSnapshot(
        type="snapshot", node_id=node_id, interval_ms=interval_ms, channels=channels, **kw
    )


def test_a_node_that_stops_reporting_turns_suspect_then_down_within_three_intervals() -> None:
    state = WatcherState(suspect_after=2.0, down_after=3.0)
    state.accept(snap(interval_ms=1000), T0)
    record = state.nodes["n1"]
    assert state.status_of(record, T0 + 1_999) == "up"
    assert state.sweep(T0 + 1_999) == ({}, [])
    assert state.sweep(T0 + 2_000) == ({"n1": "suspect"}, [])
    assert state.sweep(T0 + 2_999) == ({}, [])
    assert state.sweep(T0 + 3_000) == ({"n1": "down"}, [])
    # Reporting again brings it straight back.
    state.accept(snap(interval_ms=1000), T0 + 10_000)
    assert state.sweep(T0 + 10_100) == ({}, [])
    assert record.status == "up"


def test_down_detection_follows_each_nodes_own_interval() -> None:
    state = WatcherState()
    state.accept(snap("fast", interval_ms=100), T0)
    state.accept(snap("slow", interval_ms=5000), T0)
    changed, _ = state.sweep(T0 + 300)
    assert changed == {"fast": "down"}
    assert state.status_of(state.nodes["slow"], T0 + 300) == "up"


def test_a_node_that_says_it_stopped_is_down_at_once() -> None:
    state = WatcherState()
    state.accept(snap(status="stopped"), T0)
    assert state.status_of(state.nodes["n1"], T0) == "down"


def test_down_nodes_are_forgotten_after_a_while() -> None:
    state = WatcherState(forget_after_ms=60_000)
    state.accept(snap(), T0)
    assert state.sweep(T0 + 59_999)[1] == []
    assert state.sweep(T0 + 60_000)[1] == ["n1"]
    assert "n1" not in state.nodes


def test_history_is_bounded_by_the_window_and_downsampled_to_the_step() -> None:
    state = WatcherState(history_ms=10_000, step_ms=1000, forget_after_ms=0)
    assert state.max_points == 11
    for i in range(300):  # 200 ms apart for 60 s
        state.accept(snap(interval_ms=200), T0 + i * 200)
    history = state.nodes["n1"].history
    assert len(history) <= state.max_points
    times = [p.t for p in history]
    assert times[-1] - times[0] <= 10_000
    assert all(b - a >= 1000 for a, b in itertools.pairwise(times))
    # Old points also go when time passes without reports.
    state.sweep(T0 + 300 * 200 + 20_000)
    assert len(history) == 0


def test_dead_letter_moves_add_up_between_history_points() -> None:
    state = WatcherState(step_ms=1000)
    dead = [ChannelSnapshot(name="orders", ready=0, delayed=0, in_flight=0, dead_lettered=2)]
    for i in range(5):  # points at 0 and 1000: the second holds the moves of 200..1000
        state.accept(snap(interval_ms=200, channels=dead), T0 + i * 200 + (200 if i == 4 else 0))
    points = list(state.nodes["n1"].history)
    assert [p.channels["orders"].dead_lettered for p in points] == [2, 8]


def test_totals_add_rates_and_counts_and_take_the_worst_delay() -> None:
    channels = [
        ChannelSnapshot(
            name="a", ready=5, delayed=1, in_flight=2, enqueue_rate=10.5, dequeue_rate=4.0,
            ack_rate=3.0, nack_rate=1.0, oldest_ready_age_ms=800.0, ack_p99_ms=50.0,
        ),
        ChannelSnapshot(
            name="b", ready=7, delayed=0, in_flight=1, enqueue_rate=1.5, dequeue_rate=6.0,
            ack_rate=6.0, oldest_ready_age_ms=None, ack_p99_ms=90.0, dead_lettered=3,
        ),
    ]  # fmt: skip
    t = totals(snap(channels=channels))
    assert t["channels"] == 2 and t["ready"] == 12 and t["in_flight"] == 3
    assert t["enqueue_rate"] == 12.0 and t["dequeue_rate"] == 10.0 and t["ack_rate"] == 9.0
    assert t["oldest_ready_age_ms"] == 800.0 and t["ack_p99_ms"] == 90.0
    assert t["dead_lettered"] == 3


def test_a_node_with_many_channels_is_shown_by_its_totals_and_count() -> None:
    listed = [
        ChannelSnapshot(name="deep", ready=900, delayed=0, in_flight=0, oldest_ready_age_ms=5.0)
    ]
    node = NodeTotals(ready=1000, delayed=4, in_flight=2, enqueue_rate=7.0, dead_lettered=3)
    state = WatcherState(step_ms=1000)
    kept = state.accept(snap(channels=listed, channels_total=100_000, totals=node, v=2), T0)
    assert kept is not None
    record, point = kept
    view = state.view(record, T0)
    assert view["status"] == "up"
    t = view["totals"]
    assert t["channels"] == 100_000 and t["listed"] == 1
    assert (t["ready"], t["delayed"], t["in_flight"]) == (1000, 4, 2)
    assert t["enqueue_rate"] == 7.0 and t["oldest_ready_age_ms"] == 5.0
    # The history point carries the node totals after the listed channels.
    assert point is not None and point.totals.ready == 1000 and point.totals.dead_lettered == 3
    assert set(point.channels) == {"deep"}


def test_the_watcher_tracks_at_most_max_nodes() -> None:
    state = WatcherState(max_nodes=2)
    assert state.accept(snap("a"), T0) is not None
    assert state.accept(snap("b"), T0) is not None
    assert state.accept(snap("c"), T0) is None
    assert state.accept(snap("a"), T0 + 1) is not None  # known nodes still report
    assert state.counters.too_many == 1 and set(state.nodes) == {"a", "b"}


def test_picture_has_every_node_and_its_history() -> None:
    state = WatcherState()
    state.accept(snap("a"), T0)
    state.accept(snap("b"), T0)
    picture = state.picture(T0 + 10)
    assert picture["type"] == "hello"
    assert [n["id"] for n in picture["nodes"]] == ["a", "b"]
    assert len(picture["history"]["a"]) == 1
    assert picture["nodes"][0]["totals"]["ready"] == 3


def test_disconnect_of_an_old_connection_does_not_mark_a_newer_one() -> None:
    state = WatcherState()
    state.accept(snap(), T0, connection=1)
    state.accept(snap(), T0 + 1, connection=2)
    state.disconnected("n1", 1)
    assert state.nodes["n1"].connected
    state.disconnected("n1", 2)
    assert not state.nodes["n1"].connected


def test_token_check() -> None:
    assert token_ok("Bearer s3cret-token", "s3cret-token")
    assert token_ok("bearer s3cret-token", "s3cret-token")
    assert not token_ok("Bearer wrong", "s3cret-token")
    assert not token_ok("s3cret-token", "s3cret-token")
    assert not token_ok(None, "s3cret-token")
    assert not token_ok("Basic s3cret-token", "s3cret-token")


def test_token_bucket() -> None:
    bucket = TokenBucket(rate=10, burst=5, now=0.0)
    assert sum(bucket.take(0.0) for _ in range(20)) == 5
    assert sum(bucket.take(0.5) for _ in range(20)) == 5  # 0.5 s refills 5
    assert not bucket.take(0.5)


def test_origin_check() -> None:
    own = frozenset({"localhost", "w"})
    assert origin_ok(None, "w:8080", frozenset(), own)
    assert origin_ok("http://w:8080", "w:8080", frozenset(), own)
    assert not origin_ok("http://evil.example", "w:8080", frozenset(), own)
    # DNS rebinding: the attacker's page and Host agree, under the attacker's name.
    assert not origin_ok("http://evil.example:8080", "evil.example:8080", frozenset(), own)
    assert origin_ok("https://ops.example", "w:8080", frozenset({"https://ops.example"}), own)


def test_ingest_refuses_a_snapshot_listing_more_channels_than_allowed() -> None:
    settings = WatcherSettings(
        token="t0ken-t0ken",
        max_channels=3,
        _env_file=None,  # type: ignore[call-arg]
    )
    hub = Hub(settings, clock=lambda: T0)
    listing = [ChannelSnapshot(name=f"c{i}", ready=0, delayed=0, in_flight=0) for i in range(4)]
    too_many = msgspec.json.encode(snap(channels=listing, channels_total=100_000, v=2))
    assert _take(hub, {"bytes": too_many}, 1, None) is None
    assert hub.state.counters.invalid == 1
    within = msgspec.json.encode(snap(channels=listing[:3], channels_total=100_000, v=2))
    assert _take(hub, {"bytes": within}, 1, None) == "n1"
