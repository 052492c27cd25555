"""The cluster's parts put together for one node, opened on the lifespan's exit stack.

One place knows how the runtime (ownership), the router (forwarding), the mirror (heartbeats
to backups, the warm copy on a backup) and their HTTP clients fit; app/main.py calls
`open_cluster` and gets the runtime back.
"""

from __future__ import annotations

from contextlib import AsyncExitStack
from dataclasses import dataclass

import httpx
from starlette.applications import Starlette

from app.api import forward
from app.api.internal import Mirroring
from app.clock import Clock
from app.cluster.handoff import Handover
from app.cluster.heartbeat import HeartbeatSender
from app.cluster.journal import Journal
from app.cluster.mirror import Follower, Mirror
from app.cluster.runtime import ClusterRuntime
from app.engine.queue import QueueEngine
from app.settings import Settings
from app.store.base import Store


@dataclass(slots=True)
class MirrorEvents:
    """The keeper's shard events, told to the mirror: a shard taken fences older heartbeats;
    once its channels are adopted from the store, the mirror is compared with them and let go."""

    mirror: Mirror
    engine: QueueEngine
    runtime: ClusterRuntime

    def gained(self, shard: str, epoch: int) -> None:
        self.mirror.note_epoch(shard, epoch)

    def served(self, shard: str) -> None:
        shard_of = self.runtime.shard_of
        adopted = {n: ch for n, ch in self.engine.channels.items() if shard_of(n) == shard}
        self.mirror.reconcile(shard, adopted)


def backup_lag(runtime: ClusterRuntime) -> dict[str, int]:
    """Beats missed, per shard this node backs up and does not serve (its member report, for
    GET /cluster and /metrics): a backup whose heartbeats are cut cannot hear of the beats it
    missed from the owner, so it counts the silence itself. The owner's own count of each
    backup's lag is reported beside it (`HeartbeatSender.lag`); GET /cluster shows the larger."""
    topology = runtime.topology
    if topology is None:
        return {}
    now = runtime.mono_ms()
    beat_ms = max(1, runtime.settings.heartbeat_ms)
    owned = runtime.owned()
    return {
        shard.id: runtime.liveness.silent_for(shard.id, now) // beat_ms
        for shard in topology.shards
        if runtime.url in shard.members and shard.id not in owned
    }


async def open_cluster(
    resources: AsyncExitStack,
    app: Starlette,
    settings: Settings,
    store: Store,
    engine: QueueEngine,
    clock: Clock,
) -> ClusterRuntime:
    """Build, start and register for closing every cluster part of this node."""
    runtime = ClusterRuntime(settings, store, engine, clock)
    http = await resources.enter_async_context(httpx.AsyncClient())
    mirror = Mirror(runtime.liveness)
    follower = Follower(mirror, http, settings.cluster_secret, runtime.mono_ms)
    resources.push_async_callback(follower.stop)
    sender = HeartbeatSender(
        engine=engine,
        journal=Journal(runtime.shard_of),
        owned=runtime.keeper.mirrored,
        backups_of=lambda shard: list(runtime.backups_of(shard)),
        node_id=runtime.node_id,
        node_url=runtime.url,
        secret=settings.cluster_secret,
        heartbeat_ms=settings.heartbeat_ms,
        http=http,
        monotonic_ms=runtime.mono_ms,
    )
    runtime.attach(sender)  # started after the first tick, stopped before the shards go
    runtime.handover = Handover(
        keeper=runtime.keeper,
        engine=engine,
        store=store,
        sender=sender,
        http=http,
        secret=settings.cluster_secret,
        members=runtime.members,
        backups_of=runtime.backups_of,
        peers=runtime.peers,
    )
    runtime.keeper.events = MirrorEvents(mirror, engine, runtime)
    runtime.lag = lambda: backup_lag(runtime)
    runtime.keeper.backups_lag = sender.lag
    app.state.mirroring = Mirroring(
        follower, sender, runtime.refuses_heartbeat, settings.max_request_bytes
    )
    session = await resources.enter_async_context(forward.forward_session())
    # Closed before the session: no request forwards through a closed session.
    resources.push_async_callback(runtime.stop)
    await runtime.start()
    forward.install(app, runtime, session, settings.cluster_secret)
    resources.callback(forward.uninstall, app)
    return runtime


__all__ = ["MirrorEvents", "backup_lag", "open_cluster"]
