"""One heap of (time, channel) timers for the maintenance pass, with lazy invalidation.

A channel is armed for the earliest moment it may have work (a lease deadline, a delayed message
falling due, a TTL running out). Arming earlier pushes a new entry; the older, later entry stays in
the heap and is skipped when it surfaces, because `_armed` no longer names its time. So a pass
touches only the channels with something due, and an idle node with many channels does nothing.
A timer that fires early is harmless: the pass finds nothing due and arms the channel again.
"""

from __future__ import annotations

import heapq


class Timers:
    def __init__(self) -> None:
        self._heap: list[tuple[int, str]] = []
        self._armed: dict[str, int] = {}  # channel -> the time of its live heap entry

    def __len__(self) -> int:
        return len(self._armed)

    def arm(self, channel: str, at: int) -> bool:
        """Make sure `channel` is visited by `at`; True when this moved its timer earlier."""
        current = self._armed.get(channel)
        if current is not None and current <= at:
            return False
        self._armed[channel] = at
        heapq.heappush(self._heap, (at, channel))
        self._compact()
        return True

    def disarm(self, channel: str) -> None:
        self._armed.pop(channel, None)

    def armed(self, channel: str) -> int | None:
        return self._armed.get(channel)

    def pop_due(self, now: int) -> list[str]:
        """The channels whose timer fell due by `now`, each once; their timers are spent."""
        heap, armed = self._heap, self._armed
        due: list[str] = []
        while heap and heap[0][0] <= now:
            at, channel = heapq.heappop(heap)
            if armed.get(channel) == at:
                del armed[channel]
                due.append(channel)
        return due

    def next(self) -> int | None:
        """The earliest live timer (stale entries on top are dropped on the way)."""
        heap, armed = self._heap, self._armed
        while heap and armed.get(heap[0][1]) != heap[0][0]:
            heapq.heappop(heap)
        return heap[0][0] if heap else None

    def _compact(self) -> None:
        # Re-arming earlier again and again leaves stale entries behind; rebuild the heap when
        # they outnumber the live ones, so it stays within twice the armed channels.
        if len(self._heap) > 64 and len(self._heap) > 2 * len(self._armed):
            self._heap = [(at, channel) for channel, at in self._armed.items()]
            heapq.heapify(self._heap)
