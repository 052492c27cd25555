"""The watcher's cluster picture, fed node views (telemetry schema v3) with a fake clock: owners,
the failover timeline with its gap, failed primaries, backups' lag, the shards table."""

from __future__ import annotations

from typing import Any

import msgspec
from cluster_views import IDS, LEASE, A, B, C, D, cluster_doc

from watcher.cluster import ClusterState
from watcher.hub import Hub
from watcher.ingest import _take
from watcher.schema import ClusterView
from watcher.settings import WatcherSettings

T0 = 1_700_000_000_000
INTERVAL = 1000


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> int:
        return self.now


def frame(me: str, cluster: dict[str, Any] | None, **kw: Any) -> bytes:
    snap: dict[str, Any] = {
        "type": "snapshot",
        "v": 3,
        "node_id": IDS[me],
        "url": me,
        "interval_ms": INTERVAL,
        "channels": [],
        **kw,
    }
    if cluster is not None:
        snap["cluster"] = cluster
    return msgspec.json.encode(snap)


def make_hub() -> tuple[Hub, Clock]:
    clock = Clock()
    settings = WatcherSettings(token="t0ken-t0ken", _env_file=None)  # type: ignore[call-arg]
    return Hub(settings, clock), clock


def report(hub: Hub, raw: bytes) -> None:
    """What /ingest does with a frame."""
    assert _take(hub, {"bytes": raw}, 0, None) is not None


HEALTHY = {"s1": (A, 1, LEASE), "s2": (C, 1, LEASE)}


def everyone_reports(hub: Hub, owners: dict[str, tuple[str | None, int, int | None]]) -> None:
    for url in (A, B, C, D):
        report(hub, frame(url, cluster_doc(url, owners)))


def picture(hub: Hub) -> dict[str, Any]:
    return hub.cluster_picture(hub.clock())


def card(hub: Hub, url: str) -> dict[str, Any]:
    return next(c for c in picture(hub)["nodes"] if c["url"] == url)


def test_a_healthy_cluster_shows_owners_roles_and_channel_counts() -> None:
    hub, _clock = make_hub()
    everyone_reports(hub, HEALTHY)
    pic = picture(hub)
    assert [(s["id"], s["owner"], s["epoch"], s["channels"]) for s in pic["shards"]] == [
        ("s1", A, 1, 10),
        ("s2", C, 1, 20),
    ]
    assert pic["timeline"] == []
    a, b = card(hub, A), card(hub, B)
    assert (a["role"], a["status"], a["owns"], a["shards"]) == (
        "primary",
        "up",
        [{"shard": "s1", "epoch": 1}],
        ["s1"],
    )
    assert (b["role"], b["status"], b["owns"]) == ("backup", "up", [])


def test_failover_makes_a_timeline_entry_with_the_time_the_shard_had_no_owner() -> None:
    hub, clock = make_hub()
    everyone_reports(hub, HEALTHY)
    last_of_a = clock.now
    # A dies. Its peers still read its lease in the store until it runs out...
    for step in range(1, 3):
        clock.now += INTERVAL
        owners = {"s1": (A, 1, LEASE - step * INTERVAL), "s2": (C, 1, LEASE)}
        for url in (B, C, D):
            report(hub, frame(url, cluster_doc(url, owners)))
    # ... then B takes s1 at epoch 2, and says so in its next report.
    clock.now += 1500
    taken = {"s1": (B, 2, LEASE), "s2": (C, 1, LEASE)}
    report(hub, frame(B, cluster_doc(B, taken, down=frozenset({A}))))
    pic = picture(hub)
    assert pic["timeline"] == [
        {
            "at_ms": clock.now,
            "kind": "failover",
            "shard": "s1",
            "epoch": 2,
            "from": A,
            "from_id": "node-a",
            "to": B,
            "to_id": "node-b",
            "gap_ms": clock.now - last_of_a,  # from A's last report to B's first as owner
        }
    ]
    s1 = pic["shards"][0]
    assert (s1["owner"], s1["epoch"], s1["primary"]) == (B, 2, A)
    assert card(hub, B)["owns"] == [{"shard": "s1", "epoch": 2}]
    a = card(hub, A)
    assert (a["status"], a["owns"], a["peer_status"]) == ("failed", [], "down")
    # Later reports at the same epoch, and A's stale view, add nothing.
    clock.now += INTERVAL
    everyone_reports(hub, taken)
    report(hub, frame(A, cluster_doc(A, HEALTHY)))  # a late frame from before its death
    assert len(picture(hub)["timeline"]) == 1
    assert picture(hub)["shards"][0]["owner"] == B


def test_an_owner_that_does_not_report_is_judged_by_its_peers_views_of_its_lease() -> None:
    """The gap runs from the last peer view that showed its lease live."""
    hub, clock = make_hub()
    for url in (B, C, D):
        report(hub, frame(url, cluster_doc(url, HEALTHY)))
    last_held = clock.now
    clock.now += INTERVAL
    expired_at = clock.now
    for url in (B, C, D):
        report(hub, frame(url, cluster_doc(url, {"s1": (A, 1, -5), "s2": (C, 1, LEASE)})))
    assert picture(hub)["shards"][0]["unowned_since_ms"] == expired_at
    clock.now += 700
    report(hub, frame(B, cluster_doc(B, {"s1": (B, 2, LEASE), "s2": (C, 1, LEASE)})))
    (event,) = picture(hub)["timeline"]
    assert (event["kind"], event["to"]) == ("failover", B)
    assert event["gap_ms"] == clock.now - last_held == 1700


def test_a_silent_primary_turns_failed_a_silent_backup_down_a_stopped_one_down() -> None:
    hub, clock = make_hub()
    everyone_reports(hub, HEALTHY)
    clock.now += 2 * INTERVAL  # suspect after 2 intervals, down after 3
    for url in (B, D):
        report(hub, frame(url, cluster_doc(url, HEALTHY)))
    assert card(hub, A)["status"] == "suspect"
    assert card(hub, C)["status"] == "suspect"
    clock.now += INTERVAL
    report(hub, frame(B, cluster_doc(B, HEALTHY, down=frozenset({A, C}))))
    report(hub, frame(D, cluster_doc(D, HEALTHY, down=frozenset({A, C}))))
    assert card(hub, A)["status"] == "failed"
    assert card(hub, C)["status"] == "failed"
    assert card(hub, A)["owns"] == []
    # A backup that goes silent is down, not failed; a node that said it stopped is down.
    hub2, clock2 = make_hub()
    everyone_reports(hub2, HEALTHY)
    report(hub2, frame(C, cluster_doc(C, HEALTHY), status="stopped"))
    clock2.now += 3 * INTERVAL
    report(hub2, frame(A, cluster_doc(A, HEALTHY, down=frozenset({B, C}))))
    assert card(hub2, B)["status"] == "down"
    assert card(hub2, C)["status"] == "down"


def test_a_node_silent_to_the_watcher_but_seen_up_by_its_peers_is_only_suspect() -> None:
    hub, clock = make_hub()
    everyone_reports(hub, HEALTHY)
    clock.now += 3 * INTERVAL
    for url in (B, C, D):
        report(hub, frame(url, cluster_doc(url, HEALTHY)))
    a = card(hub, A)
    assert (a["status"], a["telemetry"], a["peer_status"]) == ("suspect", "down", "up")


def test_a_primary_known_only_from_peers_that_see_it_down_is_failed() -> None:
    hub, _clock = make_hub()
    for url in (B, C, D):
        report(hub, frame(url, cluster_doc(url, HEALTHY, down=frozenset({A}))))
    a = card(hub, A)
    assert (a["status"], a["telemetry"], a["id"]) == ("failed", None, "node-a")


def test_a_handoff_to_a_new_owner_while_the_old_one_reports_is_not_a_failover() -> None:
    hub, clock = make_hub()
    everyone_reports(hub, HEALTHY)
    clock.now += 200
    released = {"s1": (None, 1, None), "s2": (C, 1, LEASE)}
    report(hub, frame(A, cluster_doc(A, released, version=2, primaries={"s1": B})))
    clock.now += 300
    moved = {"s1": (B, 2, LEASE), "s2": (C, 1, LEASE)}
    report(hub, frame(B, cluster_doc(B, moved, version=2, primaries={"s1": B})))
    (event,) = picture(hub)["timeline"]
    assert (event["kind"], event["from"], event["to"]) == ("handoff", A, B)
    assert event["gap_ms"] == 500  # at most: from A's last report holding s1
    assert picture(hub)["shards"][0]["primary"] == B


def test_an_old_owner_that_kept_reporting_on_time_handed_off_one_back_from_silence_failed() -> None:
    hub, clock = make_hub()
    everyone_reports(hub, HEALTHY)
    # s1 moves to B between two on-time reports of A (B's report comes first).
    clock.now += INTERVAL // 2
    moved = {"s1": (B, 2, LEASE), "s2": (C, 1, LEASE)}
    report(hub, frame(B, cluster_doc(B, moved)))
    assert picture(hub)["timeline"][0]["kind"] == "failover"  # for now: A has not spoken
    clock.now += INTERVAL // 2
    report(hub, frame(A, cluster_doc(A, moved)))
    assert picture(hub)["timeline"][0]["kind"] == "handoff"
    # s2's owner C freezes (SIGSTOP) past its lease; D takes s2; C comes back and reports.
    clock.now += 4 * INTERVAL
    failed_over = {"s1": (B, 2, LEASE), "s2": (D, 2, LEASE)}
    report(hub, frame(B, cluster_doc(B, failed_over)))
    clock.now += INTERVAL // 2
    report(hub, frame(C, cluster_doc(C, failed_over)))
    latest = picture(hub)["timeline"][0]
    assert (latest["shard"], latest["kind"], latest["to"]) == ("s2", "failover", D)
    assert latest["gap_ms"] == 5 * INTERVAL  # from C's last report holding s2, at T0


def test_a_backups_lag_comes_from_its_primarys_view() -> None:
    hub, _clock = make_hub()
    report(hub, frame(A, cluster_doc(A, HEALTHY, lag={B: {"s1": 3}})))
    report(hub, frame(B, cluster_doc(B, HEALTHY)))
    assert card(hub, B)["lag"] == {"s1": 3}
    assert card(hub, A)["lag"] is None


def test_the_timeline_is_bounded() -> None:
    state = ClusterState(max_events=3)
    for epoch in range(1, 10):
        owner = (A, B)[epoch % 2]
        doc = cluster_doc(owner, {"s1": (owner, epoch, LEASE), "s2": (C, 1, LEASE)})
        state.observe(IDS[owner], owner, msgspec.convert(doc, ClusterView), T0 + epoch, INTERVAL)
    assert [e.epoch for e in state.events] == [7, 8, 9]


def test_older_nodes_without_a_cluster_view_are_still_accepted() -> None:
    hub, _clock = make_hub()
    report(hub, frame(A, None, v=2))
    report(hub, frame(B, None, v=1))
    assert set(hub.state.nodes) == {"node-a", "node-b"}
    pic = picture(hub)
    assert pic["shards"] == [] and pic["timeline"] == []
    assert {c["status"] for c in pic["nodes"]} == {"up"}


def test_a_view_the_watcher_cannot_read_is_dropped_and_the_snapshot_kept() -> None:
    hub, _clock = make_hub()
    bad = cluster_doc(A, HEALTHY)
    bad["shards"][0]["epoch"] = -1
    report(hub, frame(A, bad))
    assert "node-a" in hub.state.nodes and hub.state.counters.invalid_cluster == 1
    assert picture(hub)["shards"] == []
    report(hub, frame(A, cluster_doc(A, HEALTHY)))
    assert [s["owner"] for s in picture(hub)["shards"]] == [A, C]


def test_hub_publishes_the_cluster_to_browsers() -> None:
    hub, _clock = make_hub()
    browser = hub.add_browser()
    hello = msgspec.json.decode(browser.outbox.popleft())
    assert hello["type"] == "hello" and hello["cluster"]["shards"] == []
    everyone_reports(hub, HEALTHY)
    browser.outbox.clear()
    hub.sweep()
    sent = [msgspec.json.decode(m) for m in browser.outbox]
    (msg,) = [m for m in sent if m["type"] == "cluster"]
    assert [s["owner"] for s in msg["cluster"]["shards"]] == [A, C]
