"""The ownership decisions, from tables (app/cluster/decide.py)."""

from __future__ import annotations

import pytest

from app.cluster.decide import Action, Held, ShardSeat, decide, serving
from app.store.base import ShardLease

ME, OTHER, THIRD = "http://a:1", "http://b:2", "http://c:3"
LEASE = 2000
NOW = 1_000_000  # store clock

PRIMARY = ShardSeat("s1", ME, (OTHER,))
BACKUP = ShardSeat("s1", OTHER, (ME,))
ELSEWHERE = ShardSeat("s1", OTHER, (THIRD,))
IMPLICIT = ShardSeat("s0", None)


def lease(owner: str, epoch: int, expires_at: int) -> ShardLease:
    return ShardLease("s1", owner, f"http://{owner}", epoch, expires_at)


LIVE_MINE = lease("me", 3, NOW + 500)
LIVE_OTHER = lease("other", 4, NOW + 500)
EXPIRED_OTHER = lease("other", 4, NOW - 1)
RELEASED_OTHER = lease("other", 4, 0)
LIVE_MINE_OLD = lease("me", 2, NOW + 500)
EXPIRED_MINE = lease("me", 3, NOW - 1)

# (what, seat, stored lease, held, heartbeat silence ms, expected action)
TABLE = [
    ("primary takes a never-held shard", PRIMARY, None, None, 0, Action.TAKE),
    ("primary takes an expired lease", PRIMARY, EXPIRED_OTHER, None, 0, Action.TAKE),
    ("primary takes a released lease", PRIMARY, RELEASED_OTHER, None, 0, Action.TAKE),
    ("rejoining primary follows a live owner", PRIMARY, LIVE_OTHER, None, 9999, Action.WAIT),
    ("restart waits out its own old lease", PRIMARY, LIVE_MINE, None, 0, Action.WAIT),
    ("backup waits while heartbeats come", BACKUP, EXPIRED_OTHER, None, 100, Action.WAIT),
    ("backup waits on a live lease, silent", BACKUP, LIVE_OTHER, None, 9999, Action.WAIT),
    ("backup takes: silent and expired", BACKUP, EXPIRED_OTHER, None, LEASE, Action.TAKE),
    ("backup takes a never-held, silent", BACKUP, None, None, LEASE, Action.TAKE),
    (
        "backup takes at once what its primary released (graceful stop)",
        BACKUP,
        ShardLease("s1", "other", OTHER, 4, 0),
        None,
        0,
        Action.TAKE,
    ),
    (
        "backup waits out silence when a non-member released it (moved away by set_nodes)",
        BACKUP,
        ShardLease("s1", "third", THIRD, 4, 0),
        None,
        0,
        Action.WAIT,
    ),
    (
        "backup waits out silence when the lease lapsed (a crash)",
        BACKUP,
        ShardLease("s1", "other", OTHER, 4, NOW - 1),
        None,
        0,
        Action.WAIT,
    ),
    ("a non-member never takes", ELSEWHERE, None, None, 9999, Action.WAIT),
    ("a shard gone from the topology", None, None, None, 9999, Action.WAIT),
    ("implicit shard: anyone takes it free", IMPLICIT, None, None, 0, Action.TAKE),
    ("implicit shard: standby waits", IMPLICIT, LIVE_OTHER, None, 9999, Action.WAIT),
    ("implicit shard: standby takes lapsed", IMPLICIT, EXPIRED_OTHER, None, 0, Action.TAKE),
    ("holder renews", PRIMARY, LIVE_MINE, Held(3, 0), 0, Action.RENEW),
    ("holder renews even expired (epoch kept)", PRIMARY, EXPIRED_MINE, Held(3, 0), 0, Action.RENEW),
    ("acting backup renews", BACKUP, LIVE_MINE, Held(3, 0), 0, Action.RENEW),
    ("holder deposed by a new epoch", PRIMARY, LIVE_OTHER, Held(3, 0), 0, Action.STOP_SERVING),
    (
        "holder finds an older epoch of its own",
        PRIMARY,
        LIVE_MINE_OLD,
        Held(3, 0),
        0,
        Action.STOP_SERVING,
    ),
    ("holder finds no lease", PRIMARY, None, Held(3, 0), 0, Action.STOP_SERVING),
    ("holder moved away by set_nodes", ELSEWHERE, LIVE_MINE, Held(3, 0), 0, Action.RELEASE),
    ("holder of a removed shard", None, LIVE_MINE, Held(3, 0), 0, Action.RELEASE),
]


@pytest.mark.parametrize(
    ("seat", "stored", "held", "silence", "expected"),
    [row[1:] for row in TABLE],
    ids=[row[0] for row in TABLE],
)
def test_decide(
    seat: ShardSeat | None,
    stored: ShardLease | None,
    held: Held | None,
    silence: int,
    expected: Action,
) -> None:
    got = decide(
        me=ME,
        node_id="me",
        seat=seat,
        lease=stored,
        store_now=NOW,
        held=held,
        silence_ms=silence,
        lease_ms=LEASE,
    )
    assert got is expected


# (renewed at, now, serving?) with LEASE 2000: the margin is 500, so serving ends at 1500.
SERVING = [(0, 0, True), (0, 1499, True), (0, 1500, False), (0, 1999, False), (1000, 2499, True)]


@pytest.mark.parametrize(("renewed_at", "now", "expected"), SERVING)
def test_serving_margin(renewed_at: int, now: int, expected: bool) -> None:
    assert serving(Held(1, renewed_at), now, LEASE) is expected


def test_serving_needs_a_lease() -> None:
    assert not serving(None, 0, LEASE)
