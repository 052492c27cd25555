"""The owner's side of mirroring: what changed in each shard it owns, as numbered deltas.

The engine calls the `Journal` (its `journal` attribute, None when no shard this node owns has
a backup) once per settled batch, after memory settled: no call at all, and no per-message work,
when there is no journal. Each delta carries message ids and attempts, never bodies (the store
holds those), plus the channel's counts after the change, so a backup's counts cannot drift.

Each owned shard has a `ShardLog`: deltas numbered 1, 2, ... within the shard's epoch (a new
epoch starts a new log from 0), bounded: a backup that fell further behind than the bound is
resynced by snapshot instead (`snapshot`, built from the engine's memory at the log's seq).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import islice

import msgspec

from app.engine.channel import ChannelState
from app.models import ChannelConfig, Lease, Message

# Deltas a shard's log keeps for a backup that lags (one batch each); past it, a snapshot.
JOURNAL_BOUND = 10_000
# Deltas one heartbeat carries at most: a backup far behind catches up over a few beats.
BEAT_LIMIT = 2_000
# Ready ids a channel image carries: the head of its ready window, what a consumer gets first.
HEAD_LIMIT = 1000


# -- the wire ------------------------------------------------------------------------------
# Array-like structs tagged by one letter: a delta is a short JSON array, cheap to encode.
class Settings(msgspec.Struct, array_like=True, tag="c"):
    channel: str
    visibility_ms: int
    max_attempts: int
    dead_letter: str | None
    max_length: int | None
    ttl_ms: int | None
    total: int
    delayed: int
    # Last, with a default: a node of an older version sends the array without it, and drops
    # it from the end of ours.
    trace: bool = False


class Enqueued(msgspec.Struct, array_like=True, tag="e"):
    channel: str
    ready: list[int]
    total: int
    delayed: int


class Leased(msgspec.Struct, array_like=True, tag="l"):
    channel: str
    ids: list[int]
    attempts: list[int]
    deadline: int

    def __post_init__(self) -> None:
        _paired(self.ids, self.attempts)


class Acked(msgspec.Struct, array_like=True, tag="a"):
    channel: str
    ids: list[int]
    total: int
    delayed: int


class Released(msgspec.Struct, array_like=True, tag="b"):
    """Leases that ended without an ack (nack, requeue, expiry, given back): `ready` are ready
    again, the other ids delayed."""

    channel: str
    ids: list[int]
    ready: list[int]
    total: int
    delayed: int


class Extended(msgspec.Struct, array_like=True, tag="x"):
    """Leases given a new deadline (whole, with their attempts: a snapshot taken while the
    extend was being written did not hold them)."""

    channel: str
    ids: list[int]
    attempts: list[int]
    deadline: int

    def __post_init__(self) -> None:
        _paired(self.ids, self.attempts)


def _paired(ids: list[int], attempts: list[int]) -> None:
    """One attempt per id: a heartbeat that pairs them otherwise is malformed, refused whole
    when decoded (applying it would stop half-way through a mirror's channel)."""
    if len(ids) != len(attempts):
        raise ValueError(f"{len(ids)} ids with {len(attempts)} attempts")


class DeadLettered(msgspec.Struct, array_like=True, tag="d"):
    channel: str
    ids: list[int]
    target: str | None
    total: int
    delayed: int


class Promoted(msgspec.Struct, array_like=True, tag="p"):
    channel: str
    ids: list[int]
    total: int
    delayed: int


class Purged(msgspec.Struct, array_like=True, tag="u"):
    channel: str
    total: int


class LeaseImage(msgspec.Struct, array_like=True):
    id: int
    attempt: int
    deadline: int


class ChannelImage(msgspec.Struct):
    name: str
    config: Settings
    leases: list[LeaseImage]
    ready: list[int]


class Adopted(msgspec.Struct, array_like=True, tag="i"):
    """The channel entered the owner's memory (created, or adopted from the store): whole."""

    image: ChannelImage


class Dropped(msgspec.Struct, array_like=True, tag="r"):
    """The channel left the owner's memory (deleted, or handed off)."""

    channel: str


Delta = (
    Adopted
    | Settings
    | Enqueued
    | Leased
    | Acked
    | Released
    | Extended
    | DeadLettered
    | Promoted
    | Purged
    | Dropped
)


class Heartbeat(msgspec.Struct, forbid_unknown_fields=True):
    """The deltas numbered base+1 .. seq of the shard at this epoch."""

    shard: str
    epoch: int
    owner_id: str
    owner_url: str
    base: int
    seq: int
    deltas: list[Delta]


class Answer(msgspec.Struct, omit_defaults=True):
    """The backup holds the shard up to `applied` (at the heartbeat's epoch), or wants a
    snapshot (it is fetching one)."""

    applied: int | None = None
    snapshot: bool = False


class Snapshot(msgspec.Struct):
    shard: str
    epoch: int
    seq: int
    owner_id: str
    channels: list[ChannelImage]


def settings_of(ch: ChannelState) -> Settings:
    c = ch.config
    return Settings(
        ch.name,
        c.visibility_ms,
        c.max_attempts,
        c.dead_letter,
        c.max_length,
        c.ttl_ms,
        ch.total,
        ch.delayed,
        c.trace,
    )


def config_of(s: Settings) -> ChannelConfig:
    return ChannelConfig(
        visibility_ms=s.visibility_ms,
        max_attempts=s.max_attempts,
        dead_letter=s.dead_letter,
        max_length=s.max_length,
        ttl_ms=s.ttl_ms,
        trace=s.trace,
    )


def image_of(ch: ChannelState) -> ChannelImage:
    """The channel as memory holds it now. Messages a completion holds out of reach while its
    write runs (an ack, a nack, an extend, a lease being written) are left to that
    completion's delta; should the write fail, they go back unannounced and the mirror lacks
    them until the next snapshot (the takeover's reconcile reports it; the store decides)."""
    leases = [LeaseImage(i, lease.attempt, lease.deadline) for i, lease in ch.leases.items()]
    return ChannelImage(ch.name, settings_of(ch), leases, sorted(ch.ready)[:HEAD_LIMIT])


# -- the logs ------------------------------------------------------------------------------
@dataclass(slots=True)
class ShardLog:
    shard: str
    epoch: int
    bound: int = JOURNAL_BOUND
    seq: int = 0
    deltas: deque[Delta] = field(default_factory=deque)

    def append(self, delta: Delta) -> None:
        if len(self.deltas) >= self.bound:
            self.deltas.popleft()
        self.deltas.append(delta)
        self.seq += 1

    def since(self, base: int, limit: int = BEAT_LIMIT) -> list[Delta] | None:
        """Up to `limit` deltas after `base`, or None when the log no longer holds them all."""
        if base > self.seq:
            return None
        held = len(self.deltas)
        missing = self.seq - base
        if missing > held:
            return None
        first = held - missing
        return list(islice(self.deltas, first, min(held, first + limit)))

    def trim(self, upto: int) -> None:
        """Forget the deltas every backup holds (seq <= upto): the log stays about one beat
        long while the backups keep up, and reaches the bound only for one that lags."""
        drop = min(len(self.deltas), upto - (self.seq - len(self.deltas)))
        for _ in range(drop):
            self.deltas.popleft()


class Journal:
    """Every owned shard's log; the engine's hook. `shard_of(channel)` is the placement (the
    runtime's), asked once per channel in memory: a channel is journaled under the shard it had
    when it entered memory until it leaves (`dropped`), so a channel that moves to another
    shard after a new topology has its Dropped in its old shard's log, where its backups need
    it (the hand-off releases it before the new owner adopts it)."""

    def __init__(self, shard_of: Callable[[str], str], bound: int = JOURNAL_BOUND) -> None:
        self._shard_of = shard_of
        self.bound = bound
        self.logs: dict[str, ShardLog] = {}
        self._placed: dict[str, str] = {}

    # -- which shards are journaled (the heartbeat sender keeps this in step) --------------
    def open(self, shard: str, epoch: int) -> ShardLog:
        """The shard's log at `epoch`; a new epoch starts a new log (its backups resync)."""
        log = self.logs.get(shard)
        if log is None or log.epoch != epoch:
            log = self.logs[shard] = ShardLog(shard, epoch, self.bound)
        return log

    def close(self, shard: str) -> None:
        self.logs.pop(shard, None)

    def shard_of(self, channel: str) -> str:
        shard = self._placed.get(channel)
        if shard is None:
            shard = self._placed[channel] = self._shard_of(channel)
        return shard

    def _log(self, channel: str) -> ShardLog | None:
        return self.logs.get(self.shard_of(channel))

    def snapshot(self, shard: str, owner_id: str, channels: Mapping[str, ChannelState]) -> Snapshot:
        """The shard's channels as memory holds them, at the log's seq (built in one go, with
        no await: no delta can land between the image and the seq)."""
        log = self.logs[shard]
        images = [image_of(ch) for name, ch in channels.items() if self.shard_of(name) == shard]
        return Snapshot(shard, log.epoch, log.seq, owner_id, images)

    # -- the engine's hook: one call per settled batch --------------------------------------
    def adopted(self, ch: ChannelState) -> None:
        log = self._log(ch.name)
        if log is not None:
            log.append(Adopted(image_of(ch)))

    def settings(self, ch: ChannelState) -> None:
        log = self._log(ch.name)
        if log is not None:
            log.append(settings_of(ch))

    def enqueued(self, ch: ChannelState, new: Sequence[Message]) -> None:
        log = self._log(ch.name)
        if log is not None:
            ready = [m.id for m in new if not m.available_at]
            log.append(Enqueued(ch.name, ready, ch.total, ch.delayed))

    def leased(self, ch: ChannelState, leases: Sequence[Lease], deadline: int) -> None:
        log = self._log(ch.name)
        if log is not None:
            ids = [lease.message.id for lease in leases]
            attempts = [lease.attempt for lease in leases]
            log.append(Leased(ch.name, ids, attempts, deadline))

    def acked(self, ch: ChannelState, ids: list[int]) -> None:
        log = self._log(ch.name)
        if log is not None:
            log.append(Acked(ch.name, ids, ch.total, ch.delayed))

    def released(self, ch: ChannelState, ids: list[int], ready: Iterable[Message]) -> None:
        log = self._log(ch.name)
        if log is not None:
            log.append(Released(ch.name, ids, [m.id for m in ready], ch.total, ch.delayed))

    def extended(self, ch: ChannelState, leases: Sequence[Lease], deadline: int) -> None:
        log = self._log(ch.name)
        if log is not None:
            ids = [lease.message.id for lease in leases]
            attempts = [lease.attempt for lease in leases]
            log.append(Extended(ch.name, ids, attempts, deadline))

    def dead_lettered(self, ch: ChannelState, ids: list[int], target: str | None) -> None:
        """Messages moved out of the channel to `target` (None: dropped): dead-lettered or
        redriven."""
        log = self._log(ch.name)
        if log is not None:
            log.append(DeadLettered(ch.name, ids, target, ch.total, ch.delayed))

    def promoted(self, ch: ChannelState, due: Sequence[Message]) -> None:
        log = self._log(ch.name)
        if log is not None:
            log.append(Promoted(ch.name, [m.id for m in due], ch.total, ch.delayed))

    def purged(self, ch: ChannelState) -> None:
        log = self._log(ch.name)
        if log is not None:
            log.append(Purged(ch.name, ch.total))

    def dropped(self, name: str) -> None:
        log = self._log(name)
        self._placed.pop(name, None)
        if log is not None:
            log.append(Dropped(name))


__all__ = [
    "BEAT_LIMIT",
    "HEAD_LIMIT",
    "JOURNAL_BOUND",
    "Acked",
    "Adopted",
    "Answer",
    "ChannelImage",
    "DeadLettered",
    "Delta",
    "Dropped",
    "Enqueued",
    "Extended",
    "Heartbeat",
    "Journal",
    "LeaseImage",
    "Leased",
    "Promoted",
    "Purged",
    "Released",
    "Settings",
    "ShardLog",
    "Snapshot",
    "config_of",
    "image_of",
]
