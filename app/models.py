"""Domain records shared by the queue engine and the stores.

Bodies and headers travel as raw JSON bytes: the node never needs to look inside a body, so it is
validated once at the edge and then copied, not re-parsed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

# A channel name, defined once. Python checks use `CHANNEL_NAME.fullmatch` (Python's `$` would also
# match before a trailing newline); `CHANNEL_NAME_PATTERN` is the JSON Schema (ECMA-262) form for
# OpenAPI, where `$` ends the input.
_CHANNEL_NAME = r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}"
CHANNEL_NAME = re.compile(_CHANNEL_NAME)
CHANNEL_NAME_PATTERN = f"^{_CHANNEL_NAME}$"
CHANNEL_NAME_RULE = "1 to 128 letters, digits, '.', '_' or '-', starting with a letter or digit"
DEAD_LETTER_SUFFIX = ".dlq"
# Bytes a dead-lettered copy may grow by: the x-dead-letter-* headers the engine adds (a channel
# name of at most 128 characters, a reason, an attempt count, a message id: under 400 bytes
# encoded). A store accepts a dead letter this much past its message limit, so a message it
# took in can always be dead-lettered; each store's limit leaves room for it.
DEAD_LETTER_HEADROOM = 1024
# A traced message keeps its last HISTORY_LIMIT events (app/engine/trace.py), stored with it.
# Each event is at most a few hundred bytes (times, attempt, a consumer address cut to
# CONSUMER_MAX_CHARS, at most two channel names), so a full history fits in HISTORY_HEADROOM:
# a store whose record size is bounded (MongoDB) keeps that much room next to the message.
HISTORY_LIMIT = 100
CONSUMER_MAX_CHARS = 64
HISTORY_HEADROOM = 48 * 1024

# One history event: {"at": ms, "event": name, ...details}.
Event = dict[str, int | str | None]


@dataclass(slots=True)
class ChannelConfig:
    visibility_ms: int = 30_000
    max_attempts: int = 5
    # None drops dead messages; "" is never stored (resolved at creation to "<channel>.dlq").
    dead_letter: str | None = None
    max_length: int | None = None
    ttl_ms: int | None = None
    # Record each message's history (app/engine/trace.py); off: no history work at all.
    trace: bool = False


@dataclass(slots=True)
class Message:
    """A message as the store holds it.

    `available_at` is 0 for a ready message, the lease deadline for a leased one, and the due time
    for a delayed one; `leased` tells the last two apart.
    """

    id: int
    body: bytes
    headers: bytes | None
    enqueued_at: int
    available_at: int = 0
    expires_at: int | None = None
    attempt: int = 0
    leased: bool = False
    dedup_id: str | None = None


@dataclass(slots=True)
class EnqueueResult:
    """One id per message of a batch; `new` is False where the dedup id was already used."""

    ids: list[int]
    new: list[Message] = field(default_factory=list)


@dataclass(slots=True)
class ChannelCounts:
    """What the store holds for a channel, read once at start."""

    total: int
    delayed: int
    next_due: int | None
    next_expiry: int | None


@dataclass(slots=True)
class Lease:
    """One delivery of a message; its receipt names (message id, attempt)."""

    message: Message
    attempt: int
    deadline: int


def valid_channel_name(name: str) -> bool:
    return CHANNEL_NAME.fullmatch(name) is not None


@dataclass(slots=True)
class ChannelStats:
    """A channel's counts and lifetime counters (since the node started), read by /metrics,
    GET /channels and the watcher snapshot."""

    name: str
    ready: int
    delayed: int
    in_flight: int
    enqueued: int
    dequeued: int
    acked: int
    nacked: int
    dead_lettered: int
    redelivered: int
    oldest_ready_age_ms: int | None
