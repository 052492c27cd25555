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

    def beat(self, shard: str, now: int) -> None:
        self._last[shard] = max(now, self._last.get(shard, now))

    def last(self, shard: str) -> int | None:
        return self._last.get(shard)

    def silent_for(self, shard: str, now: int) -> int:
        return max(0, now - self._last.get(shard, self._started_at))


__all__ = ["Liveness"]
