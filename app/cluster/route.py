"""Where a request for a channel is served: the one answer the router asks of the runtime."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Local:
    """This node owns the channel's shard and serves it now."""

    shard: str


@dataclass(frozen=True, slots=True)
class Remote:
    """Another node owns the channel's shard: forward one hop to it."""

    shard: str
    url: str
    node_id: str


@dataclass(frozen=True, slots=True)
class NoOwner:
    """Nobody serves the shard right now (failover or hand-off under way): 503, retry soon."""

    shard: str
    retry_after_s: int
    reason: str


Route = Local | Remote | NoOwner

__all__ = ["Local", "NoOwner", "Remote", "Route"]
