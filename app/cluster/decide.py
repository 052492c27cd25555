"""What this node does about each shard's lease: pure functions, tested from tables.

The store is the only arbiter of ownership (its compare-and-set on the lease); these functions
only decide when to ask it. The serving rule follows Kubernetes' leader election (client-go
`leaderelection`: RenewDeadline < LeaseDuration): a holder counts its lease on its own monotonic
clock from *before* the renewal it sent, and stops serving a margin ahead of that count's end,
so it has stopped before any other node can find the lease expired in the store and take it
(clock rates differ a little; the store's lease starts during the call, never before it).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from app.store.base import ShardLease


class Action(enum.Enum):
    RENEW = "renew"  # hold on: renew the lease (this node holds it)
    TAKE = "take"  # ask the store for the lease (compare-and-set)
    RELEASE = "release"  # hand the shard off: let go of its channels, then of the lease
    WAIT = "wait"  # not ours to take (held live by another, or we are not due)
    STOP_SERVING = "stop_serving"  # we believed we held it, the store says otherwise


@dataclass(frozen=True, slots=True)
class Held:
    """A lease this node holds: its epoch and when (monotonic ms) its last renewal was sent."""

    epoch: int
    renewed_at: int


@dataclass(frozen=True, slots=True)
class ShardSeat:
    """One shard as the topology places it; `primary` None for the implicit shard, where every
    node on the store is a candidate and the first to take the lease serves."""

    shard: str
    primary: str | None
    backups: tuple[str, ...] = ()

    def member(self, url: str) -> bool:
        return self.primary is None or url == self.primary or url in self.backups


def margin(lease_ms: int) -> int:
    """How long before its lease could lapse a holder stops serving."""
    return lease_ms // 4


def serving(held: Held | None, now_mono: int, lease_ms: int) -> bool:
    """Whether a holder may still serve: its lease, counted from before its last renewal on its
    own monotonic clock, has more than the margin left."""
    return held is not None and now_mono < held.renewed_at + lease_ms - margin(lease_ms)


def live(lease: ShardLease | None, store_now: int) -> bool:
    """Whether the stored lease is held (unexpired by the store's clock)."""
    return lease is not None and lease.expires_at > store_now


def decide(
    *,
    me: str,
    node_id: str,
    seat: ShardSeat | None,
    lease: ShardLease | None,
    store_now: int,
    held: Held | None,
    silence_ms: int,
    lease_ms: int,
) -> Action:
    """This node's next step for one shard.

    `seat` is the shard in the current topology (None: the shard is no longer in it), `lease`
    the stored lease, `held` what this node believes it holds, `silence_ms` how long no heartbeat
    came for the shard (a backup takes over only after LEASE_MS of it *and* an expired lease in
    the store: a cut heartbeat path alone never causes a takeover).
    """
    if held is not None:
        if lease is None or lease.owner != node_id or lease.epoch != held.epoch:
            return Action.STOP_SERVING  # taken over (a new epoch), or released
        if seat is None or not seat.member(me):
            return Action.RELEASE  # set_nodes moved the shard away from this node
        return Action.RENEW
    if seat is None or not seat.member(me) or live(lease, store_now):
        # Not ours, or held live by another: a node that comes back to a higher epoch follows
        # as a backup and never takes the shard back by itself. A live lease under our own id
        # (a restart after kill -9) is waited out: its writes would share our epoch.
        return Action.WAIT
    if seat.primary is None or seat.primary == me:
        return Action.TAKE
    # Released by a member (a graceful stop; expires_at 0): no crash to wait out. Released by
    # a node outside the shard (set_nodes moved it here), its new primary takes it.
    handed = lease is not None and lease.expires_at == 0 and seat.member(lease.owner_url)
    return Action.TAKE if handed or silence_ms >= lease_ms else Action.WAIT


__all__ = ["Action", "Held", "ShardSeat", "decide", "live", "margin", "serving"]
