"""OwnershipKeeper: holds this node's shard leases and keeps the engine's channels in step.

Every tick (each HEARTBEAT_MS, or driven by a test with a fake monotonic clock) reads the leases
and the topology once each, decides per shard (app/cluster/decide.py) and acts:

* gain a shard (take at epoch E): an id generator in the shard's slot seeded above the store's
  highest id, and `engine.adopt` takes in every channel the store holds for it (in a task of
  its own, so that the ticks go on renewing through a long adoption); then the shard is served
  and the fence resolver answers (shard, E) for its channels;
* renew: the lease again, counted from before the call on the monotonic clock. Not renewed in
  time (LEASE_MS less the margin), the node stops serving the shard at once (route and fence
  ask the serving rule on every call) but keeps its memory: a later renewal at the same epoch
  proves no one else wrote meanwhile;
* lose a shard (taken over, or the lease gone): stop serving, then `engine.release` its
  channels (their writes are fenced out by then);
* a new topology version (set_nodes): channels whose shard changed are drained (no new request
  reaches them: `moving_out`, their writes under way finish) and released, the node reports
  "applied version n" in its member report; a new owner adopts a moved-in channel only once
  every source shard's owner reported applied >= n or lost its lease (`moving_in` until then).

Member reports (presence, for GET /cluster) never decide ownership; only the store's leases do.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import msgspec
from lionmq.placement import shard_for
from lionmq.topology import IMPLICIT_SHARD, IMPLICIT_SLOT, Topology, decode_topology

from app.clock import Clock
from app.cluster.decide import Action, Held, ShardSeat, decide, live, serving
from app.cluster.liveness import Liveness
from app.engine.ids import IdGenerator
from app.engine.queue import QueueEngine
from app.errors import LionMQError
from app.store.base import ShardLease, Store

log = logging.getLogger("lionmq.cluster")

# A channel audit (adopt what a lost poke left out) every this many ticks (30 s by default):
# it reads every channel's settings, which costs a node with 100,000 channels ~0.3 s.
_AUDIT_EVERY = 60


class MemberDoc(msgspec.Struct):
    """What a node reports of itself in the store (display only, never ownership)."""

    id: str
    url: str
    role: str
    shards: dict[str, int]  # shard -> epoch served
    applied_version: int
    lag: dict[str, int] | None = None  # beats missed, per shard it backs up
    # As the owner sees them: beats each backup is behind, per backup URL and shard.
    backups: dict[str, dict[str, int]] | None = None
    stopped: bool = False  # its last report, made on a graceful stop
    last_handoff: HandoffRecord | None = None  # the last shard this node handed to a backup
    leaving: bool = False  # stopping (SIGTERM): no shard is to be handed to it


@dataclass(slots=True)
class Holding:
    """A shard this node holds the lease of."""

    held: Held
    ids: IdGenerator
    adopted: bool = False  # its channels are in the engine: it is served
    # Adopting its channels (a task of its own, so the tick goes on renewing meanwhile).
    adopting: asyncio.Task[None] | None = None
    quitting: bool = False  # being let go: adoption stops
    # Being handed to a backup (app/cluster/handoff.py): not served, its writes drained, the
    # lease still ours until the transfer in the store.
    handing: bool = False


@dataclass(slots=True)
class Incoming:
    """Channels moving into one of our shards with topology `version`, from shards of `before`."""

    version: int
    before: tuple[str, ...]


@dataclass(slots=True)
class Counters:
    failovers: int = 0
    handoffs: int = 0


class HandoffRecord(msgspec.Struct):
    """One hand-off of a shard's lease (GET /cluster's `last_handoff`, the member report)."""

    shard: str
    from_url: str = msgspec.field(name="from")
    to: str
    epoch: int  # the new owner's
    took_ms: int  # from refusing the shard's requests here to the new owner serving it
    at: int  # store-clock ms when it ended


@dataclass(slots=True)
class View:
    """The last tick's reading of the store, for routing and GET /cluster."""

    leases: dict[str, ShardLease] = field(default_factory=dict)
    store_now: int = 0
    read_at: int = 0  # monotonic ms of the reading

    def update(self, leases: dict[str, ShardLease], store_now: int, read_at: int) -> None:
        """Take a new reading, but where this node already knows a later epoch of a shard's
        lease (a hand-off it made or took in, while the reading was an await away) keep that:
        epochs only grow in the store, so the reading is the older news there. Without this a
        tick that read just before a hand-off undid it: the new owner stopped serving the
        shard it had just adopted, the old one routed it to nobody, for a heartbeat or more."""
        known = self.leases
        self.leases = {
            shard: known[shard] if shard in known and known[shard].epoch > lease.epoch else lease
            for shard, lease in leases.items()
        }
        self.store_now = store_now
        self.read_at = read_at


class ShardEvents(Protocol):
    """What the mirror hears of the shards this node gains (app/assemble.py)."""

    def gained(self, shard: str, epoch: int) -> None: ...

    def served(self, shard: str) -> None: ...


class OwnershipKeeper:
    def __init__(
        self,
        *,
        store: Store,
        engine: QueueEngine,
        clock: Clock,
        mono: Callable[[], int],
        liveness: Liveness,
        node_id: str,
        url: str,
        heartbeat_ms: int,
        lease_ms: int,
        lag: Callable[[], dict[str, int] | None] | None = None,
    ) -> None:
        self.store = store
        self.engine = engine
        self.clock = clock
        self.mono = mono
        self.liveness = liveness
        self.node_id = node_id
        self.url = url
        self.heartbeat_ms = heartbeat_ms
        self.lease_ms = lease_ms
        self.lag = lag
        self.backups_lag: Callable[[], dict[str, dict[str, int]]] | None = None
        self.events: ShardEvents | None = None
        self.topology: Topology | None = None
        self.held: dict[str, Holding] = {}
        self.moving_out: set[str] = set()
        self.incoming: dict[str, Incoming] = {}
        self.applied_version = 0
        self.counters = Counters()
        self.last_handoff: HandoffRecord | None = None
        self.view = View()
        # Each shard's epoch at this process's first reading of the leases: a live lease under
        # our id at a later epoch was handed to us (adopted), one before is a previous life's.
        self.found: dict[str, int] | None = None
        self.accepting: set[str] = set()  # shards handed to us, being adopted
        self.leaving = False  # stopping: hand off, take nothing more
        self.ticks = 0
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    # -- placement ----------------------------------------------------------------------------
    @property
    def shard_ids(self) -> tuple[str, ...]:
        return self.topology.shard_ids if self.topology else (IMPLICIT_SHARD,)

    def shard_of(self, channel: str) -> str:
        ids = self.shard_ids
        return ids[0] if len(ids) == 1 else shard_for(channel, ids)

    def seats(self) -> dict[str, ShardSeat]:
        if self.topology is None:
            return {IMPLICIT_SHARD: ShardSeat(IMPLICIT_SHARD, None)}
        return {s.id: ShardSeat(s.id, s.primary, s.backups) for s in self.topology.shards}

    def slot_of(self, shard: str) -> int:
        if self.topology is None:
            return IMPLICIT_SLOT
        return self.topology.shard(shard).slot

    def serving(self, shard: str, now: int | None = None) -> Holding | None:
        """The holding of a shard this node serves now (lease held by the monotonic rule, its
        channels adopted), or None."""
        h = self.held.get(shard)
        if h is None or not h.adopted or h.handing:
            return None
        return h if serving(h.held, self.mono() if now is None else now, self.lease_ms) else None

    def blocked(self, channel: str, shard: str) -> bool:
        """Whether the channel is in a hand-off: leaving this node, or arriving and not yet
        released by its source owner."""
        if channel in self.moving_out:
            return True
        inc = self.incoming.get(shard)
        return inc is not None and _placed(channel, inc.before) != shard

    # -- the loop -----------------------------------------------------------------------------
    async def start(self, *, loop: bool = True) -> None:
        """First tick now (a single node serves at once when the lease is free), then the loop
        (`loop=False`: a test drives `tick` itself)."""
        self._stopping = False
        await self.tick(self.mono())
        if loop:
            self._task = asyncio.create_task(self._run(), name="lionmq-ownership")
            # Ready once the first adoptions are done (the loop renews meanwhile).
            adopting = [h.adopting for h in self.held.values() if h.adopting is not None]
            if adopting:
                await asyncio.wait(adopting)

    async def stop(self) -> None:
        """Stop the loop, then let go gracefully: channels drained and released, leases
        released, so another node (or this one restarted) takes over at once."""
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait({self._task})
            self._task = None
        for shard in list(self.held):
            await self._let_go(shard, release=True)
        await self.report(stopped=True)

    async def _run(self) -> None:
        while not self._stopping:
            started = self.mono()
            try:
                await self.tick(started)
            except LionMQError as exc:
                # A store down: leases are not renewed, and the serving rule stops this node
                # serving (route and fence ask it) before any of them can lapse.
                log.warning(
                    "ownership tick failed (%s); retrying at the next heartbeat", exc.detail
                )
            except Exception:
                log.exception("ownership tick failed; retrying at the next heartbeat")
            # Lost ones are found out by the serving rule between ticks, not by the tick.
            elapsed = self.mono() - started
            await asyncio.sleep(max(0, self.heartbeat_ms - elapsed) / 1000)

    async def tick(self, now: int) -> None:
        """One round: read, decide per shard, act, hand off, report. `now` is monotonic ms,
        taken before any store call (a renewal counts from it)."""
        self.ticks += 1
        # The topology before the leases: a moved channel's source judged gone (its lease not
        # live) was gone after this topology was stored, so whoever takes the source later
        # reads this topology after its take (below) and never serves the channel.
        await self._read_topology()
        store_now = await self.store.store_time_ms()
        self.view.update(await self.store.leases(), store_now, now)
        leases = self.view.leases
        if self.found is None:
            self.found = {shard: lease.epoch for shard, lease in leases.items()}
        found = self.found
        # Before any take: a fresh topology whose sources are all gone blocks nothing.
        await self._admit_incoming(leases, store_now)
        seats = self.seats()
        for shard in sorted(set(seats) | set(self.held)):
            held = self.held.get(shard)
            if shard in self.accepting:
                continue  # handed to us: adopted by `adopt_given` right now
            if held is not None and held.handing:
                await self._renew_handing(shard, held, now)
                continue
            # The view as of now: a hand-off since the reading (acts on earlier shards are
            # awaits) updated it.
            lease = self.view.leases.get(shard)
            action = decide(
                me=self.url,
                node_id=self.node_id,
                seat=seats.get(shard),
                lease=lease,
                store_now=store_now,
                held=held.held if held else None,
                silence_ms=self.liveness.silent_for(shard, now),
                lease_ms=self.lease_ms,
                found_epoch=found.get(shard, 0),
                leaving=self.leaving,
            )
            try:
                await self._act(shard, action, lease, now)
            except LionMQError as exc:
                log.warning("shard %s: %s failed: %s", shard, action.value, exc.detail)
        await self._admit_incoming(leases, store_now)
        # Adoptions finish within the tick when they are quick (the tests' case); a long one
        # (100,000 channels) goes on in the background while the next ticks renew the lease.
        adopting = [h.adopting for h in self.held.values() if h.adopting is not None]
        if adopting:
            await asyncio.wait(adopting, timeout=self.heartbeat_ms / 2000)
        if self.ticks % _AUDIT_EVERY == 0 and len(self.shard_ids) > 1:
            await self.audit()  # one shard: no dead letter ever crosses shards
        await self.report()

    async def _act(self, shard: str, action: Action, lease: ShardLease | None, now: int) -> None:
        if action is Action.TAKE:
            got = await self.store.take_lease(shard, self.node_id, self.url, self.lease_ms)
            if got is not None:
                # A set_nodes stored since this tick's reading may have moved channels out of
                # the shard, and their new owner may have adopted them already (the lease it
                # saw had lapsed): place the shard's channels by the topology of now.
                await self._read_topology()
                await self._gain(shard, got, lease, now)
        elif action is Action.RENEW:
            h = self.held[shard]
            renewed = await self.store.renew_lease(shard, self.node_id, h.held.epoch, self.lease_ms)
            if renewed is None:
                await self._let_go(shard, release=False)
                return
            h.held = Held(h.held.epoch, now)
            if not h.adopted and h.adopting is None:  # the last adoption failed: again
                self._adopt(shard, h)
        elif action is Action.STOP_SERVING:
            log.warning("shard %s: the store gives the lease to another; stopping", shard)
            await self._let_go(shard, release=False)
        elif action is Action.RELEASE:
            await self._let_go(shard, release=True)
            self.counters.handoffs += 1
        elif action is Action.ADOPT and lease is not None:
            # Handed to us and the holder's call never came (it died right after the transfer).
            log.info("shard %s: handed to this node at epoch %d; adopting", shard, lease.epoch)
            await self.adopt_given(shard, lease.epoch, now)

    async def _renew_handing(self, shard: str, h: Holding, now: int) -> None:
        """Renew a shard being handed off, so a slow hand-off that gives up can serve on; once
        transferred the renewal finds nothing, and the hand-off itself lets the shard go."""
        try:
            renewed = await self.store.renew_lease(shard, self.node_id, h.held.epoch, self.lease_ms)
        except LionMQError as exc:
            log.warning("shard %s: renewing during its hand-off failed: %s", shard, exc.detail)
            return
        if renewed is not None and self.held.get(shard) is h:
            h.held = Held(h.held.epoch, now)

    # -- hand-offs (the moves themselves are app/cluster/handoff.py's) ------------------------
    async def adopt_given(self, shard: str, epoch: int, now: int) -> Holding | None:
        """Serve a shard whose lease its holder transferred to this node at `epoch`: renewed
        first (so the serving rule counts from before a call of ours), then gained as a taken
        one. None when the store says the lease is not ours at that epoch."""
        if shard in self.held or shard in self.accepting:
            h = self.held.get(shard)
            return h if h is not None and h.held.epoch == epoch else None
        self.accepting.add(shard)
        try:
            # With the renewal, the topology (a set_nodes since the last tick places the
            # channels): both are needed before serving, neither needs the other.
            renewed, _ = await asyncio.gather(
                self.store.renew_lease(shard, self.node_id, epoch, self.lease_ms),
                self._read_topology(),
            )
            if renewed is None:
                return None
            self.view.leases[shard] = renewed
            await self._gain(shard, renewed, None, now)
            return self.held[shard]
        finally:
            self.accepting.discard(shard)

    def begin_handoff(self, shard: str) -> Holding:
        """Stop serving the shard for its hand-off: requests get 503 + Retry-After: 0 (or are
        forwarded by a node that already sees the new owner), writes are fenced."""
        h = self.held[shard]
        h.handing = True
        return h

    def abandon_handoff(self, shard: str, h: Holding) -> None:
        """The hand-off did not happen (no transfer in the store): serve the shard again."""
        h.handing = False

    async def handed(self, shard: str, lease: ShardLease, record: HandoffRecord) -> None:
        """The store gave the lease to `lease.owner`: route the shard there from now on and let
        go of its channels (writes were drained before the transfer; none started since)."""
        self.view.leases[shard] = lease
        await self._let_go(shard, release=False)
        self.counters.handoffs += 1
        self.last_handoff = record

    async def look(self) -> None:
        """Read the leases again now (another node handed a shard on: route to its new owner
        before the next tick)."""
        now = self.mono()
        store_now = await self.store.store_time_ms()
        self.view.update(await self.store.leases(), store_now, now)

    async def _gain(self, shard: str, got: ShardLease, before: ShardLease | None, now: int) -> None:
        floor = await self.store.max_id()
        self.held[shard] = Holding(
            Held(got.epoch, now), IdGenerator(self.clock, floor, self.slot_of(shard))
        )
        if before is not None and before.owner != self.node_id and before.expires_at > 0:
            self.counters.failovers += 1  # it lapsed under another owner (not released)
        log.info("shard %s: taken at epoch %d", shard, got.epoch)
        if self.events is not None:
            self.events.gained(shard, got.epoch)
        self._adopt(shard, self.held[shard])

    def _adopt(self, shard: str, h: Holding, admit: Incoming | None = None) -> None:
        h.adopting = asyncio.create_task(self._adopt_all(shard, h, admit))

    async def _adopt_all(self, shard: str, h: Holding, admit: Incoming | None) -> None:
        """Adopt every channel the store holds for the shard but those still arriving (with
        `admit`: those too, their source owners having let go), then serve it."""
        try:
            if admit is not None and self.incoming.get(shard) is admit:
                # Their source owners let go: the arrivals are this shard's like the rest (a
                # request for one may build it meanwhile; the engine enters a channel once).
                del self.incoming[shard]
            for name, config in (await self.store.load_channels()).items():
                if h.quitting:
                    return
                if self.shard_of(name) != shard or name in self.engine.channels:
                    continue
                if not self.blocked(name, shard):
                    await self.engine.adopt(name, config)
            h.adopted = not h.quitting
            if h.adopted and self.events is not None:
                self.events.served(shard)
        except LionMQError as exc:
            log.warning("shard %s: adopting its channels failed (%s); again", shard, exc.detail)
        except Exception:
            log.exception("shard %s: adopting its channels failed; again", shard)
        finally:
            h.adopting = None

    async def let_go(self, shard: str, *, release: bool = True) -> None:
        """Stop serving the shard and let go of its channels (and, with `release`, of its
        lease: drained first, so a backup takes it at its next tick)."""
        await self._let_go(shard, release=release)

    async def _let_go(self, shard: str, *, release: bool) -> None:
        h = self.held.get(shard)
        if h is None:
            return
        h.adopted = False  # no new request is served from here on
        h.quitting = True
        if h.adopting is not None:
            await asyncio.wait({h.adopting})  # it stops after the channel it is at
        names = [n for n in self.engine.channels if self.shard_of(n) == shard]
        if release:
            await self.engine.quiesce()
        for name in names:
            self.engine.release(name)
        del self.held[shard]
        self.engine.wake_absent()
        if release:
            with contextlib.suppress(LionMQError):  # it lapses on its own within LEASE_MS
                await self.store.release_lease(shard, self.node_id, h.held.epoch)
            log.info("shard %s: released (epoch %d)", shard, h.held.epoch)

    # -- topology and hand-offs ----------------------------------------------------------------
    async def _read_topology(self) -> None:
        stored = await self.store.topology()
        version = stored[0] if stored else 0
        current = self.topology.version if self.topology else 0
        if stored is None or version <= current:
            return
        new = decode_topology(stored[1])
        before = self.shard_ids
        backed = (
            {s.id for s in self.topology.shards if self.url in s.backups}
            if self.topology
            else set()
        )
        self.topology = new
        now = self.mono()
        for shard in new.shards:
            if self.url in shard.backups and shard.id not in backed:
                # A shard this node backs from now on: its silence counts from now, so a new
                # shard's primary has LEASE_MS to take it before its backup may.
                self.liveness.watch(shard.id, now)
        await self._apply_topology(before, new)

    async def _apply_topology(self, before: tuple[str, ...], new: Topology) -> None:
        """Drain and release what leaves this node's shards; mark what arrives."""
        after = new.shard_ids
        # Arrivals are marked with the switch of topology, before any await: in between, a
        # channel arriving here routed as served, and a request could build it in memory from
        # the store while its old owner still wrote to it (seen once in CI: a confirmed enqueue
        # the new owner never counted).
        if set(before) != set(after):
            for shard in after:
                self.incoming[shard] = Incoming(new.version, before)
        leaving = [n for n in self.engine.channels if _placed(n, before) != _placed(n, after)]
        self.moving_out.update(leaving)
        try:
            await self.engine.quiesce()
            for name in leaving:
                self.engine.release(name)
        finally:
            self.moving_out.difference_update(leaving)
        self.engine.wake_absent()
        if leaving:
            self.counters.handoffs += 1
            log.info("topology %d: handed off %d channel(s)", new.version, len(leaving))
        self.applied_version = new.version
        await self.report()

    async def _admit_incoming(self, leases: dict[str, ShardLease], store_now: int) -> None:
        """Adopt channels moved into our shards once their source owners let go of them."""
        if not self.incoming:
            return
        members = await self.store.members()
        applied: dict[str, int] = {}
        for url, (_, doc) in members.items():
            with contextlib.suppress(msgspec.MsgspecError):
                applied[url] = msgspec.json.decode(doc, type=MemberDoc).applied_version
        for shard, inc in list(self.incoming.items()):
            ready = True
            for source in inc.before:
                lease = leases.get(source)
                if source == shard or lease is None or not live(lease, store_now):
                    continue  # channels stay, or nobody can write for the source any more
                if lease.owner == self.node_id:
                    continue  # this node applied the topology before marking anything
                if applied.get(lease.owner_url, 0) < inc.version:
                    ready = False
            if not ready:
                continue
            h = self.held.get(shard)
            if h is None:
                del self.incoming[shard]  # adopted with the rest whenever it is taken
            elif h.adopted and h.adopting is None:
                self._adopt(shard, h, admit=inc)

    async def audit(self) -> None:
        """Adopt channels of served shards the engine lacks (a poke lost, a channel created
        by a cross-shard dead letter) and re-read dead-letter targets' counts."""
        configs = await self.store.load_channels()
        for name, config in configs.items():
            shard = self.shard_of(name)
            missing = name not in self.engine.channels
            if missing and self.serving(shard) and not self.blocked(name, shard):
                await self.engine.adopt(name, config)
        targets = {
            c.dead_letter
            for name, c in configs.items()
            if c.dead_letter and self.shard_of(c.dead_letter) != self.shard_of(name)
        }
        for name in targets & set(self.engine.channels):
            await self.engine.refresh(name)

    # -- presence -----------------------------------------------------------------------------
    def role(self) -> str:
        """The acting role: `primary` while this node holds a shard, `backup` while it is a
        member of a shard another node holds (a configured primary back from the dead follows
        the node that took its shard), `unassigned` otherwise."""
        if self.held:
            return "primary"
        if self.topology is None or any(self.url in s.members for s in self.topology.shards):
            return "backup"
        return "unassigned"

    def owned(self) -> dict[str, int]:
        """Shards served now, with their epochs."""
        now = self.mono()
        return {s: h.held.epoch for s, h in self.held.items() if self.serving(s, now)}

    def mirrored(self) -> dict[str, int]:
        """Shards whose deltas go to their backups: those served now, and those being handed
        off (the last heartbeat before the transfer needs their journal)."""
        out = self.owned()
        out.update({s: h.held.epoch for s, h in self.held.items() if h.handing})
        return out

    async def report(self, *, stopped: bool = False) -> None:
        doc = MemberDoc(
            id=self.node_id,
            url=self.url,
            role=self.role(),
            shards=self.owned(),
            applied_version=self.applied_version,
            lag=self.lag() if self.lag else None,
            backups=self.backups_lag() if self.backups_lag else None,
            stopped=stopped,
            last_handoff=self.last_handoff,
            leaving=self.leaving,
        )
        try:
            await self.store.report_member(self.url, msgspec.json.encode(doc))
        except LionMQError as exc:
            log.warning("member report failed: %s", exc.detail)


def _placed(channel: str, shard_ids: tuple[str, ...]) -> str:
    return shard_ids[0] if len(shard_ids) == 1 else shard_for(channel, shard_ids)


__all__ = ["HandoffRecord", "MemberDoc", "OwnershipKeeper"]
