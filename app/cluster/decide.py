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
from collections.abc import Sequence
from dataclasses import dataclass

from app.store.base import ShardLease


class Action(enum.Enum):
    RENEW = "renew"  # hold on: renew the lease (this node holds it)
    TAKE = "take"  # ask the store for the lease (compare-and-set)
    RELEASE = "release"  # hand the shard off: let go of its channels, then of the lease
    WAIT = "wait"  # not ours to take (held live by another, or we are not due)
    STOP_SERVING = "stop_serving"  # we believed we held it, the store says otherwise
    # Its holder handed the lease to us (a rolling restart): serve it. Told by the holder at
    # once; this is the fallback when that call was lost.
    ADOPT = "adopt"


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
    found_epoch: int,
    leaving: bool = False,
) -> Action:
    """This node's next step for one shard.

    `seat` is the shard in the current topology (None: the shard is no longer in it), `lease`
    the stored lease, `held` what this node believes it holds, `silence_ms` how long no heartbeat
    came for the shard (a backup takes over only after LEASE_MS of it *and* an expired lease in
    the store: a cut heartbeat path alone never causes a takeover). `found_epoch` is the
    shard's epoch when this process first read the leases (0: none): a live lease under our id
    at a later epoch was handed to this process, one at that epoch or before is a previous
    life's. `leaving`: the node is stopping and takes nothing more.
    """
    if held is not None:
        if lease is None or lease.owner != node_id or lease.epoch != held.epoch:
            return Action.STOP_SERVING  # taken over (a new epoch), or released
        if seat is None or not seat.member(me):
            return Action.RELEASE  # set_nodes moved the shard away from this node
        return Action.RENEW
    if leaving:
        return Action.WAIT
    given = lease is not None and lease.owner == node_id and lease.epoch > found_epoch
    if given and live(lease, store_now) and seat is not None and seat.member(me):
        return Action.ADOPT
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


def status_of(age_ms: int | None, lease_ms: int) -> str:
    """A member's status from how long ago it reported (by the store's clock): presence, for
    display and for picking whom to hand a shard to, never for ownership."""
    if age_ms is None:
        return "down"
    if age_ms < lease_ms:
        return "up"
    return "suspect" if age_ms < 3 * lease_ms else "down"


# -- hand-offs (a rolling restart, POST /cluster/shards/{id}/handoff) --------------------------


@dataclass(frozen=True, slots=True)
class Candidate:
    """A backup of a shard as its owner sees it when a hand-off is asked for."""

    url: str
    # Beats behind by the owner's count of its heartbeat acks: 0 when it confirmed every beat
    # up to the newest, None when it never answered one.
    lag: int | None
    up: bool  # its member report is fresh, not a stopped node's last one, not a leaving one's


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a hand-off cannot be made (409 on the endpoint; a plain release on SIGTERM)."""

    reason: str


def successor(candidates: Sequence[Candidate], wanted: str | None = None) -> str | Refusal:
    """The backup to hand a shard to: an up-to-date one (lag 0, up), the one `wanted` if given,
    else the first in topology order. Never a backup behind: its mirror would be stale and, as
    a node that missed heartbeats, it may be cut off from the owner."""
    if wanted is not None:
        named = [c for c in candidates if c.url == wanted]
        if not named:
            return Refusal(f"{wanted} is not a backup of this shard")
        candidates = named
    behind: list[str] = []
    for c in candidates:
        if c.up and c.lag == 0:
            return c.url
        state = "down" if not c.up else "never confirmed a heartbeat" if c.lag is None else None
        behind.append(f"{c.url} ({state or f'{c.lag} heartbeat(s) behind'})")
    if not candidates:
        return Refusal("the shard has no backup to hand it to")
    return Refusal("no backup is up to date: " + ", ".join(behind))


def worth_waiting(candidates: Sequence[Candidate]) -> bool:
    """Whether a node that is stopping should wait a little for a backup to catch up rather
    than release the shard now: some backup reports itself up (it is resyncing, or a few beats
    behind), so it may soon confirm every beat. One that is down will not."""
    return any(c.up for c in candidates)


def handoff_refusal(
    *, held: Held | None, adopted: bool, handing: bool, now_mono: int, lease_ms: int
) -> Refusal | None:
    """Whether this node may start handing a shard off (None: it may). Only a shard it serves
    now: one it is still adopting, already handing off, or whose lease it may no longer count
    on (not renewed in time) is not its to give."""
    if held is None:
        return Refusal("this node does not hold the shard's lease")
    if handing:
        return Refusal("a hand-off of the shard is already under way")
    if not adopted:
        return Refusal("this node is still taking the shard's channels in; try again shortly")
    if not serving(held, now_mono, lease_ms):
        return Refusal("this node's lease of the shard was not renewed in time")
    return None


__all__ = [
    "Action",
    "Candidate",
    "Held",
    "Refusal",
    "ShardSeat",
    "decide",
    "handoff_refusal",
    "live",
    "margin",
    "serving",
    "status_of",
    "successor",
    "worth_waiting",
]
