"""Message ids and receipts.

Ids are 63-bit integers that grow with enqueue order, survive restarts without a stored counter
(seeded above the store's highest id too, in case the clock stepped back), and sort ready
messages by age for free. They stay unique across every primary that shares a store:

    id = tick << 24 | slot << 18 | counter        tick = wall-clock ms >> 4 (16 ms)

`slot` (0 ..< ID_SLOTS, one per shard: ID_SLOTS is the topology's MAX_SHARDS; a standalone node
is slot 0) keeps two primaries from ever minting the same id, even on one tick; `counter` numbers
a slot's ids within a tick. A generator's ids only grow: when its region of a tick is used up (or
a floor lies in or past it) it moves on to its region of the next tick, running ahead of the
clock rather than reusing an id. `take(n)` reserves n consecutive integers, so a batch can number
its messages `first + i`; one take holds at most ID_BLOCK ids (MAX_BATCH stays below it). The
numbers keep the old scale (about ms << 20), so ids stored before the slot existed stay below
fresh ones once the generator is seeded above them, and 2**63 is reached in the year 2248.

The cluster gives each shard a slot that no other shard able to have a primary at the same time
holds. A shard's ids stay above every id the store holds for it as long as its generator is
seeded with `max_id()` at start and `advance`d past a channel's highest id when it adopts one.

A receipt names one delivery: `<id hex>-<attempt hex>`, which the engine uses as is. Producers
learn ids, so what consumers get is signed (`ReceiptSigner`): that name plus a tag only the node can
make, after a dot; only the consumer who was handed the delivery can settle it.
"""

from __future__ import annotations

import hmac
from hashlib import blake2b

from lionmq.topology import MAX_SHARDS

from app.clock import Clock
from app.errors import InvalidReceipt

# One slot per shard the topology allows: one definition of the limit.
ID_SLOTS = MAX_SHARDS
_SLOT_BITS = (ID_SLOTS - 1).bit_length()
_COUNTER_BITS = 18
ID_BLOCK = 1 << _COUNTER_BITS  # the most ids one take may reserve
_TICK_SHIFT = _SLOT_BITS + _COUNTER_BITS
_TICK_MS_BITS = _TICK_SHIFT - 20  # a tick is 2**4 = 16 ms: ids keep the scale ms << 20


class IdGenerator:
    def __init__(self, clock: Clock, floor: int = 0, slot: int = 0) -> None:
        """Ids in `slot`'s regions only, each above `floor` and above every id handed out."""
        if not 0 <= slot < ID_SLOTS:
            raise ValueError(f"id slot {slot} is outside 0..{ID_SLOTS - 1}")
        self._clock = clock
        self._low = slot << _COUNTER_BITS  # where the slot's region starts within a tick
        self._last = floor
        self.slot = slot

    def advance(self, floor: int) -> None:
        """Every id from now on is above `floor` (an adopted channel's highest id)."""
        self._last = max(self._last, floor)

    def take(self, n: int) -> int:
        """Reserve `n` consecutive ids (1 <= n <= ID_BLOCK) in this slot; return the first."""
        if not 1 <= n <= ID_BLOCK:
            raise ValueError(f"cannot reserve {n} ids at once: 1 to {ID_BLOCK}")
        now = (self._clock.now_ms() >> _TICK_MS_BITS) << _TICK_SHIFT
        tick, offset = divmod(max(self._last + 1, now), 1 << _TICK_SHIFT)
        if offset < self._low:
            offset = self._low
        elif offset + n > self._low + ID_BLOCK:  # this tick's region is used up, or passed
            tick, offset = tick + 1, self._low
        first = tick << _TICK_SHIFT | offset
        self._last = first + n - 1
        return first


def id_slot(msg_id: int) -> int:
    """The slot of the generator that minted `msg_id`."""
    return (msg_id >> _COUNTER_BITS) & (ID_SLOTS - 1)


def receipt(msg_id: int, attempt: int) -> str:
    """A receipt names one delivery: the message and which attempt it was."""
    return f"{msg_id:x}-{attempt:x}"


def parse_receipts(receipts: list[str]) -> list[tuple[int, int]]:
    """(id, attempt) of each receipt, signed or not: the API checked the signed ones' tags."""
    out: list[tuple[int, int]] = []
    for r in receipts:
        head, sep, tail = r.partition(".")[0].partition("-")
        try:
            if not sep or len(r) > 40:
                raise ValueError
            out.append((int(head, 16), int(tail, 16)))
        except ValueError:
            raise _invalid(r) from None
    return out


# A 64-bit tag (16 hex digits): each guess at one costs a request.
_TAG_BYTES = 8


class ReceiptSigner:
    """Signs the receipts handed to consumers and checks the ones they send back.

    The tag is a keyed BLAKE2b MAC (a MAC by design; here a third of HMAC-SHA256's cost) of the
    channel and the receipt's name under the store's secret: every node sharing the store, before
    and after a restart, issues and accepts the same receipts, and no setting is needed. The keyed
    state is made once and copied per receipt (the key costs a compression of its own)."""

    def __init__(self, secret: bytes) -> None:
        self._keyed = blake2b(key=secret, digest_size=_TAG_BYTES)

    def _tag(self, channel: str, name: str) -> str:
        mac = self._keyed.copy()
        mac.update(f"{channel}\0{name}".encode())
        return mac.hexdigest()

    def sign(self, channel: str, msg_id: int, attempt: int) -> str:
        name = receipt(msg_id, attempt)
        return f"{name}.{self._tag(channel, name)}"

    def check(self, channel: str, receipts: list[str]) -> None:
        """Refuse the request (400) if any receipt was not issued by this store for `channel`,
        as SQS answers ReceiptHandleIsInvalid; genuine receipts whose lease ended are stale."""
        for r in receipts:
            name, _, tag = r.partition(".")
            expected = self._tag(channel, name).encode()
            if not hmac.compare_digest(tag.encode(), expected) or not name:
                raise _invalid(r, channel)


def _invalid(given: str, channel: str = "") -> InvalidReceipt:
    where = f" of channel {channel!r}" if channel else ""
    return InvalidReceipt(
        f"{given[:64]!r} is not a receipt{where}; use the 'receipt' field of a message dequeued"
        " from it"
    )
