"""Message ids and receipts.

Ids are 63-bit integers: milliseconds since the epoch shifted left by 20 bits, plus a counter. They
grow with enqueue order, survive restarts without a stored counter (seeded above the store's
highest id too, in case the clock stepped back), and sort ready messages by age for free.
"""

from __future__ import annotations

from app.clock import Clock
from app.errors import InvalidReceipt

_SHIFT = 20


class IdGenerator:
    def __init__(self, clock: Clock, floor: int = 0) -> None:
        self._clock = clock
        self._last = floor

    def take(self, n: int) -> int:
        """Reserve `n` consecutive ids; return the first."""
        first = max(self._last + 1, self._clock.now_ms() << _SHIFT)
        self._last = first + n - 1
        return first


def receipt(msg_id: int, attempt: int) -> str:
    """A receipt names one delivery: the message and which attempt it was."""
    return f"{msg_id:x}-{attempt:x}"


def parse_receipts(receipts: list[str]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for r in receipts:
        head, sep, tail = r.partition("-")
        try:
            if not sep or len(r) > 40:
                raise ValueError
            out.append((int(head, 16), int(tail, 16)))
        except ValueError:
            raise InvalidReceipt(
                f"{r[:64]!r} is not a LionMQ receipt; use the 'receipt' field of a dequeued message"
            ) from None
    return out
