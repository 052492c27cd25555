"""Per-message history, for channels with `trace` on: the events the engine records.

Each builder returns one event per message of a batch, in the batch's order, for the store write
that makes the change (`events=`): the history is written with the change itself, all or nothing
with it, never by a write of its own. Messages of a batch that share an event share one object
(one per batch, or one per attempt for deliveries), which the stores encode or send once.

The engine asks `ch.config.trace` once per batch and calls none of this when it is off: an
untraced channel pays one attribute test per batch and no store work. The events:

- enqueued: `{"at", "event": "enqueued"}`
- delivered: `attempt`, `consumer` (the client's "ip:port" as the owner or the forwarding node
  saw it, at most CONSUMER_MAX_CHARS), `lease_deadline`
- nacked: `attempt`, `delay_ms`
- lease_expired: `attempt`
- dead_lettered: `reason` (ttl, max_attempts, nack), `to` (the dead-letter channel, or None when
  dropped: then the history goes with the message), `attempt`, and `after` ("nacked" or
  "lease_expired") when it ended a lease
- redriven: `from`, `to` (for the copy a redrive makes; see `redriven`)

An ack deletes the message, and its history with it: no event is written for it.
"""

from __future__ import annotations

from collections.abc import Sequence

from app.models import CONSUMER_MAX_CHARS, Event, Lease, Message


def enqueued(at: int, n: int) -> list[Event]:
    return [{"at": at, "event": "enqueued"}] * n


def delivered(at: int, leases: Sequence[Lease], consumer: str, deadline: int) -> list[Event]:
    who = consumer[:CONSUMER_MAX_CHARS]
    return _per_attempt(
        [lease.attempt for lease in leases],
        {"at": at, "event": "delivered", "consumer": who, "lease_deadline": deadline},
    )


def returned(at: int, leases: Sequence[Lease], delay_ms: int | None) -> list[Event]:
    """Leases that ended without an ack: nacked (`delay_ms` given) or expired (None)."""
    attempts = [lease.attempt for lease in leases]
    if delay_ms is None:
        return _per_attempt(attempts, {"at": at, "event": "lease_expired"})
    return _per_attempt(attempts, {"at": at, "event": "nacked", "delay_ms": delay_ms})


def dead_lettered(
    at: int, messages: Sequence[Message], reason: str, to: str | None, after: str | None
) -> list[Event]:
    base: Event = {"at": at, "event": "dead_lettered", "reason": reason, "to": to}
    if after is not None:
        base["after"] = after
    return _per_attempt([m.attempt for m in messages], base)


def redriven(at: int, source: str, target: str, n: int) -> list[Event]:
    """For a redrive's `store.move` (events=) of `n` messages from `source` into `target`: the
    copies carry their history on, with this event."""
    return [{"at": at, "event": "redriven", "from": source, "to": target}] * n


def _per_attempt(attempts: Sequence[int], base: Event) -> list[Event]:
    """`base` with each message's attempt: one event object per distinct attempt."""
    made: dict[int, Event] = {}
    out: list[Event] = []
    for attempt in attempts:
        event = made.get(attempt)
        if event is None:
            event = made[attempt] = {**base, "attempt": attempt}
        out.append(event)
    return out
