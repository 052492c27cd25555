"""One channel's in-memory state: a bounded window of ready messages, the leases, the waiters.

Everything here is synchronous and does no I/O; `QueueEngine` pairs it with the store.

The window is the head of the channel's ready queue. `cursor` is the highest id paged in from the
store: every ready message with a lower id is in memory (ready or leased), so paging resumes after
it. `exhausted` says the store held nothing past the cursor at the last look, so a fresh enqueue
can go straight into the window instead of being paged back in later.
"""

from __future__ import annotations

import asyncio
import heapq
from collections import deque
from collections.abc import Iterable

from app.models import ChannelConfig, ChannelStats, Lease, Message

# Enqueue-to-ack samples kept per channel between two reads of them.
LATENCY_SAMPLES = 4096


class ChannelState:
    def __init__(self, name: str, config: ChannelConfig, window_size: int) -> None:
        self.name = name
        self.config = config
        self.window_size = window_size
        self.low_water = window_size // 2
        self.page_size = max(100, min(5000, window_size // 2))

        self.window: list[int] = []  # heap of ids; entries whose id left `ready` are skipped
        self.ready: dict[int, Message] = {}
        self.leases: dict[int, Lease] = {}
        self.lease_heap: list[tuple[int, int, int]] = []  # (deadline, id, attempt)
        self.settling: set[int] = set()  # acked or moving out, awaiting the store
        # Ids whose delayed release is being written -> whether a promotion found them due
        # meanwhile (the store then holds them ready: the release's finish must too).
        self.delaying: dict[int, bool] = {}

        self.cursor = 0
        self.exhausted = False
        self.loading: asyncio.Task[None] | None = None
        self.gone: set[int] | None = None  # ids removed for good while a page was loading
        self.generation = 0  # bumped when the store may hold ready messages the window lacks
        self.epoch = 0  # bumped by purge: writes begun before it must not touch counts after

        # Writes under way that put rows into this channel (insert, dead letters moved in, its
        # settings): a delete waits for them, or one landing after the drop would recreate it.
        self.writers = 0
        self.drained: asyncio.Future[None] | None = None  # set once writers reach 0 (delete)
        self.deleting: asyncio.Future[None] | None = None  # resolved once the delete is over

        self.total = 0  # messages the store holds for this channel
        self.delayed = 0
        self.reserved = 0  # slots promised to enqueues still committing (max_length)
        self.next_due: int | None = None
        self.next_expiry: int | None = None
        self.waiters: deque[asyncio.Future[None]] = deque()

        self.enqueued = 0
        self.dequeued = 0
        self.acked = 0
        self.nacked = 0
        self.dead_lettered = 0
        self.redelivered = 0
        self.ack_latencies: list[int] = []

    # -- counts -----------------------------------------------------------------------------
    @property
    def in_flight(self) -> int:
        return len(self.leases) + len(self.settling)

    @property
    def ready_count(self) -> int:
        return max(0, self.total - self.in_flight - self.delayed)

    def holds(self, msg_id: int) -> bool:
        return msg_id in self.ready or msg_id in self.leases or msg_id in self.settling

    def oldest_ready(self) -> Message | None:
        while self.window and self.window[0] not in self.ready:
            heapq.heappop(self.window)
        return self.ready[self.window[0]] if self.window else None

    def stats(self, now: int) -> ChannelStats:
        oldest = self.oldest_ready()
        return ChannelStats(
            name=self.name,
            ready=self.ready_count,
            delayed=self.delayed,
            in_flight=self.in_flight,
            enqueued=self.enqueued,
            dequeued=self.dequeued,
            acked=self.acked,
            nacked=self.nacked,
            dead_lettered=self.dead_lettered,
            redelivered=self.redelivered,
            oldest_ready_age_ms=max(0, now - oldest.enqueued_at) if oldest else None,
        )

    # -- the window -------------------------------------------------------------------------
    def push_ready(self, messages: Iterable[Message]) -> None:
        """Messages that are in memory already (leased before) become ready again, in id order."""
        for m in messages:
            self.ready[m.id] = m
            heapq.heappush(self.window, m.id)

    def add_fresh(self, messages: list[Message]) -> None:
        """Newly stored ready messages: into the window while it mirrors the whole store."""
        if self.exhausted and len(self.ready) + len(messages) <= self.window_size:
            for m in messages:
                self.ready[m.id] = m
                self.window.append(m.id)  # ids only grow: appending keeps the heap a heap
            self.cursor = messages[-1].id
        else:
            self.exhausted = False
            self.generation += 1

    def add_promoted(self, messages: list[Message]) -> None:
        """Delayed messages that fell due; their ids may lie behind the cursor."""
        for m in messages:
            if self.holds(m.id):
                continue
            if m.id > self.cursor and not self.loading:
                self.exhausted = False
                self.generation += 1
            elif len(self.ready) < self.window_size or self.loading:
                self.ready[m.id] = m
                heapq.heappush(self.window, m.id)
            else:
                # No room: let paging fetch it again from behind it (held ids are skipped).
                self.cursor = min(self.cursor, m.id - 1)
                self.exhausted = False
                self.generation += 1

    def add_page(self, page: list[Message], gone: set[int], complete: bool) -> None:
        for m in page:
            if m.id in gone or self.holds(m.id):
                continue
            self.ready[m.id] = m
            heapq.heappush(self.window, m.id)
        if page:
            self.cursor = max(self.cursor, page[-1].id)
        self.exhausted = complete

    def needs_page(self) -> bool:
        return not self.exhausted and self.loading is None and len(self.ready) < self.low_water

    def pop_ready(self, n: int) -> list[Message]:
        taken: list[Message] = []
        window, ready = self.window, self.ready
        while window and len(taken) < n:
            msg = ready.pop(heapq.heappop(window), None)
            if msg is not None:
                taken.append(msg)
        return taken

    def forget(self, ids: Iterable[int]) -> None:
        """Messages gone for good (acked, moved, expired): drop whatever memory still holds."""
        gone = self.gone
        for msg_id in ids:
            self.ready.pop(msg_id, None)
            self.leases.pop(msg_id, None)
            self.settling.discard(msg_id)
            if gone is not None:
                gone.add(msg_id)

    def begin_write(self) -> None:
        self.writers += 1

    def end_write(self) -> None:
        self.writers -= 1
        if not self.writers and self.drained is not None and not self.drained.done():
            self.drained.set_result(None)

    # -- leases -----------------------------------------------------------------------------
    def lease(self, messages: list[Message], deadline: int) -> list[Lease]:
        leases = []
        for m in messages:
            m.attempt += 1
            lease = Lease(message=m, attempt=m.attempt, deadline=deadline)
            self.leases[m.id] = lease
            heapq.heappush(self.lease_heap, (deadline, m.id, m.attempt))
            leases.append(lease)
        return leases

    def unlease(self, leases: list[Lease]) -> None:
        """Undo `lease` after the store refused it."""
        for lease in leases:
            self.leases.pop(lease.message.id, None)
            lease.message.attempt -= 1
        self.push_ready(lease.message for lease in leases)

    def take_back(self, leases: list[Lease]) -> list[Lease]:
        """Take these leases out of reach if they still stand (none of them expired)."""
        held = []
        for lease in leases:
            if self.leases.get(lease.message.id) is lease:
                del self.leases[lease.message.id]
                held.append(lease)
        return held

    def claim(self, receipts: list[tuple[int, int]], now: int) -> tuple[list[Lease], list[int]]:
        """Take the leases these (id, attempt) pairs still hold; return them and stale indexes."""
        held: list[Lease] = []
        stale: list[int] = []
        leases = self.leases
        for i, (msg_id, attempt) in enumerate(receipts):
            lease = leases.get(msg_id)
            if lease is None or lease.attempt != attempt or lease.deadline <= now:
                stale.append(i)
            else:
                del leases[msg_id]
                held.append(lease)
        return held, stale

    def restore(self, leases: list[Lease]) -> None:
        """Give claimed leases back (the store refused what was to follow)."""
        for lease in leases:
            msg_id = lease.message.id
            self.settling.discard(msg_id)
            self.leases[msg_id] = lease
            heapq.heappush(self.lease_heap, (lease.deadline, msg_id, lease.attempt))

    def expired_leases(self, now: int) -> list[Lease]:
        out: list[Lease] = []
        heap = self.lease_heap
        while heap and heap[0][0] <= now:
            deadline, msg_id, attempt = heapq.heappop(heap)
            lease = self.leases.get(msg_id)
            if lease is not None and lease.attempt == attempt and lease.deadline == deadline:
                del self.leases[msg_id]
                out.append(lease)
        return out

    def next_lease_deadline(self) -> int | None:
        return self.lease_heap[0][0] if self.lease_heap else None

    # -- waiters ----------------------------------------------------------------------------
    def wake(self, count: int | None = None) -> None:
        """Wake up to `count` waiting dequeues (all when None), oldest first."""
        n = len(self.waiters) if count is None else count
        while self.waiters and n > 0:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                n -= 1

    def record_ack_latency(self, now: int, leases: list[Lease]) -> None:
        room = LATENCY_SAMPLES - len(self.ack_latencies)
        if room > 0:
            self.ack_latencies.extend(now - lease.message.enqueued_at for lease in leases[:room])
