"""The cluster as the watcher pieces it together from every node's own view (`GET /cluster`).

Pure, like `state.py`: every method takes the watcher's time (`now_ms`), so tests feed it
observations with their own clock. Nothing here decides anything for the cluster; the store does.
The watcher only reads what the nodes report:

- **Shards.** Each node's view lists every shard with its acting owner and epoch. Epochs only grow
  (a take is a compare-and-set on the epoch), so of all the views the one with the highest epoch
  is the newest word on a shard's owner, whichever node said it and whenever it arrived.
- **Timeline.** An epoch that grows with another owner is a takeover: a *failover* when the old
  owner had stopped reporting, a *hand-off* when it was still up (set-nodes). The time the shard
  had no owner is measured from the last observation of the old owner holding it (its own last
  report; a peer's view of its lease only for an owner that does not report to this watcher; else
  the first view that showed the shard without a live owner) to the first observation of the new
  owner: an upper bound, precise to one report interval. The timeline keeps the newest
  `max_events`.
- **Nodes.** A node's card merges its telemetry (is it reporting to the watcher?) with its peers'
  views of it (its member reports in the store). `failed` is a primary (a shard's owner or
  configured primary) that stopped reporting without saying it stopped and that no fresh peer view
  sees up; a primary no one reports about at all and that peers see down is failed too.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from watcher.schema import MAX_CLUSTER_NODES, ClusterMember, ClusterView
from watcher.state import Status

CardStatus = Literal["up", "suspect", "down", "failed"]
EventKind = Literal["failover", "handoff", "acquired"]

_RANK: dict[str, int] = {"up": 0, "suspect": 1, "down": 2}


def normalize(url: str | None) -> str:
    """URLs compare without case in scheme and host and without a trailing slash."""
    return (url or "").strip().rstrip("/").lower()


@dataclass(slots=True)
class Reporter:
    """A node's latest view of the cluster, and what the watcher knows of it."""

    url: str
    node_id: str
    view: ClusterView
    received_ms: int


@dataclass(slots=True)
class ShardTrack:
    """One shard's acting owner as last observed, and when it was last seen holding it."""

    id: str
    seen: bool = False
    epoch: int = 0
    owner: str | None = None
    owner_id: str | None = None
    since_ms: int | None = None
    # The last observation of `owner` holding the shard, and the first of no live owner.
    held_ms: int | None = None
    released: bool = False
    unowned_since_ms: int | None = None
    expires_at_ms: int | None = None
    channels: int | None = None
    slot: int = 0
    primary: str | None = None
    backups: list[str] = field(default_factory=list)


@dataclass(slots=True)
class _Seen:
    """What the views say of one node (see `ClusterState.node_cards`)."""

    member: ClusterMember | None = None
    peer_status: str | None = None
    lag: dict[str, int] | None = None


@dataclass(frozen=True, slots=True)
class Event:
    at_ms: int
    kind: EventKind
    shard: str
    epoch: int
    from_url: str | None
    from_id: str | None
    to_url: str
    to_id: str | None
    gap_ms: int | None

    def as_dict(self) -> dict[str, Any]:
        return {
            "at_ms": self.at_ms,
            "kind": self.kind,
            "shard": self.shard,
            "epoch": self.epoch,
            "from": self.from_url,
            "from_id": self.from_id,
            "to": self.to_url,
            "to_id": self.to_id,
            "gap_ms": self.gap_ms,
        }


class ClusterState:
    """Shards, owners and the failover timeline, from the views nodes send (schema v3)."""

    def __init__(self, *, max_events: int = 100, max_reporters: int = MAX_CLUSTER_NODES) -> None:
        self.reporters: dict[str, Reporter] = {}
        self.shards: dict[str, ShardTrack] = {}
        self.events: deque[Event] = deque(maxlen=max_events)
        self.max_reporters = max_reporters
        self.version = 0

    # -- observations -----------------------------------------------------------------------
    def observe(
        self,
        node_id: str,
        url: str,
        view: ClusterView,
        now_ms: int,
        interval_ms: int,
    ) -> list[Event]:
        """Take one node's view (it reports every `interval_ms`); returns the timeline entries
        it added.

        A change of owner is a hand-off when the old owner said it let the shard go, or kept
        reporting on time across the change (a set-nodes move); else a failover (it went silent:
        dead, stopped, or cut off).
        """
        me = normalize(url or (view.node.url if view.node else ""))
        if not me:
            return []
        if me not in self.reporters and len(self.reporters) >= self.max_reporters:
            return []
        previous = self.reporters.get(me)
        # The time of this node's report before this one, when it came on time.
        on_time_since = (
            previous.received_ms
            if previous is not None and now_ms - previous.received_ms <= 2 * interval_ms
            else None
        )
        self.reporters[me] = Reporter(me, node_id, view, now_ms)
        if view.version >= self.version:
            self.version = view.version
            self._topology(view)
        added: list[Event] = []
        for shard in view.shards:
            track = self.shards.get(shard.id)
            if track is None or shard.epoch < track.epoch:
                continue  # a shard of an older topology, or a stale view: a newer owner is known
            owner = normalize(shard.owner) or None
            live = owner is not None and (
                shard.lease_expires_in_ms is None or shard.lease_expires_in_ms > 0
            )
            if shard.channels is not None and (owner == me or track.channels is None):
                track.channels = shard.channels  # the owner knows its channels best
            if track.owner == me and shard.epoch == track.epoch and not (live and owner == me):
                track.released = True  # the owner itself says it no longer holds the shard
            if shard.epoch > track.epoch or not track.seen:
                if live and owner is not None:
                    event = self._taken(track, shard.epoch, owner, shard.owner_id, now_ms)
                    if event is not None:
                        added.append(event)
                        self.events.append(event)
                else:  # a newer epoch whose lease has already run out
                    track.seen = True
                    track.epoch, track.owner, track.owner_id = shard.epoch, owner, shard.owner_id
                    track.unowned_since_ms = track.unowned_since_ms or now_ms
            elif live and owner == track.owner:
                # The owner's own report says it holds the shard; a peer's only counts for an
                # owner that does not report here (a peer reads the lease, alive or not).
                if owner == me or owner not in self.reporters:
                    track.held_ms = now_ms
                    track.unowned_since_ms = None
            elif not live and track.unowned_since_ms is None:
                track.unowned_since_ms = now_ms
            if live and owner == track.owner and shard.lease_expires_in_ms is not None:
                track.expires_at_ms = now_ms + shard.lease_expires_in_ms
        if on_time_since is not None:
            self._handed_off(me, on_time_since)
        return added

    def _handed_off(self, me: str, since_ms: int) -> None:
        """`me` reported on time since `since_ms`: an owner change away from it since then was
        a hand-off, not a failover."""
        for i in range(len(self.events) - 1, -1, -1):
            event = self.events[i]
            if event.at_ms < since_ms:
                break
            if event.from_url == me and event.kind == "failover":
                self.events[i] = replace(event, kind="handoff")

    def _topology(self, view: ClusterView) -> None:
        """The newest topology decides which shards exist and who is configured where."""
        ids = {s.id for s in view.shards}
        for gone in [sid for sid in self.shards if sid not in ids]:
            del self.shards[gone]
        for shard in view.shards:
            track = self.shards.setdefault(shard.id, ShardTrack(shard.id))
            track.slot = shard.slot
            track.primary = normalize(shard.primary) or None
            track.backups = [normalize(b) for b in shard.backups]

    def _taken(
        self,
        track: ShardTrack,
        epoch: int,
        owner: str,
        owner_id: str | None,
        now_ms: int,
    ) -> Event | None:
        first = not track.seen
        track.seen = True
        before, before_id, released = track.owner, track.owner_id, track.released
        track.released = False
        start = track.held_ms if track.held_ms is not None else track.unowned_since_ms
        track.epoch, track.owner, track.owner_id = epoch, owner, owner_id
        track.since_ms = track.held_ms = now_ms
        track.unowned_since_ms = None
        if first:
            return None  # the first sight of this shard: nothing changed hands under our eyes
        kind: EventKind
        if before is None:
            kind = "acquired"
        elif released:
            kind = "handoff"
        else:
            kind = "failover"
        gap = None if start is None else now_ms - start
        return Event(now_ms, kind, track.id, epoch, before, before_id, owner, owner_id, gap)

    def keep_only(self, node_ids: set[str]) -> None:
        """Drop the views of nodes the watcher forgot."""
        for url in [u for u, r in self.reporters.items() if r.node_id not in node_ids]:
            del self.reporters[url]

    # -- views for the browser feed ---------------------------------------------------------
    def shard_rows(
        self, now_ms: int, telemetry: dict[str, tuple[str, Status, bool]]
    ) -> list[dict[str, Any]]:
        rows = []
        for track in sorted(self.shards.values(), key=lambda t: (t.slot, t.id)):
            # An owner whose lease ran out as last seen, and that does not report up itself.
            owner_tele = telemetry.get(track.owner or "")
            expired = (
                track.expires_at_ms is not None
                and track.expires_at_ms <= now_ms
                and (owner_tele is None or owner_tele[1] != "up")
            )
            rows.append(
                {
                    "id": track.id,
                    "slot": track.slot,
                    "primary": track.primary,
                    "backups": track.backups,
                    "owner": None if expired else track.owner,
                    "owner_id": None if expired else track.owner_id,
                    "last_owner": track.owner,
                    "epoch": track.epoch,
                    "since_ms": track.since_ms,
                    "unowned_since_ms": track.unowned_since_ms,
                    "channels": track.channels,
                }
            )
        return rows

    def node_cards(
        self,
        now_ms: int,
        telemetry: dict[str, tuple[str, Status, bool]],
    ) -> list[dict[str, Any]]:
        """One card per node known from telemetry or from any view.

        `telemetry`: normalised URL -> (node id, the watcher's status of it, whether it said it
        stopped). A peer's view counts while the peer itself is not down to the watcher.
        """
        # One pass over every view, freshest first: per node, the freshest facts any view has,
        # the freshest opinion of a fresh peer, and the lag its primary reports.
        seen: dict[str, _Seen] = {url: _Seen() for url in telemetry}
        for rep in sorted(self.reporters.values(), key=lambda r: -r.received_ms):
            peer = telemetry.get(rep.url)
            fresh = peer is not None and peer[1] != "down"
            for member in rep.view.nodes:
                url = normalize(member.url)
                info = seen.setdefault(url, _Seen())
                if info.member is None:
                    info.member = member
                if rep.url != url and fresh and info.peer_status is None:
                    info.peer_status = member.status
                if info.lag is None and member.lag is not None:
                    info.lag = dict(member.lag)
        for track in self.shards.values():
            for configured in (track.primary, *track.backups):
                if configured:
                    seen.setdefault(configured, _Seen())
        owned: dict[str, list[dict[str, Any]]] = {}
        primaries: set[str] = set()
        for row in self.shard_rows(now_ms, telemetry):
            if row["owner"]:
                owned.setdefault(row["owner"], []).append(
                    {"shard": row["id"], "epoch": row["epoch"]}
                )
            for url in (row["primary"], row["last_owner"]):
                if url:
                    primaries.add(url)
        return [
            self._card(url, seen[url], telemetry.get(url), owned, primaries)
            for url in sorted(seen)[:MAX_CLUSTER_NODES]
        ]

    def _card(
        self,
        url: str,
        seen: _Seen,
        tele: tuple[str, Status, bool] | None,
        owned: dict[str, list[dict[str, Any]]],
        primaries: set[str],
    ) -> dict[str, Any]:
        member = seen.member
        role: str = member.role if member is not None else "unassigned"
        # A node that reports is the best judge of its own role.
        own = self.reporters.get(url)
        mine = own.view.node if own is not None else None
        if mine is not None and mine.role and tele is not None and tele[1] != "down":
            role = mine.role
        is_primary = url in primaries or role == "primary"
        status = _card_status(tele, seen.peer_status, is_primary)
        return {
            "url": url,
            "id": tele[0] if tele else (member.id if member else None),
            "role": role,
            "shards": list(member.shards) if member else [],
            "owns": owned.get(url, []) if status not in ("down", "failed") else [],
            "status": status,
            "telemetry": tele[1] if tele else None,
            "peer_status": seen.peer_status,
            "lag": seen.lag if role == "backup" else None,
            "heartbeat_age_ms": member.heartbeat_age_ms if member else None,
            "applied_version": member.applied_version if member else None,
        }

    def picture(
        self, now_ms: int, telemetry: dict[str, tuple[str, Status, bool]]
    ) -> dict[str, Any]:
        return {
            "version": self.version,
            "shards": self.shard_rows(now_ms, telemetry),
            "nodes": self.node_cards(now_ms, telemetry),
            "timeline": [e.as_dict() for e in reversed(self.events)],
        }


def _card_status(
    tele: tuple[str, Status, bool] | None, peers: str | None, is_primary: bool
) -> CardStatus:
    """Telemetry first (a node that reports is up to the watcher), the peers' view second."""
    if tele is not None:
        _, status, stopped = tele
        if status != "down":
            return status
        if stopped:
            return "down"
        if peers == "up":
            return "suspect"  # silent to the watcher, yet its peers see it: not dead
        return "failed" if is_primary else "down"
    if peers is None or peers == "up":
        return "up" if peers == "up" else "down"
    if peers == "down" and is_primary:
        return "failed"
    return "suspect" if peers == "suspect" else "down"
