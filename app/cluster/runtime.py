"""ClusterRuntime: the node's one object for everything cluster, kept on `Node.cluster`.

What the other parts use (plain attributes and methods):

* `route(channel) -> Route` (app/cluster/route.py): `Local(shard)` while this node serves the
  channel's shard (lease held by the monotonic rule, its channels adopted, the channel not in a
  hand-off), `Remote(shard, url, node_id)` when another node holds the shard's live lease,
  `NoOwner(shard, retry_after_s, reason)` otherwise (failover or hand-off under way). The router
  (app/api/forward.py) asks it per request.
* `liveness` (app/cluster/liveness.py): the mirror's heartbeat endpoint calls
  `liveness.beat(shard, mono_ms())`; the keeper reads the silence before a backup takes over.
* `mono_ms()`: the monotonic clock (ms) the runtime and `liveness` use.
* `owned() -> dict[str, int]`: shards served now -> epoch (the mirror posts heartbeats for these).
* `topology` (`Topology | None`; None: the implicit shard "s0"), `shard_of(channel)`,
  `backups_of(shard)` (the topology's members of the shard other than this node; for the
  implicit shard, none: standbys follow the store), `url`, `node_id`, `secret`.
* `lag`: set it to a callable returning `{shard: beats behind}` for the member report and
  `/metrics` (the mirror's primary side knows it); None until then.
* `attach(service)`: a part with `async start()` / `async stop()` (the mirror's loop), attached
  in the lifespan before `start()` (app/main.py), started after the runtime's first tick and
  stopped before the runtime lets go of its shards.
* The CLUSTER_SECRET check of node-to-node calls is app.api.auth.check_cluster_secret (one check
  for every such route).
* `counters.failovers`, `counters.handoffs`, `role()`, `members()` (for /cluster, /metrics).

The engine asks `ids_for` / `serves` / `poke` (app.engine.queue.Ownership); the store asks
`resolve` for every fenced write (app.store.base.Resolve).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Protocol

import httpx
import msgspec
from lionmq.topology import InvalidTopology, Topology, normalize_url

from app.clock import Clock
from app.cluster.decide import live
from app.cluster.handoff import Handover
from app.cluster.init import parse_cluster_init
from app.cluster.keeper import MemberDoc, OwnershipKeeper
from app.cluster.liveness import Liveness
from app.cluster.route import Local, NoOwner, Remote, Route
from app.engine.ids import IdGenerator
from app.engine.queue import QueueEngine
from app.errors import ConfigError, Fenced, LionMQError
from app.settings import CLUSTER_SECRET_HEADER, Settings
from app.store.base import Store

log = logging.getLogger("lionmq.cluster")

SECRET_HEADER = CLUSTER_SECRET_HEADER  # defined once, with the setting
POKE_PATH = "/cluster/internal/poke"
_POKE_TRIES = 6  # 0.1 s apart, then 0.2 s, ...: 2.1 s in all
_POKE_TIMEOUT_S = 2.0


class Service(Protocol):
    async def start(self) -> None: ...

    async def stop(self) -> None: ...


def monotonic_ms() -> int:
    return time.monotonic_ns() // 1_000_000


class ClusterRuntime:
    def __init__(
        self,
        settings: Settings,
        store: Store,
        engine: QueueEngine,
        clock: Clock,
        *,
        mono: Callable[[], int] = monotonic_ms,
    ) -> None:
        try:
            self.url = normalize_url(settings.server_host)
        except InvalidTopology as exc:
            raise ConfigError(f"SERVER_HOST: {exc}") from None
        self.settings = settings
        self.node_id = settings.node_id
        self.secret = settings.cluster_secret
        self.store = store
        self.engine = engine
        self.mono_ms = mono
        self.liveness = Liveness(mono())
        self.lag: Callable[[], dict[str, int] | None] | None = None
        # The answer of `route_shard` for a shard served here: one per shard, not one a request.
        self._local: dict[str, Local] = {}
        self.keeper = OwnershipKeeper(
            store=store,
            engine=engine,
            clock=clock,
            mono=mono,
            liveness=self.liveness,
            node_id=self.node_id,
            url=self.url,
            heartbeat_ms=settings.heartbeat_ms,
            lease_ms=settings.lease_ms,
            lag=lambda: self.lag() if self.lag else None,
        )
        self.counters = self.keeper.counters
        # Hand-offs to backups (app/cluster/handoff.py), set by app/assemble.py.
        self.handover: Handover | None = None
        self._services: list[Service] = []
        self._pokes: set[asyncio.Task[None]] = set()
        self._http: httpx.AsyncClient | None = None

    # -- what others read ---------------------------------------------------------------------
    @property
    def topology(self) -> Topology | None:
        return self.keeper.topology

    def shard_of(self, channel: str) -> str:
        return self.keeper.shard_of(channel)

    def owned(self) -> dict[str, int]:
        return self.keeper.owned()

    def backups_of(self, shard: str) -> tuple[str, ...]:
        if self.topology is None or shard not in self.topology.shard_ids:
            return ()
        return tuple(u for u in self.topology.shard(shard).members if u != self.url)

    def role(self) -> str:
        return self.keeper.role()

    def peers(self) -> list[str]:
        """Every other node the topology names."""
        topology = self.topology
        if topology is None:
            return []
        urls = {u for shard in topology.shards for u in shard.members}
        return sorted(urls - {self.url})

    async def leave(self) -> None:
        """The node is stopping (SIGTERM, before the server stops accepting): hand each shard
        to an up-to-date backup, release those that cannot be handed."""
        if self.handover is not None:
            await self.handover.leave()

    def attach(self, service: Service) -> None:
        self._services.append(service)

    def refuses_heartbeat(self, shard: str, owner_url: str) -> str | None:
        """Why this node takes no heartbeat of `shard` from `owner_url` (None: it does): it must
        back the shard up in the topology it knows, and the sender must be a member of it."""
        topology = self.topology
        if topology is None or shard not in topology.shard_ids:
            return f"shard {shard!r} is not in this node's topology; it backs up no such shard"
        members = topology.shard(shard).members
        if self.url not in members:
            return f"this node ({self.url}) is not a member of shard {shard}"
        if owner_url not in members:
            return f"{owner_url[:200]!r} is not a member of shard {shard}: it cannot own it"
        return None

    def route(self, channel: str) -> Route:
        keeper = self.keeper
        shard = keeper.shard_of(channel)
        if keeper.blocked(channel, shard):
            return NoOwner(shard, 1, f"channel {channel!r} is moving between shards")
        return self.route_shard(shard)

    def problem(self) -> str | None:
        """Why the node is not ready: a shard it belongs to that nobody serves (this node
        waits for its lease: a restart after kill -9, a failover under way)."""
        for shard, seat in self.keeper.seats().items():
            if seat.member(self.url) and isinstance(self.route_shard(shard), NoOwner):
                return f"shard {shard} has no owner yet; this node waits for its lease"
        return None

    def route_shard(self, shard: str) -> Route:
        """Who serves the shard: this node, the live holder of its lease, or nobody yet."""
        keeper = self.keeper
        if keeper.serving(shard) is not None:
            local = self._local.get(shard)
            if local is None:
                local = self._local[shard] = Local(shard)
            return local
        h = keeper.held.get(shard)
        if h is not None and h.handing:
            # A hand-off lasts well under a second: retry at once, not after the usual second.
            return NoOwner(shard, 0, f"shard {shard} is being handed to a backup")
        lease = keeper.view.leases.get(shard)
        # The reading is at most a heartbeat old: judged on the store's clock moved on since.
        store_now = keeper.view.store_now + (self.mono_ms() - keeper.view.read_at)
        if lease is not None and lease.owner != self.node_id and live(lease, store_now):
            return Remote(shard, lease.owner_url, lease.owner)
        return NoOwner(shard, 1, f"shard {shard} has no owner right now (failover under way)")

    # -- what the engine and the store ask ----------------------------------------------------
    def resolve(self, channel: str) -> tuple[str, int] | None:
        """The fence of a write for `channel`: (shard, epoch) while served here, else None."""
        keeper = self.keeper
        shard = keeper.shard_of(channel)
        h = keeper.serving(shard)
        if h is None or keeper.blocked(channel, shard):
            return None
        return shard, h.held.epoch

    def ids_for(self, channel: str) -> IdGenerator:
        keeper = self.keeper
        shard = keeper.shard_of(channel)
        h = keeper.serving(shard)
        if h is None or keeper.blocked(channel, shard):
            raise Fenced(
                f"this node does not serve channel {channel!r} (shard {shard}) right now;"
                " retry: the request goes to its owner"
            )
        return h.ids

    def serves(self, channel: str) -> bool:
        return self.resolve(channel) is not None

    def admits(self, channel: str) -> bool:
        keeper = self.keeper
        shard = keeper.shard_of(channel)
        h = keeper.held.get(shard)
        return (
            h is not None
            and not h.quitting
            and not h.handing
            and not keeper.blocked(channel, shard)
        )

    def poke(self, channel: str) -> None:
        task = asyncio.ensure_future(self._poke(channel))
        self._pokes.add(task)
        task.add_done_callback(self._pokes.discard)

    async def _poke(self, channel: str) -> None:
        """Tell the channel's owner to re-read it; a few tries, then the owner's audit."""
        for attempt in range(_POKE_TRIES):
            route = self.route(channel)
            try:
                # An owner still adopting its shard may have listed its channels before this
                # one had any (served: false): it is told again once it serves.
                if isinstance(route, Local) and await self.poked(channel):
                    return
                if isinstance(route, Remote) and self._http is not None:
                    response = await self._http.post(
                        route.url + POKE_PATH,
                        json={"channel": channel},
                        headers={SECRET_HEADER: self.secret},
                    )
                    if response.status_code == 200 and response.json().get("served") is True:
                        return
            except (httpx.HTTPError, LionMQError, ValueError) as exc:  # ValueError: not JSON
                log.info("poke for %s failed (%s); trying again", channel, exc)
            await asyncio.sleep(0.1 * (attempt + 1))
        log.info("poke for %s not delivered; the owner's audit finds the messages", channel)

    async def poked(self, channel: str) -> bool:
        """Messages were moved into `channel` from another shard: re-read it (adopt it when it
        is not in memory yet). Whether this node serves it."""
        if not self.serves(channel):
            return False
        if channel in self.engine.channels:
            await self.engine.refresh(channel)
            return True
        config = (await self.store.load_channels()).get(channel)
        if config is None:  # only messages were moved in: the channel gets its default settings
            await self.engine.ensure(channel, dead_letter_target=True)
        else:
            await self.engine.adopt(channel, config)
        return True

    # -- members ------------------------------------------------------------------------------
    async def members(self) -> dict[str, tuple[int, MemberDoc]]:
        """Member reports by URL: (age in ms by the store's clock, doc)."""
        now = await self.store.store_time_ms()
        out: dict[str, tuple[int, MemberDoc]] = {}
        for url, (seen, raw) in (await self.store.members()).items():
            with contextlib.suppress(msgspec.MsgspecError):
                out[url] = (max(0, now - seen), msgspec.json.decode(raw, type=MemberDoc))
        return out

    # -- start and stop -----------------------------------------------------------------------
    async def start(self, *, loop: bool = True) -> None:
        """Seed the topology (CLUSTER_INIT), check the node's settings against the store, then
        take part: the first tick takes a free lease at once (`loop=False`: a test drives
        `keeper.tick` with its own clock)."""
        s = self.settings
        stored = await self.store.topology()
        if stored is None and s.cluster_init:
            seed = parse_cluster_init(s.cluster_init)
            doc = msgspec.json.encode(seed)
            # Compare-and-set: of several nodes seeding at once one wins, the others read it.
            if await self.store.swap_topology(None, seed.version, doc):
                log.info("seeded topology version %d from CLUSTER_INIT", seed.version)
            stored = await self.store.topology()
        if stored is not None and not s.cluster_secret:
            raise ConfigError(
                "CLUSTER_SECRET must be set: the store holds a cluster topology, and nodes"
                " authenticate each other with it"
            )
        await self._check_identity()
        self._http = httpx.AsyncClient(timeout=_POKE_TIMEOUT_S)
        # From now on the engine holds only what the runtime adopts, and the store writes only
        # under the epoch of a shard this node serves.
        self.engine.ownership = self
        self.store.fence(self.resolve)
        await self.keeper.start(loop=loop)
        for service in self._services:
            await service.start()

    async def _check_identity(self) -> None:
        """Refuse to start as a node id another live member reports from another URL: leases
        are held by node id, so two such nodes would each think they hold the other's."""
        for url, (age, doc) in (await self.members()).items():
            same = doc.id == self.node_id and url != self.url
            if same and not doc.stopped and age < self.settings.lease_ms:
                raise ConfigError(
                    f"NODE_ID {self.node_id!r} is in use by the live node at {url}; give each"
                    " node its own NODE_ID"
                )

    async def stop(self) -> None:
        for service in reversed(self._services):
            await service.stop()
        await self.keeper.stop()
        for task in list(self._pokes):
            task.cancel()
        if self._pokes:
            await asyncio.wait(set(self._pokes))
        if self._http is not None:
            await self._http.aclose()
            self._http = None
        self.store.fence(None)


__all__ = ["POKE_PATH", "SECRET_HEADER", "ClusterRuntime", "Service"]
