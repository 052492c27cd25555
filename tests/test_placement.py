"""Channel placement: balance, minimal movement, and the same answer in every process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter

import pytest
from lionmq import Ring, shard_for
from lionmq.placement import stable_hash

CHANNELS = [f"channel-{i:05d}" for i in range(10_000)]


def ids(n: int) -> list[str]:
    return [f"s{k}" for k in range(1, n + 1)]


def placements(ring: Ring) -> list[str]:
    return [ring.shard_for(c) for c in CHANNELS]


# Computed once with the implementation and checked in: a change of hash, vnode naming or
# vnode count breaks it, and would silently move every channel of a running cluster.
GOLDEN = [  # channel, shard among s1..s4, shard among s1..s8
    ("orders", "s4", "s5"),
    ("orders.dlq", "s1", "s1"),
    ("payments", "s1", "s6"),
    ("emails", "s2", "s6"),
    ("a", "s1", "s1"),
    ("Z", "s2", "s2"),
    ("channel-00000", "s3", "s3"),
    ("channel-09999", "s4", "s5"),
    ("tenant-42.jobs", "s1", "s1"),
    ("ünïcode", "s1", "s1"),
    ("x" * 200, "s2", "s5"),
    ("invoices", "s3", "s5"),
    ("invoices.dlq", "s3", "s6"),
    ("audit", "s1", "s5"),
    ("metrics", "s2", "s2"),
    ("events", "s4", "s7"),
]


@pytest.mark.parametrize("n", [2, 3, 4, 8, 16])
def test_largest_shard_holds_at_most_a_quarter_more_than_the_mean(n: int) -> None:
    counts = Counter(placements(Ring(ids(n))))
    assert set(counts) == set(ids(n))
    assert max(counts.values()) <= 1.25 * len(CHANNELS) / n, counts


@pytest.mark.parametrize("n", range(1, 9))
def test_adding_a_shard_moves_about_its_share_and_only_onto_it(n: int) -> None:
    before = placements(Ring(ids(n)))
    after = placements(Ring(ids(n + 1)))
    moved = [(old, new) for old, new in zip(before, after, strict=True) if old != new]
    assert {new for _, new in moved} == {f"s{n + 1}"}
    share = len(moved) / len(CHANNELS)
    assert 0.7 / (n + 1) <= share <= 1.3 / (n + 1), share


@pytest.mark.parametrize(("n", "removed"), [(2, "s1"), (3, "s2"), (5, "s5"), (8, "s3")])
def test_removing_a_shard_moves_only_its_own_channels(n: int, removed: str) -> None:
    before = placements(Ring(ids(n)))
    after = placements(Ring([s for s in ids(n) if s != removed]))
    for old, new in zip(before, after, strict=True):
        assert new == old or old == removed
    assert removed not in after


def test_placement_ignores_the_order_shard_ids_come_in() -> None:
    forward = Ring(ids(8))
    backward = Ring(reversed(ids(8)))
    assert placements(forward)[:2000] == placements(backward)[:2000]
    assert shard_for("orders", ["s4", "s2", "s3", "s1"]) == Ring(ids(4)).shard_for("orders")


@pytest.mark.parametrize(("channel", "of_4", "of_8"), GOLDEN)
def test_golden_placements(channel: str, of_4: str, of_8: str) -> None:
    assert Ring(ids(4)).shard_for(channel) == of_4
    assert shard_for(channel, ids(8)) == of_8


def test_hash_is_fixed_blake2b_64() -> None:
    assert stable_hash("orders") == 0xD5ACEBE867B47F4D
    assert stable_hash("s1#0") == 0xB15FDBC1931FF9A8


def test_a_channel_and_its_dead_letter_channel_are_placed_independently() -> None:
    # Documented, not a defect: dead-lettering may cross shards.
    assert shard_for("orders", ids(4)) != shard_for("orders.dlq", ids(4))


_CHILD = """
import json, sys
from lionmq.placement import Ring
channels, rings = json.loads(sys.stdin.read())
print(json.dumps([[Ring(ids).shard_for(c) for c in channels] for ids in rings]))
"""


@pytest.mark.parametrize("seed", ["0", "4242"])
def test_another_process_with_another_hash_seed_agrees(seed: str) -> None:
    channels = [channel for channel, _, _ in GOLDEN]
    run = subprocess.run(
        [sys.executable, "-c", _CHILD],
        input=json.dumps([channels, [ids(4), ids(8)]]),
        env={**os.environ, "PYTHONHASHSEED": seed},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    of_4, of_8 = json.loads(run.stdout)
    assert list(zip(channels, of_4, of_8, strict=True)) == GOLDEN


@pytest.mark.parametrize(
    ("shard_ids", "vnodes", "message"),
    [
        ([], 512, "at least one shard"),
        (["s1", "s1"], 512, "duplicate"),
        (["s1"], 0, "vnodes"),
    ],
)
def test_a_ring_refuses_bad_input(shard_ids: list[str], vnodes: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Ring(shard_ids, vnodes=vnodes)
    if vnodes > 0:
        with pytest.raises(ValueError, match=message):
            shard_for("orders", shard_ids)
