"""The ownership decisions, from tables (app/cluster/decide.py)."""

from __future__ import annotations

import pytest

from app.cluster.decide import (
    Action,
    Candidate,
    Held,
    Refusal,
    ShardSeat,
    decide,
    handoff_refusal,
    serving,
    successor,
    worth_waiting,
)
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
        found_epoch=stored.epoch if stored else 0,  # every lease was there at the first reading
    )
    assert got is expected


HANDED_TO_ME = lease("me", 5, NOW + 500)  # transferred to this node after it started

# A lease handed to this node (by transfer_lease) while it ran, vs its own from a previous life.
# (what, seat, stored lease, held, epoch at first reading, leaving, expected action)
GIVEN = [
    ("a lease handed to me while I run: adopt", BACKUP, HANDED_TO_ME, None, 4, False, Action.ADOPT),
    ("first reading had none: adopt", BACKUP, HANDED_TO_ME, None, 0, False, Action.ADOPT),
    ("as configured primary too", PRIMARY, HANDED_TO_ME, None, 4, False, Action.ADOPT),
    ("my previous life's lease: wait it out", BACKUP, HANDED_TO_ME, None, 5, False, Action.WAIT),
    (
        "handed to me, but expired: not adopted",
        BACKUP,
        lease("me", 5, NOW),
        None,
        4,
        False,
        Action.WAIT,
    ),
    ("handed to me, not a member any more", ELSEWHERE, HANDED_TO_ME, None, 4, False, Action.WAIT),
    ("handed to me while I leave: wait", BACKUP, HANDED_TO_ME, None, 4, True, Action.WAIT),
    ("leaving: no take of a free shard", PRIMARY, None, None, 0, True, Action.WAIT),
    ("leaving: the holder still renews", PRIMARY, LIVE_MINE, Held(3, 0), 3, True, Action.RENEW),
    (
        "handed to another: the old holder stops",
        PRIMARY,
        LIVE_OTHER,
        Held(3, 0),
        3,
        False,
        Action.STOP_SERVING,
    ),
]


@pytest.mark.parametrize(
    ("seat", "stored", "held", "found", "leaving", "expected"),
    [row[1:] for row in GIVEN],
    ids=[row[0] for row in GIVEN],
)
def test_decide_given_leases(
    seat: ShardSeat | None,
    stored: ShardLease | None,
    held: Held | None,
    found: int,
    leaving: bool,
    expected: Action,
) -> None:
    got = decide(
        me=ME,
        node_id="me",
        seat=seat,
        lease=stored,
        store_now=NOW,
        held=held,
        silence_ms=0,
        lease_ms=LEASE,
        found_epoch=found,
        leaving=leaving,
    )
    assert got is expected


B1, B2 = "http://b1:1", "http://b2:2"

# (what, candidates, wanted, expected url or the start of the refusal)
SUCCESSORS: list[tuple[str, list[Candidate], str | None, str]] = [
    ("the up-to-date backup", [Candidate(B1, 0, True)], None, B1),
    (
        "first up to date in topology order",
        [Candidate(B1, 0, True), Candidate(B2, 0, True)],
        None,
        B1,
    ),
    ("skips one behind", [Candidate(B1, 2, True), Candidate(B2, 0, True)], None, B2),
    ("skips one down", [Candidate(B1, 0, False), Candidate(B2, 0, True)], None, B2),
    ("skips one never heard", [Candidate(B1, None, True), Candidate(B2, 0, True)], None, B2),
    ("the one named", [Candidate(B1, 0, True), Candidate(B2, 0, True)], B2, B2),
    (
        "none up to date",
        [Candidate(B1, 1, True), Candidate(B2, None, True)],
        None,
        "no backup is up to date: http://b1:1 (1 heartbeat(s) behind), http://b2:2 (never",
    ),
    (
        "named one behind",
        [Candidate(B1, 0, True), Candidate(B2, 3, True)],
        B2,
        "no backup is up to date: http://b2:2 (3",
    ),
    (
        "named one down",
        [Candidate(B1, 0, False)],
        B1,
        "no backup is up to date: http://b1:1 (down)",
    ),
    ("named one not a backup", [Candidate(B1, 0, True)], B2, "http://b2:2 is not a backup"),
    ("no backups at all", [], None, "the shard has no backup"),
]


@pytest.mark.parametrize(
    ("candidates", "wanted", "expected"),
    [row[1:] for row in SUCCESSORS],
    ids=[row[0] for row in SUCCESSORS],
)
def test_successor(candidates: list[Candidate], wanted: str | None, expected: str) -> None:
    got = successor(candidates, wanted)
    if expected.startswith("http") and " " not in expected:
        assert got == expected
    else:
        assert isinstance(got, Refusal) and got.reason.startswith(expected), got


# (what, held, adopted, handing, now, refused with)
MAY_HAND_OFF: list[tuple[str, Held | None, bool, bool, int, str | None]] = [
    ("a served shard", Held(3, 0), True, False, 100, None),
    ("not held", None, False, False, 100, "this node does not hold"),
    ("already handing off", Held(3, 0), True, True, 100, "a hand-off of the shard is already"),
    ("still adopting", Held(3, 0), False, False, 100, "this node is still taking"),
    ("lease not renewed in time", Held(3, 0), True, False, 1500, "this node's lease"),
]


@pytest.mark.parametrize(
    ("held", "adopted", "handing", "now", "refused"),
    [row[1:] for row in MAY_HAND_OFF],
    ids=[row[0] for row in MAY_HAND_OFF],
)
def test_handoff_refusal(
    held: Held | None, adopted: bool, handing: bool, now: int, refused: str | None
) -> None:
    got = handoff_refusal(held=held, adopted=adopted, handing=handing, now_mono=now, lease_ms=LEASE)
    if refused is None:
        assert got is None
    else:
        assert got is not None and got.reason.startswith(refused), got


# (renewed at, now, serving?) with LEASE 2000: the margin is 500, so serving ends at 1500.
SERVING = [(0, 0, True), (0, 1499, True), (0, 1500, False), (0, 1999, False), (1000, 2499, True)]


@pytest.mark.parametrize(("renewed_at", "now", "expected"), SERVING)
def test_serving_margin(renewed_at: int, now: int, expected: bool) -> None:
    assert serving(Held(1, renewed_at), now, LEASE) is expected


def test_serving_needs_a_lease() -> None:
    assert not serving(None, 0, LEASE)


@pytest.mark.parametrize(
    ("candidates", "expected"),
    [
        ([Candidate(B1, None, True)], True),  # resyncing after its restart
        ([Candidate(B1, 4, True)], True),  # a few beats behind
        ([Candidate(B1, 0, False)], False),  # down: it will not catch up
        ([Candidate(B1, 2, False), Candidate(B2, None, True)], True),
        ([], False),
    ],
)
def test_worth_waiting(candidates: list[Candidate], expected: bool) -> None:
    assert worth_waiting(candidates) is expected
