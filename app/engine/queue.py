"""The queue engine: the channels' in-memory state kept in step with the store.

Every state change follows one rule: take the messages out of reach in memory first (so no one
else can deliver or ack them), await the store's durable write, then finish the change in memory;
if the store fails, put everything back as it was and let the caller answer 503. A purge (or the
channel leaving memory) bumps the channel's epoch: a write begun before it must not touch memory
after it. `_complete` is that rule, and every completion (ack, nack, lease expiry, extend,
dead-lettering, a lease given back) goes through it.

A channel enters memory one way, `adopt` (at start, on first enqueue, and later on a hand-off
between nodes), which builds its state from what the store holds; it leaves by `release`.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Annotated, Any, Concatenate, ParamSpec, Protocol, TypeVar

import msgspec

from app.clock import Clock
from app.engine import trace
from app.engine.channel import ChannelState
from app.engine.ids import IdGenerator, parse_receipts
from app.engine.timers import Timers
from app.errors import ChannelFull, ChannelNotFound, Fenced, InvalidInput, LionMQError
from app.models import (
    DEAD_LETTER_SUFFIX,
    ChannelConfig,
    ChannelStats,
    EnqueueResult,
    Event,
    Lease,
    Message,
    valid_channel_name,
)
from app.store.base import Store

if TYPE_CHECKING:
    from app.cluster.journal import Journal

log = logging.getLogger("lionmq.engine")

T = TypeVar("T")

# How many messages one maintenance pass moves per channel and kind of work; bounds a tick.
_SWEEP_LIMIT = 1000
_PRUNE_EVERY_MS = 30_000
_PRUNE_AGAIN_MS = 50
_PRUNE_LIMIT = 20_000
# A channel whose maintenance failed is retried after this, doubling per failure up to the cap.
_RETRY_FIRST_MS = 100
_RETRY_MAX_MS = 30_000
_PRUNING = "dedup pruning"  # not a channel name (those have no spaces)
# Passes over which the maintenance loop re-checks every channel's timer in turn, in case one was
# missed (say, a lease given back after its deadline while its channel's timer had already fired);
# at least _AUDIT_MIN channels a pass. Passes come at least once a second: with 100,000 channels a
# round takes about a minute and ~1,700 cheap checks a second.
_AUDIT_ROUND = 60
_AUDIT_MIN = 500


MAX_DELAY_MS = 7 * 24 * 3600 * 1000
MAX_TTL_MS = 365 * 24 * 3600 * 1000
HeaderName = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]


class NewMessage(msgspec.Struct, forbid_unknown_fields=True):
    """One message of an enqueue request, as decoded (and validated) at the edge."""

    body: msgspec.Raw
    headers: dict[HeaderName, str] | None = None
    delay_ms: Annotated[int, msgspec.Meta(ge=0, le=MAX_DELAY_MS)] = 0
    ttl_ms: Annotated[int, msgspec.Meta(ge=1, le=MAX_TTL_MS)] | None = None
    dedup_id: Annotated[str, msgspec.Meta(min_length=1, max_length=256)] | None = None


@dataclass(frozen=True, slots=True)
class EngineLimits:
    window_size: int = 10_000
    dedup_window_ms: int = 300_000
    defaults: ChannelConfig = field(default_factory=ChannelConfig)


@dataclass(slots=True)
class Outcome:
    """How many receipts took effect, and which ones were stale."""

    done: int
    stale: list[str]


@dataclass(slots=True)
class Failing:
    """A channel (or the dedup pruning) whose maintenance failed: retried at `retry_at`."""

    failures: int
    retry_at: int
    detail: str


@dataclass(slots=True)
class Claim:
    """Leases taken out of reach for an ack, nack or extend, and the stale receipts."""

    now: int
    held: list[Lease]
    stale: list[str]


class Ownership(Protocol):
    """Which channels this node serves, as the cluster runtime decides (app/cluster)."""

    def ids_for(self, channel: str) -> IdGenerator:
        """The id generator of the channel's shard; `Fenced` (503) when this node does not
        serve the channel now."""
        ...

    def serves(self, channel: str) -> bool: ...

    def admits(self, channel: str) -> bool:
        """Whether the channel may enter memory: its shard is held here (served, or being
        adopted) and it is not leaving. A channel built while this turned false (a hand-off or
        a lost lease during its first request) would stay behind as stale memory."""
        ...

    def poke(self, channel: str) -> None:
        """Tell the channel's owner that messages were moved into it from another shard."""
        ...


# Who dequeues ("ip:port"), asked only when the channel traces.
Consumer = Callable[[], str]

_header_encoder = msgspec.json.Encoder()
_header_decoder = msgspec.json.Decoder(dict[str, str])

# The header naming the channel a dead letter came from (where a redrive sends it back).
DEAD_LETTER_CHANNEL_HEADER = "x-dead-letter-channel"

# The copy of a message moved to another channel: (message, new id, now) -> the copy.
Copier = Callable[[Message, int, int], Message]


P = ParamSpec("P")
R = TypeVar("R")
W = TypeVar("W")


def _noted(
    method: Callable[Concatenate[QueueEngine, str, P], Awaitable[R]],
) -> Callable[Concatenate[QueueEngine, str, P], Coroutine[Any, Any, R]]:
    """Record the named channel as changed once the operation ends, however it ends: noted
    after its last change, the telemetry never reads a state halfway through it."""

    @functools.wraps(method)
    async def noted(self: QueueEngine, name: str, /, *args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await method(self, name, *args, **kwargs)
        finally:
            self._note(name)

    return noted


class QueueEngine:
    def __init__(self, store: Store, clock: Clock, limits: EngineLimits | None = None) -> None:
        self.store = store
        self.clock = clock
        self.limits = limits or EngineLimits()
        self.ids = IdGenerator(clock)
        # Set by the cluster runtime: then only the channels of served shards live in memory,
        # each adopted by the runtime, with ids from its shard's generator. None: this engine
        # owns every channel of the store (used alone, as in the engine's tests).
        self.ownership: Ownership | None = None
        self.channels: dict[str, ChannelState] = {}
        self._entering: dict[str, asyncio.Future[ChannelState]] = {}
        # Long polls on channels that do not exist (yet): woken when the channel enters memory.
        self._absent: dict[str, set[asyncio.Future[None]]] = {}
        # Writes (and their finish in memory) that outlive the request that began them.
        self._writes: set[asyncio.Task[Any]] = set()
        self._next_prune = 0
        self._next_wake: int | None = None
        self._failing: dict[str, Failing] = {}
        self.timers = Timers()
        self._audit: list[str] = []
        # Names of the channels whose counts changed since the telemetry last looked (None: no
        # one is looking, so nothing is recorded).
        self.activity: set[str] | None = None
        # Set when a timer earlier than the maintenance loop's next wake appears.
        self.timers_changed = asyncio.Event()
        # The mirror's hook (app.cluster.journal): told of every settled batch, None when no
        # shard this node owns has a backup (then it costs one attribute test per batch).
        self.journal: Journal | None = None
        # The node is stopping (`end_waits`): long polls answer with what they have at once.
        self.closing = False

    # -- start and stop ---------------------------------------------------------------------
    async def start(self) -> None:
        """Without a cluster runtime, rebuild memory from the store: every channel it holds,
        adopted one by one. With one, the runtime adopts the channels of the shards it gains."""
        if self.ownership is not None:
            return
        self.ids = IdGenerator(self.clock, floor=await self.store.max_id())
        for name, config in (await self.store.load_channels()).items():
            await self.adopt(name, config)

    def _ids(self, name: str) -> IdGenerator:
        """The generator for the channel's ids (`Fenced` when its shard is not served here)."""
        return self.ids if self.ownership is None else self.ownership.ids_for(name)

    async def quiesce(self) -> None:
        """Wait for every write under way now (and its finish in memory) to end: channels
        released after this leave nothing in the store their next owner could miss."""
        if self._writes:
            await asyncio.wait(set(self._writes))

    async def refresh(self, name: str) -> None:
        """Re-read a channel's counts and page again from its start: messages were moved into
        it from another shard (a poke, or the runtime's audit). Skipped while writes to it are
        under way (their own finish counts them; the next audit comes back)."""
        ch = self.channels.get(name)
        if ch is None or ch.writers or ch.deleting is not None:
            return
        epoch = ch.epoch
        counts = await self.store.counts(name, self.clock.now_ms())
        if self.channels.get(name) is not ch or ch.epoch != epoch or ch.writers:
            return
        if counts.total != ch.total:
            ch.total, ch.delayed = counts.total, counts.delayed
            if counts.next_due is not None:
                self._set_due(ch, counts.next_due)
            if counts.next_expiry is not None:
                self._set_expiry(ch, counts.next_expiry)
            # Moved-in ids may lie behind the cursor: page from the start (held ids are skipped).
            ch.cursor, ch.exhausted = 0, False
            ch.generation += 1
            ch.wake()

    async def stop(self) -> None:
        for ch in self.channels.values():
            ch.wake()
            if ch.loading is not None:
                ch.loading.cancel()
        for waiters in self._absent.values():
            _wake_all(waiters)
        # Writes under way finish (and settle memory) before the store closes under them.
        if self._writes:
            await asyncio.wait(set(self._writes))

    def _background(self, work: Awaitable[T]) -> asyncio.Future[T]:
        """`work` running on its own (a coroutine becomes a task; a store's future stays one),
        tracked so that `stop` waits for it."""
        future = asyncio.ensure_future(work)
        self._writes.add(future)
        future.add_done_callback(self._writes.discard)
        return future

    async def _outlive(self, future: asyncio.Future[T]) -> T:
        """Await work that must run to its end even if this caller is cancelled."""
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            future.add_done_callback(_log_failure)  # nobody awaits it any more
            raise

    async def _settled(
        self,
        write: Callable[[], Awaitable[W]],
        settle: Callable[[W | None, BaseException | None], R],
    ) -> R:
        """A store write whose end memory must hear of, even if this caller is cancelled.

        `settle(result, error)` runs as soon as the write ends, as a callback on its future,
        and its answer is this call's; on failure the write's error is raised once `settle`
        has put memory back. A store that answers with a future of its own (SQLite's writer)
        costs no task here: the hot path's ack, nack, extend and enqueue each pay one shield.
        """
        try:
            future = self._background(write())
        except BaseException as exc:  # refused before it was queued (too large, store closed)
            settle(None, exc)
            raise
        outcome: list[R] = []

        def done(f: asyncio.Future[W]) -> None:
            error = asyncio.CancelledError() if f.cancelled() else f.exception()
            outcome.append(settle(None if error is not None else f.result(), error))

        future.add_done_callback(done)  # before the shield's: it runs first
        await self._outlive(future)
        return outcome[0]

    # -- channels ---------------------------------------------------------------------------
    def get(self, name: str) -> ChannelState:
        ch = self.channels.get(name)
        if ch is None or ch.deleting is not None:
            self._owner_only(name)
            raise ChannelNotFound(f"channel {name!r} does not exist; enqueue to it to create it")
        return ch

    def default_config(
        self, name: str, *, dead_letter_target: bool = False, trace: bool = False
    ) -> ChannelConfig:
        """The settings a channel is created with; `trace`: made as the dead-letter channel of
        a traced channel, it traces too (the copies carry their history into it)."""
        dlq = f"{name}{DEAD_LETTER_SUFFIX}"
        # A dead-letter channel gets none of its own: no .dlq.dlq chains.
        no_dlq = dead_letter_target or name.endswith(DEAD_LETTER_SUFFIX)
        return replace(
            self.limits.defaults,
            dead_letter=None if no_dlq or not valid_channel_name(dlq) else dlq,
            trace=trace or self.limits.defaults.trace,
        )

    async def ensure(
        self, name: str, *, dead_letter_target: bool = False, trace: bool = False
    ) -> ChannelState:
        """The channel, created with default settings (and persisted) on first use."""
        ch = self.channels.get(name)
        if ch is not None and ch.deleting is None:
            return ch  # the hot path: no task, no await

        self._ids(name)  # a channel of a shard this node does not serve is refused here

        async def create() -> ChannelConfig:
            config = self.default_config(name, dead_letter_target=dead_letter_target, trace=trace)
            await self.store.save_channel(name, config)
            return config

        return await self._enter(name, create)

    async def adopt(self, name: str, config: ChannelConfig) -> ChannelState:
        """Take a channel the store holds into memory (at start; next, on a hand-off)."""

        async def known() -> ChannelConfig:
            return config

        return await self._enter(name, known)

    async def _enter(
        self, name: str, settle: Callable[[], Awaitable[ChannelConfig]]
    ) -> ChannelState:
        """The channel in memory, built by one task however many callers ask at once.

        A channel being deleted is waited for first: a write that reached the store after its
        drop would bring the channel back there, unseen by memory.
        """
        while True:
            ch = self.channels.get(name)
            if ch is not None:
                if ch.deleting is None:
                    return ch
                await asyncio.shield(ch.deleting)
                continue
            task = self._entering.get(name)
            if task is None:
                task = self._entering[name] = self._background(self._build(name, settle))
            # Built; round again, since a delete may have begun before this caller resumed.
            await self._outlive(task)

    async def _build(
        self, name: str, settle: Callable[[], Awaitable[ChannelConfig]]
    ) -> ChannelState:
        """The one path from the store to a channel's memory: counts, running leases, first
        page. Nothing is assumed empty: whatever the store holds for the name is taken in."""
        try:
            config = await settle()
            ch = ChannelState(name, config, self.limits.window_size)
            now = self.clock.now_ms()
            counts = await self.store.counts(name, now)
            ch.total, ch.delayed = counts.total, counts.delayed
            ch.next_due, ch.next_expiry = counts.next_due, counts.next_expiry
            for m in await self.store.leased(name, now):
                ch.leases[m.id] = Lease(message=m, attempt=m.attempt, deadline=m.available_at)
                ch.lease_heap.append((m.available_at, m.id, m.attempt))
            ch.lease_heap.sort()
            await self._load_page(ch)
        finally:
            del self._entering[name]
        if self.ownership is not None and not self.ownership.admits(name):
            raise Fenced(
                f"channel {name!r} left this node while it was being loaded; retry: the"
                " request goes to its owner"
            )
        self.channels[name] = ch
        if self.journal is not None:
            self.journal.adopted(ch)
        self._arm(ch)
        _wake_all(self._absent.pop(name, ()))
        return ch

    def release(self, name: str) -> ChannelState | None:
        """Let go of a channel's memory; the store is left alone. Completions still under way
        finish in the store, and the epoch keeps them out of this (now stale) state; writes
        that add to the channel must be over (`_drop` waits for them), or a later `adopt`
        could miss what they add."""
        ch = self.channels.pop(name, None)
        if ch is None:
            return None
        self.timers.disarm(name)
        ch.epoch += 1
        if self.journal is not None:
            self.journal.dropped(name)
        ch.wake()
        if ch.loading is not None:
            ch.loading.cancel()
        return ch

    def end_waits(self) -> None:
        """The node is stopping (SIGTERM, after its hand-offs): every long poll answers now
        with what it has, as if its wait were over, and none waits from here on. The server
        drains the requests under way before it exits; a poll left to its `wait_ms` (up to
        30 s) would hold the exit that long, past a supervisor's stop timeout."""
        self.closing = True
        for ch in self.channels.values():
            ch.wake()
        self.wake_absent()

    def wake_absent(self) -> None:
        """Wake the long polls waiting for channels not in memory: after a hand-off or a lost
        shard they find their channel no longer served here and end (Fenced) at once."""
        for waiters in self._absent.values():
            _wake_all(waiters)

    async def configure(self, name: str, changes: dict[str, Any]) -> ChannelState:
        ch = await self.ensure(name)
        config = replace(ch.config, **changes)
        if config.dead_letter == name:
            raise InvalidInput("dead_letter must name another channel, not the channel itself")
        ch.begin_write()
        try:
            await self._outlive(self._background(self.store.save_channel(name, config)))
        finally:
            ch.end_write()
        ch.config = config
        if self.journal is not None:
            self.journal.settings(ch)
        return ch

    @_noted
    async def purge(self, name: str) -> int:
        ch = self.get(name)
        return await self._outlive(self._background(self._purge(ch)))

    async def _purge(self, ch: ChannelState) -> int:
        count = await self.store.purge(ch.name)
        ch.epoch += 1
        ch.total = max(0, ch.total - count)
        ch.delayed = 0
        ch.ready.clear()
        ch.window.clear()
        ch.leases.clear()
        ch.lease_heap.clear()
        ch.settling.clear()
        ch.delaying.clear()
        ch.cursor, ch.exhausted = 0, False
        ch.next_due = ch.next_expiry = None
        if self.journal is not None:
            self.journal.purged(ch)
        return count

    @_noted
    async def delete_channel(self, name: str) -> None:
        ch = self.get(name)
        deleting = ch.deleting = asyncio.get_running_loop().create_future()
        await self._outlive(self._background(self._drop(ch, deleting)))

    async def _drop(self, ch: ChannelState, deleting: asyncio.Future[None]) -> None:
        """No new write may reach the channel (`ensure` waits while `deleting` is set); those
        under way finish first, so none lands after the drop to recreate it unseen."""
        try:
            if ch.writers:
                ch.drained = asyncio.get_running_loop().create_future()
                await ch.drained
            await self.store.drop_channel(ch.name)
        except BaseException:
            ch.deleting = None  # still there, as it was
            raise
        else:
            self.release(ch.name)
        finally:
            ch.drained = None
            deleting.set_result(None)

    async def history(self, name: str, message_id: int) -> list[Event] | None:
        """The message's recorded history (see app/engine/trace.py), or None when the channel
        holds no such message. `ChannelNotFound` for an unknown channel."""
        self.get(name)
        return await self.store.history(name, message_id)

    def stats_of(self, names: Iterable[str], now: int) -> list[ChannelStats]:
        """The stats of the named channels that exist, in the order named."""
        channels = self.channels
        return [ch.stats(now) for name in names if (ch := channels.get(name)) is not None]

    def channel_count(self) -> int:
        return len(self.channels)

    def take_ack_latencies(self, names: Iterable[str]) -> dict[str, list[int]]:
        """Enqueue-to-ack samples of the named channels since the last call (an ack is
        activity, so the telemetry passes the channels `take_activity` named)."""
        out = {}
        for name in names:
            ch = self.channels.get(name)
            if ch is not None and ch.ack_latencies:
                out[name], ch.ack_latencies = ch.ack_latencies, []
        return out

    # -- enqueue ----------------------------------------------------------------------------
    @_noted
    async def enqueue(self, name: str, batch: Sequence[NewMessage]) -> list[int]:
        ch = await self.ensure(name)
        limit = ch.config.max_length
        n = len(batch)
        if limit is not None and ch.total + ch.reserved + n > limit:
            raise ChannelFull(
                f"channel {name!r} holds {ch.total + ch.reserved} of at most {limit} messages;"
                f" this batch of {n} would pass max_length, so nothing was stored"
            )
        now = self.clock.now_ms()
        first = self._ids(name).take(n)
        default_ttl = ch.config.ttl_ms
        # Positional, in Message's field order: keywords cost a third of an enqueue's loop.
        messages = [
            Message(
                first + i,  # id
                bytes(m.body),
                _header_encoder.encode(m.headers) if m.headers else None,
                now,  # enqueued_at
                now + m.delay_ms if m.delay_ms else 0,  # available_at
                now + ttl if (ttl := m.ttl_ms or default_ttl) else None,  # expires_at
                0,  # attempt
                False,  # leased
                m.dedup_id,
            )
            for i, m in enumerate(batch)
        ]
        ch.reserved += n
        ch.begin_write()

        def settle(result: EnqueueResult | None, error: BaseException | None) -> list[int]:
            ch.reserved -= n
            ch.end_write()
            if result is None:
                return []
            # A delete waits for this write, so the channel is still the one it was written
            # to (unless the node let go of it meanwhile, and then counts come from the store).
            if self.channels.get(ch.name) is ch:
                self._stored(ch, result.new)
            return result.ids

        # Settled from the write's end: a producer that hangs up leaves nothing uncounted.
        since = now - self.limits.dedup_window_ms
        events = trace.enqueued(now, n) if ch.config.trace else None
        return await self._settled(
            lambda: self.store.insert(ch.name, messages, since, events), settle
        )

    def _stored(self, ch: ChannelState, new: list[Message]) -> None:
        """Account for messages just made durable in this channel and wake its consumers."""
        if not new:
            return
        self._note(ch.name)
        ch.total += len(new)
        ch.enqueued += len(new)
        ready = [m for m in new if not m.available_at]
        if len(ready) < len(new):
            due = min(m.available_at for m in new if m.available_at)
            ch.delayed += len(new) - len(ready)
            self._set_due(ch, due)
        expiries = [m.expires_at for m in new if m.expires_at is not None]
        if expiries:
            self._set_expiry(ch, min(expiries))
        if ready:
            ch.add_fresh(ready)
            ch.wake(len(ready))
        if self.journal is not None:
            self.journal.enqueued(ch, new)

    def _set_due(self, ch: ChannelState, due: int) -> None:
        if ch.next_due is None or due < ch.next_due:
            ch.next_due = due
            self._timer(ch, due)

    def _set_expiry(self, ch: ChannelState, at: int) -> None:
        if ch.next_expiry is None or at < ch.next_expiry:
            ch.next_expiry = at
            self._timer(ch, at)

    # -- dequeue ----------------------------------------------------------------------------
    @_noted
    async def dequeue(
        self,
        name: str,
        max_count: int,
        wait_ms: int,
        visibility_ms: int | None,
        consumer: Consumer | None = None,
    ) -> list[Lease]:
        """Lease up to `max_count` messages, waiting up to `wait_ms` for one. An unknown
        channel is not created: it has nothing to give, and a long poll waits for it.
        `consumer` tells who asks, for a traced channel's history (asked only there)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_ms / 1000
        while True:
            ch = self.channels.get(name)
            if ch is None and self.ownership is not None and not self.ownership.serves(name):
                # Handed off or taken over while this poll waited (or never served here): the
                # messages are at the owner, not worth waiting out `wait_ms` for here.
                raise Fenced(
                    f"this node does not serve channel {name!r} right now; retry: the request"
                    " goes to its owner"
                )
            leases: list[Lease] = []
            if ch is not None:
                visibility = visibility_ms or ch.config.visibility_ms
                leases = await self._take(ch, max_count, visibility, consumer)
            remaining = deadline - loop.time()
            if leases or remaining <= 0 or self.closing:
                return leases
            waiter: asyncio.Future[None] = loop.create_future()
            if ch is not None:
                ch.waiters.append(waiter)
                waiters = None
            else:
                waiters = self._absent.setdefault(name, set())
                waiters.add(waiter)
            try:
                await asyncio.wait_for(waiter, remaining)
            except TimeoutError:
                pass
            finally:
                if not waiter.done():
                    waiter.cancel()
                if waiters is not None:
                    waiters.discard(waiter)
                    if not waiters and self._absent.get(name) is waiters:
                        del self._absent[name]

    async def _take(
        self, ch: ChannelState, n: int, visibility_ms: int, consumer: Consumer | None = None
    ) -> list[Lease]:
        if ch.needs_page():
            ch.loading = asyncio.ensure_future(self._load_page(ch))
            ch.loading.add_done_callback(_log_failure)
        if not ch.ready and ch.loading is not None:
            loading = ch.loading
            # Not shield(): a load cancelled because the channel left memory (a delete, the
            # node stopping) must not reach this caller as its own cancellation.
            await asyncio.wait({loading})
            if loading.cancelled() or self.channels.get(ch.name) is not ch:
                return []
            loading.result()  # the load's store failure is this dequeue's
        now = self.clock.now_ms()
        epoch = ch.epoch
        messages = ch.pop_ready(n)
        if not messages:
            return []
        messages = await self._drop_dead(ch, epoch, messages, now)
        if not messages or ch.epoch != epoch:
            return []  # (purged meanwhile: leasing them would hold what the store dropped)
        deadline = now + visibility_ms
        leases = ch.lease(messages, deadline)
        events = None
        if ch.config.trace:
            who = consumer() if consumer is not None else "unknown"
            events = trace.delivered(now, leases, who, deadline)
        # Once leased in memory, the write must finish even if the caller leaves.
        write = self._background(
            self.store.lease(ch.name, [(m.id, m.attempt) for m in messages], deadline, events)
        )
        try:
            await asyncio.shield(write)
        except asyncio.CancelledError:
            # The consumer left while its lease was being written: no one holds these
            # receipts, so once the write is done they go back, attempt and all.
            self._background(self._abandoned(ch, epoch, leases, write)).add_done_callback(
                _log_failure
            )
            raise
        except BaseException:
            if ch.epoch == epoch:
                ch.unlease(leases)
                ch.wake()
            raise
        if ch.epoch != epoch:
            return []  # purged while the lease was written: nothing left to deliver
        ch.dequeued += len(leases)
        ch.redelivered += sum(1 for lease in leases if lease.attempt > 1)
        self._timer(ch, deadline)
        if self.journal is not None:
            self.journal.leased(ch, leases, deadline)
        return leases

    async def _abandoned(
        self, ch: ChannelState, epoch: int, leases: list[Lease], write: asyncio.Future[None]
    ) -> None:
        try:
            await write
        except BaseException:
            if ch.epoch == epoch:
                ch.unlease(leases)
                ch.wake()
            raise
        await self._give_back(ch, epoch, leases)

    async def give_back(self, name: str, leases: list[Lease]) -> None:
        """Leases that never reached their consumer (it hung up): ready again at once, with
        the attempt they spent given back too, since no one saw the delivery."""
        ch = self.channels.get(name)
        if ch is None or not leases:
            return
        ch.dequeued -= len(leases)
        ch.redelivered -= sum(1 for lease in leases if lease.attempt > 1)
        await self._give_back(ch, ch.epoch, leases)

    async def _give_back(self, ch: ChannelState, epoch: int, leases: list[Lease]) -> None:
        held = ch.take_back(leases)
        if not held:
            return  # ended meanwhile (expired): the normal path had it

        def finish() -> None:
            ch.unlease(held)
            ch.wake(len(held))
            if self.journal is not None:
                back = [lease.message for lease in held]
                self.journal.released(ch, [m.id for m in back], back)

        # A lease whose deadline has passed is ready: writing one with the previous attempt
        # and deadline 0 is, in the store's own terms, the delivery that never happened.
        pairs = [(lease.message.id, lease.attempt - 1) for lease in held]
        await self._complete(
            ch,
            epoch,
            [lease.message.id for lease in held],
            lambda: self.store.lease(ch.name, pairs, 0),
            lambda: ch.restore(held),
            finish,
        )

    async def _drop_dead(
        self, ch: ChannelState, epoch: int, messages: list[Message], now: int
    ) -> list[Message]:
        """Dead-letter what may not be delivered any more (TTL run out, attempts used up)."""
        expired, spent, fine = _sort_out(messages, now, ch.config.max_attempts)
        if not expired and not spent:
            return fine
        steps = [(expired, "ttl"), (spent, "max_attempts")]
        # Off the window but not leased yet: held as settling while the dead letters are
        # written (each group leaves it with its own step), so a TTL sweep cannot dead-letter
        # one of them too and a page read cannot make one ready again meanwhile.
        ch.settling.update(m.id for m in messages)
        for i, (group, why) in enumerate(steps):
            if not group:
                continue
            try:
                await self._dead_letter(
                    ch, epoch, group, why, functools.partial(ch.push_ready, group)
                )
            except BaseException:
                # Taken off the window for this delivery, which now fails (or was abandoned).
                if ch.epoch == epoch:
                    rest = fine + [m for later, _ in steps[i + 1 :] for m in later]
                    ch.settling.difference_update(m.id for m in rest)
                    ch.push_ready(rest)
                    ch.wake(len(rest))
                raise
        if ch.epoch == epoch:
            ch.settling.difference_update(m.id for m in fine)
        return fine

    # -- timers ----------------------------------------------------------------------------
    def _timer(self, ch: ChannelState, at: int) -> None:
        """The channel has work at `at`: arm its timer, and wake the maintenance loop when that
        comes before the loop's next wake."""
        if self.timers.arm(ch.name, at) and (self._next_wake is None or at < self._next_wake):
            self.timers_changed.set()

    def _arm(self, ch: ChannelState) -> None:
        """Arm the channel's timer for the earliest work its state shows (if any)."""
        times = [
            t for t in (ch.next_lease_deadline(), ch.next_due, ch.next_expiry) if t is not None
        ]
        if times:
            failing = self._failing.get(ch.name)
            # A failing channel's overdue work waits for its retry: no busy loop.
            self._timer(ch, min(times) if failing is None else max(min(times), failing.retry_at))

    def _note(self, name: str) -> None:
        if self.activity is not None:
            self.activity.add(name)

    def take_activity(self) -> set[str]:
        """The channels whose counts changed since the last call (recording starts with the
        first call: the caller reads everything once then)."""
        seen, self.activity = self.activity, set()
        return seen if seen is not None else set(self.channels)

    async def _load_page(self, ch: ChannelState) -> None:
        generation, epoch = ch.generation, ch.epoch
        ch.exhausted = False
        gone: set[int] = set()
        ch.gone = gone
        try:
            page = await self.store.page_ready(
                ch.name, ch.cursor, self.clock.now_ms(), ch.page_size
            )
        finally:
            ch.gone = None
            ch.loading = None
        if ch.epoch != epoch:
            return  # purged while the page was read: the page may hold what the purge took
        ch.add_page(page, gone, complete=len(page) < ch.page_size and ch.generation == generation)
        if ch.ready:
            ch.wake(len(ch.ready))

    # -- completions ------------------------------------------------------------------------
    async def _complete(
        self,
        ch: ChannelState,
        epoch: int,
        ids: list[int],
        write: Callable[[], Awaitable[object]],
        undo: Callable[[], None],
        finish: Callable[[], None],
    ) -> bool:
        """The engine's one rule, for every message leaving a lease or the channel.

        The messages (`ids`, already off the window and out of `leases`) are held out of reach
        as settling; the durable write runs to its end even if the caller is cancelled; then
        `finish` completes the change in memory, or on failure `undo` puts it back. Neither
        runs once the epoch moved (a purge or release came between): memory then no longer
        holds these messages, and putting them back would resurrect what the store dropped.
        Returns whether the change was finished in memory.
        """
        if ch.epoch != epoch:
            return False
        ch.settling.update(ids)

        def settle(_: object, error: BaseException | None) -> bool:
            if error is not None:
                if ch.epoch == epoch:
                    ch.settling.difference_update(ids)
                    undo()
                    self._arm(ch)  # leases put back may be due already: their timer fired
                return False
            if ch.epoch != epoch:
                return False
            ch.settling.difference_update(ids)
            finish()
            return True

        return await self._settled(write, settle)

    # -- ack, nack, extend ------------------------------------------------------------------
    def _claim(self, name: str, receipts: list[str]) -> tuple[ChannelState | None, Claim]:
        """Take the leases the receipts still hold out of reach; the rest are stale."""
        pairs = parse_receipts(receipts)
        ch = self.channels.get(name)
        now = self.clock.now_ms()
        if ch is None:
            self._owner_only(name)
            return None, Claim(now, [], list(receipts))
        held, stale = ch.claim(pairs, now)
        if stale:
            try:
                self._owner_only(name)
            except Fenced:
                ch.restore(held)
                raise
        return ch, Claim(now, held, [receipts[i] for i in stale])

    def _owner_only(self, name: str) -> None:
        """Only the channel's owner may say what it does not hold (a receipt stale, which the
        consumer acts on by dropping its ack; the channel absent). A request the router let in
        while this node served the channel can reach the engine after a hand-off or a lost lease
        let the channel go (its body was read meanwhile): the state is at the new owner now, so
        the answer is Fenced (503, retried there). Asked only on those answers, off the hot
        path."""
        if self.ownership is not None and not self.ownership.serves(name):
            raise Fenced(
                f"this node does not serve channel {name!r} right now; retry: the request goes"
                " to its owner"
            )

    @_noted
    async def ack(self, name: str, receipts: list[str]) -> Outcome:
        ch, claim = self._claim(name, receipts)
        if ch is not None and claim.held:
            held = claim.held
            ids = [lease.message.id for lease in held]

            def finish() -> None:
                ch.forget(ids)
                ch.total -= len(ids)
                ch.acked += len(ids)
                ch.record_ack_latency(claim.now, held)
                if self.journal is not None:
                    self.journal.acked(ch, ids)

            await self._complete(
                ch,
                ch.epoch,
                ids,
                lambda: self.store.delete(name, ids),
                lambda: ch.restore(held),
                finish,
            )
        return Outcome(len(claim.held), claim.stale)

    @_noted
    async def nack(
        self, name: str, receipts: list[str], delay_ms: int, dead_letter: bool
    ) -> Outcome:
        ch, claim = self._claim(name, receipts)
        if ch is not None and claim.held:
            reason = "nack" if dead_letter else None
            await self._return(ch, claim.held, claim.now, delay_ms, reason, nacked=True)
            ch.nacked += len(claim.held)
        return Outcome(len(claim.held), claim.stale)

    @_noted
    async def extend(self, name: str, receipts: list[str], visibility_ms: int) -> Outcome:
        ch, claim = self._claim(name, receipts)
        if ch is not None and claim.held:
            held = claim.held
            ids = [lease.message.id for lease in held]
            deadline = claim.now + visibility_ms

            def finish() -> None:
                for lease in held:
                    lease.deadline = deadline
                ch.restore(held)
                self._timer(ch, deadline)
                if self.journal is not None:
                    self.journal.extended(ch, held, deadline)

            await self._complete(
                ch,
                ch.epoch,
                ids,
                lambda: self.store.extend(name, ids, deadline),
                lambda: ch.restore(held),
                finish,
            )
        return Outcome(len(claim.held), claim.stale)

    async def _return(
        self,
        ch: ChannelState,
        held: list[Lease],
        now: int,
        delay_ms: int,
        reason: str | None,
        *,
        nacked: bool,
    ) -> None:
        """Leases that ended without an ack (`nacked`, else expired): ready again, delayed, or
        dead-lettered."""
        epoch = ch.epoch
        leases = {lease.message.id: lease for lease in held}
        messages = [lease.message for lease in held]
        if reason is None:
            expired, spent, back = _sort_out(messages, now, ch.config.max_attempts)
        else:
            expired, spent, back = [], messages, []
        # Dead letters (with their reason), then the rest back ("": no dead-lettering).
        steps = [(expired, "ttl"), (spent, reason or "max_attempts"), (back, "")]
        # Every one is out of reach until its own step is done.
        ch.settling.update(leases)
        for i, (group, why) in enumerate(steps):
            if not group:
                continue
            mine = [leases[m.id] for m in group]
            try:
                if why:
                    after = "nacked" if nacked else "lease_expired"
                    await self._dead_letter(
                        ch, epoch, group, why, functools.partial(ch.restore, mine), after
                    )
                else:
                    events = None
                    if ch.config.trace:
                        events = trace.returned(now, mine, delay_ms if nacked else None)
                    at = now + delay_ms if delay_ms else 0
                    await self._release(ch, epoch, mine, at, events)
            except BaseException:
                if ch.epoch == epoch:  # the later steps never ran: those leases go back as well
                    ch.restore([leases[m.id] for later, _ in steps[i + 1 :] for m in later])
                raise

    async def _release(
        self,
        ch: ChannelState,
        epoch: int,
        held: list[Lease],
        at: int,
        events: list[Event] | None = None,
    ) -> None:
        back = [lease.message for lease in held]
        ids = [m.id for m in back]
        if at:
            # A promotion may find these due (and make them ready in the store) before this
            # write answers; it notes them here, and the finish makes them ready too.
            ch.delaying.update(dict.fromkeys(ids, False))

        def promoted() -> list[Message]:
            return [m for m in back if ch.delaying.pop(m.id, False)] if at else back

        def finish() -> None:
            for m in back:
                m.leased = False
            ready = promoted()
            if len(ready) < len(back):
                ch.delayed += len(back) - len(ready)
                self._set_due(ch, at)
            if ready:
                ch.push_ready(ready)
                ch.wake(len(ready))
            if self.journal is not None:
                self.journal.released(ch, ids, ready)

        def undo() -> None:
            promoted()  # forgotten: the restored leases end (and are released) again
            ch.restore(held)

        await self._complete(
            ch, epoch, ids, lambda: self.store.release(ch.name, ids, at, events), undo, finish
        )

    # -- moves between channels -------------------------------------------------------------
    async def _dead_letter(
        self,
        ch: ChannelState,
        epoch: int,
        messages: list[Message],
        reason: str,
        undo: Callable[[], None] | None = None,
        after: str | None = None,
    ) -> bool:
        """Move messages to the channel's dead-letter channel (or drop them), durably. `after`:
        the end of a lease that led here ("nacked", "lease_expired"), for a traced history.

        Returns whether memory was finished (False: a purge came between, nothing counted)."""

        def copy(m: Message, new_id: int, now: int) -> Message:
            return Message(
                id=new_id, body=m.body, headers=_dead_headers(m, ch.name, reason), enqueued_at=now
            )

        def counted(gone: int) -> None:
            ch.dead_lettered += gone
            log.info("dead-lettered %d message(s) from %s (%s)", gone, ch.name, reason)

        target = ch.config.dead_letter
        events = None
        if ch.config.trace and target is not None:
            events = trace.dead_lettered(self.clock.now_ms(), messages, reason, target, after)
        return await self._transfer(
            ch, epoch, messages, target, copy, counted, undo, dlq=True, events=events
        )

    async def _transfer(
        self,
        ch: ChannelState,
        epoch: int,
        messages: list[Message],
        target_name: str | None,
        copy: Copier,
        counted: Callable[[int], None],
        undo: Callable[[], None] | None = None,
        *,
        dlq: bool = False,
        events: Sequence[Event] | None = None,
    ) -> bool:
        """Move messages of `ch` to `target_name` (None: drop them) with one atomic store
        `move`, and finish memory on both sides: the one path of dead-lettering and redrive.

        The messages are taken out of reach at once (off the window and the leases; put back,
        and `undo` run, if the store fails). Copies are made by `copy(message, new id, now)`.
        A target on another shard is written under the source's fence with ids of the
        source's shard, and its owner poked; a local one (created if new: as a dead-letter
        channel when `dlq`) is counted and woken here. `counted(n)` adds the source's counters
        for the n messages the store actually took. `events` (a traced source's, one per
        message): the copies carry their history on with these. Returns whether memory was
        finished (False: a purge came between, nothing counted)."""
        ids = [m.id for m in messages]
        # Off the window too (those TTL expiry finds may sit there); back on it if this fails.
        was_ready = [m for m in messages if ch.ready.pop(m.id, None) is not None]
        for msg_id in ids:
            ch.leases.pop(msg_id, None)
        # What the store took: all of `ids` when dropped; the copies made when moved (a message
        # acked or purged meanwhile is not copied, and was counted out by its own path).
        taken = len(ids)
        # A dead-letter channel made for a traced channel traces too: its copies carry history.
        traced = dlq and ch.config.trace

        def copies(ids_from: str) -> list[Message]:
            now = self.clock.now_ms()
            first = self._ids(ids_from).take(len(messages))
            return [copy(m, first + i, now) for i, m in enumerate(messages)]

        async def move() -> None:
            nonlocal taken
            if target_name is None:
                await self.store.move(ch.name, ids, None, [])
                return
            own = self.ownership
            if own is not None and not own.serves(target_name):
                # The target lives on another shard: one atomic move in the store, under the
                # source's fence, with ids of the source's shard (unique across primaries);
                # then its owner is told (a lost poke only delays: its audit re-reads).
                target_config = self.default_config(
                    target_name, dead_letter_target=dlq, trace=traced
                )
                copied = await self.store.move(
                    ch.name, ids, target_name, copies(ch.name), target_config, events
                )
                taken = len(copied)
                if copied:
                    own.poke(target_name)
                return
            target = await self.ensure(target_name, dead_letter_target=dlq, trace=traced)
            if ch.epoch != epoch:
                return  # purged meanwhile: no copies of what the purge took
            moved = copies(target_name)
            target.begin_write()
            try:
                # Only what the source still held is copied (a purge may have come first).
                copied = await self.store.move(ch.name, ids, target_name, moved, None, events)
            finally:
                target.end_write()
            taken = len(copied)
            if self.channels.get(target_name) is target:
                self._stored(target, copied)

        def put_back() -> None:
            ch.push_ready(was_ready)
            if undo is not None:
                undo()

        def finish() -> None:
            ch.forget(ids)
            ch.total = max(0, ch.total - taken)
            counted(taken)
            if self.journal is not None:
                self.journal.dead_lettered(ch, ids, target_name)

        return await self._complete(ch, epoch, ids, move, put_back, finish)

    async def move_ready(
        self, ch: ChannelState, messages: list[Message], target: str, copy: Copier
    ) -> int:
        """Move those of `messages` (read from the store as ready) that are ready in memory too
        to `target`, in one atomic store move; return how many moved. Ones memory holds in
        flight (leased, even past its deadline, or being settled) or delayed (due but not
        promoted yet) are left: their own path ends them. Judged and taken out of reach in one
        step, with no await between, so no consumer can lease one meanwhile."""
        if self.channels.get(ch.name) is not ch:
            return 0  # left memory (deleted, handed off) since it was looked up
        busy = ch.leases.keys() | ch.settling
        ready = [m for m in messages if m.id not in busy and (m.leased or not m.available_at)]
        if not ready:
            return 0
        moved = 0

        def counted(gone: int) -> None:
            nonlocal moved
            moved = gone

        events = None
        if ch.config.trace:
            events = trace.redriven(self.clock.now_ms(), ch.name, target, len(ready))
        await self._transfer(ch, ch.epoch, ready, target, copy, counted, events=events)
        return moved

    # -- maintenance ------------------------------------------------------------------------
    async def tick(self, now: int) -> int | None:
        """Do what fell due by `now`: expire leases, release delays, expire TTLs, prune dedup.

        Visits only the channels whose timer fell due (and re-checks a few timers, _AUDIT_ROUND),
        so a pass costs nothing per idle channel. Returns when something next falls due (None:
        nothing scheduled).
        """
        self.timers_changed.clear()
        due = self.timers.pop_due(now)
        failed: list[tuple[str, Exception]] = []
        for i, name in enumerate(due):
            ch = self.channels.get(name)
            if ch is None:
                continue
            waiting = self._failing.get(name)
            if waiting is not None and waiting.retry_at > now:
                self._retry_at(name, waiting.retry_at)  # woken early (new work): not yet
                continue
            try:
                await self._tick_channel(ch, now)
            except Exception as exc:  # one channel's failure must not stop the others' upkeep
                failed.append((name, exc))
                continue
            except BaseException:
                # Cancelled mid-pass: the channels it did not reach stay due.
                for rest in due[i:]:
                    self.timers.arm(rest, now)
                raise
            self._failing.pop(name, None)
            self._arm(ch)  # from what its state shows now
        self._audit_some()
        if now >= self._next_prune and self._due_retry(_PRUNING, now):
            try:
                pruned = await self.store.prune_dedup(
                    now - self.limits.dedup_window_ms, _PRUNE_LIMIT
                )
            except Exception as exc:
                failed.append((_PRUNING, exc))
            else:
                self._failing.pop(_PRUNING, None)
                # A full batch means more to go: again shortly, in passes that never hold the
                # writer for long, until the backlog is gone.
                more = pruned == _PRUNE_LIMIT
                self._next_prune = now + (_PRUNE_AGAIN_MS if more else _PRUNE_EVERY_MS)
        self._record_failures(failed, now)
        prune_at = self._next_prune
        pruning = self._failing.get(_PRUNING)
        if pruning is not None:
            prune_at = max(prune_at, pruning.retry_at)
        timer = self.timers.next()
        self._next_wake = prune_at if timer is None else min(timer, prune_at)
        return self._next_wake

    async def _tick_channel(self, ch: ChannelState, now: int) -> None:
        """One channel's due work: expired leases back, delayed messages in, TTLs out."""
        try:
            expired = ch.expired_leases(now)
            if expired:
                await self._return(ch, expired, now, 0, reason=None, nacked=False)
            if ch.next_due is not None and ch.next_due <= now:
                await self._promote(ch, now)
            if ch.next_expiry is not None and ch.next_expiry <= now:
                await self._expire(ch, now)
        finally:
            self._note(ch.name)

    def _retry_at(self, name: str, at: int) -> None:
        """A failing channel waits for its retry: its overdue work must not wake the loop."""
        self.timers.disarm(name)
        self.timers.arm(name, at)

    def _audit_some(self) -> None:
        """Re-arm a few channels in turn from their state: a timer missed anywhere is found
        within one round over all channels."""
        if not self._audit:
            self._audit = list(self.channels)
        per_pass = max(_AUDIT_MIN, len(self.channels) // _AUDIT_ROUND)
        for _ in range(min(per_pass, len(self._audit))):
            ch = self.channels.get(self._audit.pop())
            if ch is not None:
                self._arm(ch)

    def _due_retry(self, name: str, now: int) -> bool:
        failing = self._failing.get(name)
        return failing is None or failing.retry_at <= now

    def _record_failures(self, failed: list[tuple[str, Exception]], now: int) -> None:
        """Back off each failed channel; log the pass's failures in one line (the first
        unexpected one with its traceback), not one per channel: a lost store fails them all."""
        for name in [n for n in self._failing if n != _PRUNING and n not in self.channels]:
            del self._failing[name]  # deleted since it failed
        if not failed:
            return
        for name, exc in failed:
            detail = exc.detail if isinstance(exc, LionMQError) else f"{type(exc).__name__}: {exc}"
            before = self._failing.get(name)
            failures = before.failures + 1 if before else 1
            wait = min(_RETRY_MAX_MS, _RETRY_FIRST_MS << min(failures - 1, 20))
            self._failing[name] = Failing(failures, now + wait, detail)
            if name != _PRUNING:
                self._retry_at(name, now + wait)
        name, exc = failed[0]
        unexpected = next((e for _, e in failed if not isinstance(e, LionMQError)), None)
        log.log(
            logging.ERROR if unexpected else logging.WARNING,
            "maintenance failed for %d of %d channel(s), retrying each with backoff; %s: %s",
            len(failed),
            len(self.channels),
            name,
            self._failing[name].detail,
            exc_info=unexpected,
        )

    def failing(self) -> dict[str, str]:
        """Channels (and the dedup pruning) whose maintenance is failing, with why."""
        return {name: f.detail for name, f in self._failing.items()}

    async def _promote(self, ch: ChannelState, now: int) -> None:
        epoch = ch.epoch
        due = await self.store.promote_due(ch.name, now, _SWEEP_LIMIT)
        if ch.epoch != epoch:
            return  # purged meanwhile: what was promoted is gone
        # Delayed releases still being written are not counted delayed yet: their finish
        # makes them ready (the store will never promote them again).
        early = [m.id for m in due if m.id in ch.delaying]
        for msg_id in early:
            ch.delaying[msg_id] = True
        ch.delayed = max(0, ch.delayed - (len(due) - len(early)))
        if due:
            ch.add_promoted(due)
            ch.wake(len(due))
            if self.journal is not None:
                self.journal.promoted(ch, due)
        # A full batch means more may be due right now.
        ch.next_due = now if len(due) == _SWEEP_LIMIT else await self.store.next_due(ch.name)

    async def _expire(self, ch: ChannelState, now: int) -> None:
        epoch = ch.epoch
        found = await self.store.expired(ch.name, now, _SWEEP_LIMIT)
        dead = [m for m in found if m.id not in ch.leases and m.id not in ch.settling]
        if dead:
            delayed = sum(1 for m in dead if not m.leased and m.available_at > now)
            if await self._dead_letter(ch, epoch, dead, "ttl"):
                ch.delayed = max(0, ch.delayed - delayed)
        more = len(found) == _SWEEP_LIMIT
        ch.next_expiry = now if more else await self.store.next_expiry(ch.name, now)


def _sort_out(
    messages: list[Message], now: int, max_attempts: int
) -> tuple[list[Message], list[Message], list[Message]]:
    """Split messages into (TTL run out, attempts used up, still deliverable)."""
    expired: list[Message] = []
    spent: list[Message] = []
    fine: list[Message] = []
    for m in messages:
        if m.expires_at is not None and m.expires_at <= now:
            expired.append(m)
        elif m.attempt >= max_attempts:
            spent.append(m)
        else:
            fine.append(m)
    return expired, spent, fine


def _log_failure(task: asyncio.Future[Any]) -> None:
    """For tasks no caller awaits any more: their failure still gets a line in the log."""
    if not task.cancelled() and task.exception() is not None:
        log.warning("a store call no request waits for failed: %r", task.exception())


def _wake_all(waiters: Iterable[asyncio.Future[None]]) -> None:
    for waiter in waiters:
        if not waiter.done():
            waiter.set_result(None)


def _dead_headers(m: Message, channel: str, reason: str) -> bytes:
    headers = _header_decoder.decode(m.headers) if m.headers else {}
    headers[DEAD_LETTER_CHANNEL_HEADER] = channel
    headers["x-dead-letter-reason"] = reason
    headers["x-dead-letter-attempts"] = str(m.attempt)
    headers["x-dead-letter-message-id"] = str(m.id)
    return _header_encoder.encode(headers)
