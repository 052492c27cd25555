"""When each shard's owner was last heard from by heartbeat, on this node's monotonic clock.

The mirror's heartbeat endpoint beats; the ownership keeper asks how long a shard has been
silent before it looks at the shard's lease in the store. Silence alone never decides a
takeover: only an expired lease in the store does.
"""

from __future__ import annotations


class Liveness:
    def __init__(self, started_at: int) -> None:
        # A shard never heard from has been silent since this node started.
        self._started_at = started_at
        self._last: dict[str, int] = {}
        # Shards this node began to back after it started (set_nodes): silent since then.
        self._since: dict[str, int] = {}

    def watch(self, shard: str, now: int) -> None:
        """This node backs `shard` from `now` on: it has not been silent for longer."""
        self._since[shard] = now

    def beat(self, shard: str, now: int) -> None:
        self._last[shard] = max(now, self._last.get(shard, now))

    def last(self, shard: str) -> int | None:
        return self._last.get(shard)

    def silent_for(self, shard: str, now: int) -> int:
        heard = self._last.get(shard, self._started_at)
        return max(0, now - max(heard, self._since.get(shard, heard)))


__all__ = ["Liveness"]
