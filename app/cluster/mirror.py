"""The backup's side of mirroring: a warm copy of each shard it backs up, fed by heartbeats.

Per shard: each channel's settings and counts, its in-flight leases (id, attempt, deadline) and
the head of its ready window. `Mirror` is sans-I/O (tested with a fake clock); `Follower` adds
the one I/O it needs, fetching a snapshot from the owner when the deltas cannot be applied.

A heartbeat carries the deltas numbered base+1 .. seq at the owner's epoch. The backup applies
those past what it holds and answers `{"applied": seq}`; if it holds less than `base` it answers
with what it holds (`{"applied": held}`), and the owner sends from there next beat (or, if its
journal no longer reaches that far, sends `base = -1`). A heartbeat of a new epoch, `base = -1`,
or deltas the mirror cannot apply make it answer `{"snapshot": true}` and fetch one. A heartbeat
of an epoch lower than the highest this node has seen for the shard is refused (`Fenced`): a
deposed owner neither feeds the mirror nor counts as alive.

The mirror is a speed-up, never the truth: on takeover the new owner adopts the shard's
channels from the store and `reconcile` reports how far the mirror was from it.
"""

from __future__ import annotations

import asyncio
import bisect
import functools
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import httpx
import msgspec

from app.cluster.journal import (
    HEAD_LIMIT,
    Acked,
    Adopted,
    Answer,
    ChannelImage,
    DeadLettered,
    Delta,
    Dropped,
    Enqueued,
    Extended,
    Heartbeat,
    Leased,
    Promoted,
    Purged,
    Released,
    Settings,
    Snapshot,
    config_of,
)
from app.cluster.liveness import Liveness
from app.engine.channel import ChannelState
from app.errors import Fenced, MalformedRequest
from app.models import ChannelConfig
from app.settings import CLUSTER_SECRET_HEADER

log = logging.getLogger("lionmq.mirror")

SECRET_HEADER = CLUSTER_SECRET_HEADER  # defined once, with the setting


def snapshot_path(shard: str) -> str:
    return f"/cluster/internal/shards/{shard}/snapshot"


@dataclass(slots=True)
class ChannelMirror:
    settings: Settings  # as last received (its counts are those of that moment)
    total: int
    delayed: int
    leases: dict[int, tuple[int, int]] = field(default_factory=dict)  # id -> (attempt, deadline)
    head: list[int] = field(default_factory=list)  # lowest ready ids, sorted, <= HEAD_LIMIT

    def counts(self, total: int, delayed: int) -> None:
        self.total, self.delayed = total, delayed

    def add_ready(self, ids: Iterable[int]) -> None:
        head = self.head
        for msg_id in ids:
            if len(head) >= HEAD_LIMIT and msg_id > head[-1]:
                continue  # past the head: the store has it
            i = bisect.bisect_left(head, msg_id)
            if i == len(head) or head[i] != msg_id:
                head.insert(i, msg_id)
        del head[HEAD_LIMIT:]

    def remove(self, ids: Iterable[int]) -> None:
        head = self.head
        for msg_id in ids:
            self.leases.pop(msg_id, None)
            i = bisect.bisect_left(head, msg_id)
            if i < len(head) and head[i] == msg_id:
                del head[i]

    @classmethod
    def of(cls, image: ChannelImage) -> ChannelMirror:
        leases = {lease.id: (lease.attempt, lease.deadline) for lease in image.leases}
        s = image.config
        return cls(s, s.total, s.delayed, leases, sorted(image.ready)[:HEAD_LIMIT])


@dataclass(slots=True)
class ShardMirror:
    shard: str
    epoch: int
    seq: int
    owner_id: str
    owner_url: str
    channels: dict[str, ChannelMirror] = field(default_factory=dict)

    def apply(self, delta: Delta) -> bool:
        """Apply one delta; False when it names a channel the mirror never heard of (the
        mirror missed something: resync)."""
        if isinstance(delta, Settings):
            ch = self.channels.get(delta.channel)
            if ch is None:
                self.channels[delta.channel] = ChannelMirror(delta, delta.total, delta.delayed)
            else:
                ch.settings = delta
                ch.counts(delta.total, delta.delayed)
            return True
        if isinstance(delta, Adopted):
            self.channels[delta.image.name] = ChannelMirror.of(delta.image)
            return True
        if isinstance(delta, Dropped):
            self.channels.pop(delta.channel, None)
            return True
        ch = self.channels.get(delta.channel)
        if ch is None:
            return False
        if isinstance(delta, Enqueued):
            ch.counts(delta.total, delta.delayed)
            ch.add_ready(delta.ready)
        elif isinstance(delta, Acked | DeadLettered):
            ch.remove(delta.ids)
            ch.counts(delta.total, delta.delayed)
        elif isinstance(delta, Released):
            ch.remove(delta.ids)
            ch.add_ready(delta.ready)
            ch.counts(delta.total, delta.delayed)
        elif isinstance(delta, Leased | Extended):
            ch.remove(delta.ids)
            for msg_id, attempt in zip(delta.ids, delta.attempts, strict=True):
                ch.leases[msg_id] = (attempt, delta.deadline)
        elif isinstance(delta, Promoted):
            ch.add_ready(delta.ids)
            ch.counts(delta.total, delta.delayed)
        elif isinstance(delta, Purged):
            ch.leases.clear()
            ch.head.clear()
            ch.counts(delta.total, 0)
        return True


@dataclass(frozen=True, slots=True)
class MirrorLag:
    """A mirrored shard as this backup sees it (GET /cluster, /metrics)."""

    epoch: int
    seq: int
    owner_id: str
    heartbeat_age_ms: int | None
    channels: int


@dataclass(frozen=True, slots=True)
class Reconciliation:
    """How far the mirror was from the store when this node took the shard over."""

    shard: str
    channels_missing: int  # in the store, not in the mirror
    channels_extra: int  # in the mirror, not in the store
    settings: int  # channels whose settings or counts differ
    leases: int  # leases missing, extra, or with another attempt or deadline

    @property
    def differences(self) -> int:
        return self.channels_missing + self.channels_extra + self.settings + self.leases


class Mirror:
    """Every shard this node backs up. Sans-I/O: the caller passes the monotonic time."""

    def __init__(self, liveness: Liveness) -> None:
        self.liveness = liveness
        self.shards: dict[str, ShardMirror] = {}
        self._highest: dict[str, int] = {}
        self._last_beat: dict[str, int] = {}
        # Shards whose mirror asked for a snapshot: the next one replaces it, whatever its seq
        # (an owner whose journal restarted at the same epoch numbers from 0 again).
        self._resync: set[str] = set()
        # Counters for /metrics.
        self.snapshots_installed = 0
        self.refused = 0
        self.reconcile_differences = 0

    def note_epoch(self, shard: str, epoch: int) -> None:
        """An epoch of the shard seen elsewhere (say, this node took the shard at it): from
        now on heartbeats of a lower epoch are refused."""
        if epoch > self._highest.get(shard, -1):
            self._highest[shard] = epoch

    def receive(self, hb: Heartbeat, now_mono: int) -> Answer:
        highest = self._highest.get(hb.shard, -1)
        if hb.epoch < highest:
            self.refused += 1
            raise Fenced(
                f"shard {hb.shard} is at epoch {highest} or later; a heartbeat of epoch"
                f" {hb.epoch} comes from a deposed owner"
            )
        self._highest[hb.shard] = hb.epoch
        self.liveness.beat(hb.shard, now_mono)
        self._last_beat[hb.shard] = now_mono
        m = self.shards.get(hb.shard)
        if m is None or m.epoch != hb.epoch or hb.base < 0 or m.seq > hb.seq:
            self._resync.add(hb.shard)
            return Answer(snapshot=True)
        m.owner_id, m.owner_url = hb.owner_id, hb.owner_url
        if m.seq < hb.base:
            return Answer(applied=m.seq)  # the owner sends from there next beat
        skip = m.seq - hb.base
        if len(hb.deltas) != hb.seq - hb.base:
            raise MalformedRequest(
                f"heartbeat for {hb.shard} numbers {hb.seq - hb.base} deltas, carries"
                f" {len(hb.deltas)}"
            )
        for delta in hb.deltas[skip:]:
            if not m.apply(delta):
                log.warning("mirror of %s missed a channel's start: resyncing", hb.shard)
                del self.shards[hb.shard]
                self._resync.add(hb.shard)
                return Answer(snapshot=True)
            m.seq += 1
        return Answer(applied=m.seq)

    def install(self, snap: Snapshot, owner_url: str) -> bool:
        """Take a snapshot in place of the shard's mirror, unless a later epoch was seen (or,
        unasked, the mirror already holds this epoch as far as the snapshot)."""
        if snap.epoch < self._highest.get(snap.shard, -1):
            return False
        m = self.shards.get(snap.shard)
        asked = snap.shard in self._resync
        if not asked and m is not None and m.epoch == snap.epoch and m.seq >= snap.seq:
            return False
        self._resync.discard(snap.shard)
        self._highest[snap.shard] = snap.epoch
        channels = {image.name: ChannelMirror.of(image) for image in snap.channels}
        self.shards[snap.shard] = ShardMirror(
            snap.shard, snap.epoch, snap.seq, snap.owner_id, owner_url, channels
        )
        self.snapshots_installed += 1
        return True

    def forget(self, shard: str) -> None:
        """No longer a backup of the shard (or now its owner)."""
        self.shards.pop(shard, None)
        self._last_beat.pop(shard, None)
        self._resync.discard(shard)

    def channels_of(self, shard: str) -> dict[str, ChannelConfig]:
        """The shard's channels as the mirror knows them (a hint; the store decides)."""
        m = self.shards.get(shard)
        if m is None:
            return {}
        return {name: config_of(ch.settings) for name, ch in m.channels.items()}

    def lag(self, now_mono: int) -> dict[str, MirrorLag]:
        out = {}
        for shard, m in self.shards.items():
            beat = self._last_beat.get(shard)
            age = None if beat is None else max(0, now_mono - beat)
            out[shard] = MirrorLag(m.epoch, m.seq, m.owner_id, age, len(m.channels))
        return out

    def reconcile(self, shard: str, adopted: Mapping[str, ChannelState]) -> Reconciliation:
        """Compare the shard's mirror with the channels the new owner just adopted from the
        store (`adopted`: the engine's channels of this shard), log and count what differed,
        and drop the mirror: the store's state is what is served."""
        m = self.shards.pop(shard, None)
        mirrored = m.channels if m is not None else {}
        missing = sum(1 for name in adopted if name not in mirrored)
        extra = sum(1 for name in mirrored if name not in adopted)
        settings = leases = 0
        for name, ch in adopted.items():
            mc = mirrored.get(name)
            if mc is None:
                continue
            c = ch.config
            s = mc.settings
            if c != config_of(s) or (ch.total, ch.delayed) != (mc.total, mc.delayed):
                settings += 1
            stored = {i: (lease.attempt, lease.deadline) for i, lease in ch.leases.items()}
            leases += sum(1 for i, v in stored.items() if mc.leases.get(i) != v)
            leases += sum(1 for i in mc.leases if i not in stored)
        result = Reconciliation(shard, missing, extra, settings, leases)
        self.reconcile_differences += result.differences
        log.log(
            logging.WARNING if result.differences else logging.INFO,
            "took over %s: mirror (seq %s) vs store: %d channel(s) missing, %d extra, %d with"
            " other settings or counts, %d lease(s) differing; serving the store's state",
            shard,
            m.seq if m is not None else "none",
            missing,
            extra,
            settings,
            leases,
        )
        return result


_snapshot_decoder = msgspec.json.Decoder(Snapshot)


class Follower:
    """The backup's heartbeat endpoint behind the route: the mirror, and the snapshot fetches
    it asks for (one at a time per shard, tracked, stopped with the node)."""

    def __init__(
        self,
        mirror: Mirror,
        http: httpx.AsyncClient,
        secret: str,
        monotonic_ms: Callable[[], int],
        timeout_s: float = 5.0,
    ) -> None:
        self.mirror = mirror
        self._http = http
        self._secret = secret
        self._mono = monotonic_ms
        self._timeout = timeout_s
        self._fetching: dict[str, asyncio.Task[None]] = {}
        self.fetch_failures = 0

    def heartbeat(self, hb: Heartbeat) -> Answer:
        answer = self.mirror.receive(hb, self._mono())
        if answer.snapshot and hb.shard not in self._fetching:
            task = asyncio.create_task(self._fetch(hb.shard, hb.owner_url))
            self._fetching[hb.shard] = task
            task.add_done_callback(functools.partial(self._fetched, hb.shard))
        return answer

    def _fetched(self, shard: str, task: asyncio.Task[None]) -> None:
        self._fetching.pop(shard, None)
        if not task.cancelled() and task.exception() is not None:
            log.error("snapshot of %s failed", shard, exc_info=task.exception())

    async def _fetch(self, shard: str, owner_url: str) -> None:
        """One snapshot; a failure is logged and counted, and the next heartbeat asks again."""
        try:
            response = await self._http.get(
                owner_url.rstrip("/") + snapshot_path(shard),
                headers={SECRET_HEADER: self._secret},
                timeout=self._timeout,
            )
            response.raise_for_status()
            snap = _snapshot_decoder.decode(response.content)
        except (httpx.HTTPError, msgspec.DecodeError) as exc:
            self.fetch_failures += 1
            log.warning("snapshot of %s from %s failed: %s", shard, owner_url, exc)
            return
        if self.mirror.install(snap, owner_url):
            log.info("mirror of %s resynced by snapshot at epoch %d seq %d", *_at(snap))

    async def settle(self) -> None:
        """Wait for the snapshot fetches under way (each logs its own failure)."""
        await asyncio.gather(*list(self._fetching.values()))

    async def stop(self) -> None:
        tasks = list(self._fetching.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _at(snap: Snapshot) -> tuple[str, int, int]:
    return snap.shard, snap.epoch, snap.seq


__all__ = [
    "SECRET_HEADER",
    "ChannelMirror",
    "Follower",
    "Mirror",
    "MirrorLag",
    "Reconciliation",
    "ShardMirror",
    "snapshot_path",
]
