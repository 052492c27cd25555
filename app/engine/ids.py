"""Message ids and receipts.

Ids are 63-bit integers: milliseconds since the epoch shifted left by 20 bits, plus a counter. They
grow with enqueue order, survive restarts without a stored counter (seeded above the store's
highest id too, in case the clock stepped back), and sort ready messages by age for free.

A receipt names one delivery: `<id hex>-<attempt hex>`, which the engine uses as is. Producers
learn ids, so what consumers get is signed (`ReceiptSigner`): that name plus a tag only the node can
make, after a dot; only the consumer who was handed the delivery can settle it.
"""

from __future__ import annotations

import hmac
from hashlib import blake2b

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
