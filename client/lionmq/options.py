"""Keyword options of the client methods, typed so that `**options` stays checked."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, TypedDict

if TYPE_CHECKING:
    from lionmq.retry import RetryPolicy


class MessageOptions(TypedDict, total=False):
    """Options shared by every message of an enqueue call."""

    headers: dict[str, str]
    delay_ms: int
    ttl_ms: int


class OneMessageOptions(MessageOptions, total=False):
    dedup_id: str


class ChannelOptions(TypedDict, total=False):
    """Settings to change with `put_channel`; a key left out is left unchanged, None clears."""

    visibility_ms: int
    max_attempts: int
    dead_letter: str | None
    max_length: int | None
    ttl_ms: int | None
    trace: bool


class ClientOptions(TypedDict, total=False):
    """Settings shared by `Client` and `AsyncClient`, all optional."""

    token: str | None
    """Sent as `Authorization: Bearer <token>`, for a node with API_TOKEN set."""
    admin_token: str | None
    """Sent instead of `token` by `set_nodes` and `handoff`, for a cluster with ADMIN_TOKEN."""
    timeout: float
    """Seconds for connecting and for each read (default 10); a long poll adds its wait."""
    retry: RetryPolicy
    """How connection errors and 5xx are retried (default `RetryPolicy()`)."""
    headers: Mapping[str, str]
    """Extra headers for every request."""
    max_connections: int
    """Size of the connection pool (default 100); ignored with an injected transport."""
    max_batch: int
    """Messages per enqueue request (default 1000, the node's default limit)."""


class ConsumeOptions(TypedDict, total=False):
    """Tuning for `consume`, all optional."""

    wait_ms: int
    """Long-poll time of each dequeue (default 2000); also the longest a stop waits for one."""
    visibility_ms: int
    """Lease asked for on each dequeue (default 30000); extended when half of it is left."""
    nack_delay_ms: int
    """`delay_ms` of the nack sent when the handler raises (default 0: redeliver at once)."""
    drain_timeout: float | None
    """Seconds that running handlers get to finish on stop before their messages are nacked
    (default None: wait for them)."""
    flush_interval: float
    """Longest an ack waits to share a request with others, in seconds (default 0.05)."""
    error_pause: float
    """Seconds to pause when a dequeue failed even after retries (default 1), before the next."""
