"""Message ids from tables: unique across slots, growing per generator, above every floor."""

from __future__ import annotations

import pytest
from lionmq.topology import MAX_SHARDS

from app.clock import ManualClock
from app.engine.ids import ID_BLOCK, ID_SLOTS, IdGenerator, id_slot
from app.settings import Settings

T0 = 1_700_000_000_000  # ms
TICK = 16  # ms of one tick


def ids_of(gen: IdGenerator, n: int) -> list[int]:
    first = gen.take(n)
    return list(range(first, first + n))


def test_one_limit_for_slots_and_shards() -> None:
    assert ID_SLOTS == MAX_SHARDS
    assert ID_SLOTS & (ID_SLOTS - 1) == 0  # a power of two: the slot is a bit field
    # The largest batch the node accepts fits in one take.
    bound = Settings.model_fields["max_batch"].metadata
    assert max(getattr(m, "le", 0) for m in bound) <= ID_BLOCK


@pytest.mark.parametrize(
    ("slots", "takes", "step_ms"),
    [
        ((0, 1), [1, 1, 1, 1], 0),  # one tick, single ids
        ((0, 63), [1000, 5, ID_BLOCK], 0),  # a full region: runs into the next tick
        ((1, 2, 3), [ID_BLOCK - 1, 2, 7], 1),
        ((0, 5, 63), [300] * 40, 3),
        ((7, 8), [ID_BLOCK, ID_BLOCK, 1], 20),
    ],
)
def test_generators_with_different_slots_on_one_clock_never_collide(
    slots: tuple[int, ...], takes: list[int], step_ms: int
) -> None:
    clock = ManualClock(T0)
    gens = [IdGenerator(clock, slot=s) for s in slots]
    seen: set[int] = set()
    minted = 0
    for n in takes:
        for gen in gens:
            batch = ids_of(gen, n)
            assert {id_slot(i) for i in batch} == {gen.slot}
            seen.update(batch)
            minted += n
        clock.advance(step_ms)
    assert len(seen) == minted


@pytest.mark.parametrize("slot", [0, 1, 31, 63])
@pytest.mark.parametrize(
    "moves",
    [
        [0, 0, 0],  # the clock stands still
        [5, -1_000, 2, 0],  # it steps back: ids still grow
        [TICK, TICK, TICK],
        [1, 1, -(10 * TICK), 100_000],
    ],
)
def test_ids_grow_per_generator(slot: int, moves: list[int]) -> None:
    clock = ManualClock(T0)
    gen = IdGenerator(clock, slot=slot)
    last = 0
    for move in moves:
        clock.advance(move)
        for n in (1, 17, ID_BLOCK // 2):
            first = gen.take(n)
            assert first > last
            last = first + n - 1


@pytest.mark.parametrize(
    ("floor", "slot"),
    [
        (0, 0),
        ((T0 << 20) + 12_345, 0),  # an id of the layout before slots, this very ms
        ((T0 << 20) + 12_345, 9),
        (((T0 + 5_000) >> 4 << 24) | (9 << 18) | 77, 3),  # another slot's id, ahead of the clock
        (((T0 + 5_000) >> 4 << 24) | (3 << 18) | (ID_BLOCK - 1), 3),  # own region, used up
        (2**61, 63),
    ],
)
def test_a_floor_is_never_gone_below(floor: int, slot: int) -> None:
    clock = ManualClock(T0)
    gen = IdGenerator(clock, floor=floor, slot=slot)
    first = gen.take(10)
    assert first > floor
    assert id_slot(first) == id_slot(first + 9) == slot
    # advance() raises the floor later (a channel adopted from another shard), never lowers it.
    gen.advance(first + 10**9)
    assert gen.take(1) > first + 10**9
    high = gen.take(1)
    gen.advance(0)
    assert gen.take(1) > high


def test_ids_follow_the_clock_at_the_old_scale() -> None:
    clock = ManualClock(T0)
    gen = IdGenerator(clock, slot=0)
    first = gen.take(1)
    assert (T0 - TICK) << 20 < first <= T0 << 20
    clock.advance(60_000)
    assert gen.take(1) >> 20 == T0 + 60_000 - (T0 + 60_000) % TICK


@pytest.mark.parametrize("slot", [-1, ID_SLOTS, ID_SLOTS + 1])
def test_a_slot_past_the_limit_is_refused(slot: int) -> None:
    with pytest.raises(ValueError, match=f"slot {slot} is outside"):
        IdGenerator(ManualClock(T0), slot=slot)


@pytest.mark.parametrize("n", [0, -1, ID_BLOCK + 1])
def test_a_take_past_one_block_is_refused(n: int) -> None:
    gen = IdGenerator(ManualClock(T0), slot=1)
    with pytest.raises(ValueError, match=f"cannot reserve {n} ids"):
        gen.take(n)
    assert gen.take(ID_BLOCK) > 0  # a whole block is fine


def test_a_full_region_moves_to_the_next_tick_not_into_another_slot() -> None:
    clock = ManualClock(T0)
    gen = IdGenerator(clock, slot=4)
    first = gen.take(ID_BLOCK - 10)
    second = gen.take(11)  # does not fit the rest of this tick's region
    assert second >> 24 == (first >> 24) + 1
    assert id_slot(second) == id_slot(second + 10) == 4
