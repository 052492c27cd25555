"""Browsing a channel's messages without consuming them, and redriving: moving ready messages
(normally a dead-letter channel's) back to where they came from, or to a channel named.

Browsing reads the store only: it leases nothing and changes nothing. The store is the truth for
the states it shows, in flight included: a lease is written before its delivery is answered, and
an ack, nack or extend is written before memory finishes it (during the write the row still shows
the lease it ends). One lag: a lease past its deadline shows as ready while maintenance has not
ended it yet (within its next pass). Redrive, which moves messages, also asks memory: a message
leased there is left (`QueueEngine.move_ready`). Redrive moves batches
through the engine's one path for moves between channels (`QueueEngine.move_ready`, the path of
dead-lettering too): each batch is one atomic store `move`, so a redrive that dies midway loses
nothing and copies nothing twice, and running it again moves only what is left. A call is
bounded: at most `limit` messages, at most CALL_BUDGET_MS of work (so that it answers within a
forwarding node's patience); `remaining` tells the caller whether to call again.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import msgspec

from app.engine.queue import DEAD_LETTER_CHANNEL_HEADER, QueueEngine
from app.errors import InvalidInput
from app.models import Message, valid_channel_name
from app.store.base import MessageState, Page

# Browsing: a page holds at most MAX_PAGE messages; a page filtered by state examines at most
# BROWSE_SCAN messages of the channel (then it is short, and `next` says where to go on).
MAX_PAGE = 1000
DEFAULT_PAGE = 100
BROWSE_SCAN = 10_000
# A page ends once its bodies and headers reach this many bytes (then it is short, with a
# `next`): 1000 messages of MAX_MESSAGE_BYTES would be 256 MB read and encoded at once.
PAGE_BYTES = 8 * 1024 * 1024

# Redrive: messages one call moves at most (and by default).
MAX_REDRIVE = 10_000
DEFAULT_REDRIVE = 1000
# Messages one store move carries at most, and bytes (bodies and headers; a message larger than
# that moves alone): a transaction of large messages stays small, and so does the page read.
REDRIVE_BATCH = 500
REDRIVE_BATCH_BYTES = 8 * 1024 * 1024
# How long one call works at most before it answers with what it moved: well within the
# ANSWER_TIMEOUT_S a forwarding node waits for the owner (app/api/forward.py).
CALL_BUDGET_MS = 5_000
# A paced redrive moves one batch per this many ms at most (smaller batches at low rates).
PACE_MS = 100
# Pages one call reads at most (a bound on the loop, whatever the clock says).
_MAX_PAGES = 1_000

REDRIVEN_AT_HEADER = "x-redriven-at"
REDRIVEN_FROM_HEADER = "x-redriven-from"

_headers_decoder = msgspec.json.Decoder(dict[str, str])
_headers_encoder = msgspec.json.Encoder()

Sleep = Callable[[float], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class Redriven:
    moved: int
    skipped: int  # ready messages left: no target named (`to` null, no dead-letter header)
    remaining: int  # ready messages left in the channel


async def browse(
    engine: QueueEngine, name: str, state: MessageState | None, after: int, limit: int
) -> Page:
    """A page of the channel's messages (404 if it does not exist here, as any read)."""
    engine.get(name)
    now = engine.clock.now_ms()
    return await engine.store.browse(name, state, after, now, limit, BROWSE_SCAN, PAGE_BYTES)


async def get_message(engine: QueueEngine, name: str, msg_id: int) -> Message | None:
    engine.get(name)
    return await engine.store.get_message(name, msg_id)


async def redrive(
    engine: QueueEngine,
    name: str,
    to: str | None,
    limit: int,
    rate: float | None,
    sleep: Sleep = asyncio.sleep,
) -> Redriven:
    """Move up to `limit` ready messages of channel `name`, oldest first, to `to` (None: each
    to the channel its dead-letter header names), paced at `rate` messages a second on the
    engine's clock (None: as fast as the store goes). `sleep(seconds)` waits (tests pass one
    that moves their clock)."""
    if to == name:
        raise InvalidInput(f"cannot redrive channel {name!r} into itself; name another in 'to'")
    ch = engine.get(name)
    clock = engine.clock
    start = clock.now_ms()
    batch = (
        REDRIVE_BATCH if rate is None else max(1, min(REDRIVE_BATCH, int(rate * PACE_MS / 1000)))
    )
    moved = skipped = 0
    after = 0

    def copy(m: Message, new_id: int, now: int) -> Message:
        headers = _redriven_headers(m, name, now)
        return Message(id=new_id, body=m.body, headers=headers, enqueued_at=now)

    for _ in range(_MAX_PAGES):
        want = min(batch, limit - moved)
        if want <= 0 or engine.channels.get(name) is not ch:
            break  # done, or the channel left this node (deleted, handed off)
        now = clock.now_ms()
        # Paced: the batch after `moved` messages starts no sooner than moved / rate seconds
        # after the start. Not when it would end past the call's budget: the caller calls again.
        due = start + (0 if rate is None else int(moved * 1000 / rate))
        if max(now, due) - start >= CALL_BUDGET_MS:
            break
        if due > now:
            await sleep((due - now) / 1000)
        page = await engine.store.browse(
            name, "ready", after, clock.now_ms(), want, BROWSE_SCAN, REDRIVE_BATCH_BYTES
        )
        by_target: dict[str, list[Message]] = {}
        for m in page.messages:
            target = to or _origin(m, name)
            if target is None:
                skipped += 1
            else:
                by_target.setdefault(target, []).append(m)
        # The page is bounded in bytes (REDRIVE_BATCH_BYTES): so is each target's share of it.
        for target, messages in by_target.items():
            moved += await engine.move_ready(ch, messages, target, copy)
        if page.next is None:
            break
        after = page.next
    remaining = ch.ready_count if engine.channels.get(name) is ch else 0
    return Redriven(moved=moved, skipped=skipped, remaining=remaining)


def _origin(m: Message, source: str) -> str | None:
    """The channel a dead letter came from, by its header; None when it names none (or names
    no channel, or this one)."""
    if not m.headers:
        return None
    origin = _headers_decoder.decode(m.headers).get(DEAD_LETTER_CHANNEL_HEADER)
    if origin is None or origin == source or not valid_channel_name(origin):
        return None
    return origin


def _redriven_headers(m: Message, source: str, now: int) -> bytes:
    """The message's headers (its x-dead-letter-* ones kept as history) and when and whence
    it was redriven."""
    headers = _headers_decoder.decode(m.headers) if m.headers else {}
    headers[REDRIVEN_AT_HEADER] = str(now)
    headers[REDRIVEN_FROM_HEADER] = source
    return _headers_encoder.encode(headers)
