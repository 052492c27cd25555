"""The owner's heartbeats: every HEARTBEAT_MS, to each backup of each shard it owns, the deltas
since what that backup last acknowledged.

Per (backup, shard) the sender keeps the seq the backup holds (`acked`, None when unknown: then
it probes with the newest seq and no deltas, and the backup answers with what it holds). A
backup the journal no longer reaches back to gets `base = -1` and resyncs by snapshot. All
backups are beaten at once, each call bounded by a timeout shorter than a beat: a dead or slow
backup costs the others nothing. Lag is counted in beats: 0 while a backup confirms every beat
up to the newest seq, one more for each beat it did not.

The sender also keeps `engine.journal` in step: set while some owned shard has a backup, None
otherwise (so a node without backups pays nothing on its hot path).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass

import httpx
import msgspec

from app.cluster.journal import BEAT_LIMIT, Answer, Delta, Heartbeat, Journal, Snapshot
from app.cluster.mirror import SECRET_HEADER
from app.engine.queue import QueueEngine
from app.errors import Fenced

log = logging.getLogger("lionmq.heartbeat")

HEARTBEAT_PATH = "/cluster/internal/heartbeat"
# A beat's calls must be over before the next beat: this share of HEARTBEAT_MS at most.
_TIMEOUT_SHARE = 0.8

_encoder = msgspec.json.Encoder()
_answer_decoder = msgspec.json.Decoder(Answer)


@dataclass(slots=True)
class Peer:
    """One backup of one shard, as the owner sees it."""

    epoch: int
    acked: int | None = None
    lag: int = 0
    failing: bool = False


class HeartbeatSender:
    def __init__(
        self,
        *,
        engine: QueueEngine,
        journal: Journal,
        owned: Callable[[], dict[str, int]],
        backups_of: Callable[[str], list[str]],
        node_id: str,
        node_url: str,
        secret: str,
        heartbeat_ms: int,
        http: httpx.AsyncClient,
        monotonic_ms: Callable[[], int],
        beat_limit: int = BEAT_LIMIT,
    ) -> None:
        self.engine = engine
        self.journal = journal
        self._owned = owned
        self._backups_of = backups_of
        self.node_id = node_id
        self.node_url = node_url.rstrip("/")
        self._secret = secret
        self.heartbeat_ms = heartbeat_ms
        self._timeout = heartbeat_ms * _TIMEOUT_SHARE / 1000
        self._http = http
        self._mono = monotonic_ms
        self._beat_limit = beat_limit
        self.peers: dict[tuple[str, str], Peer] = {}  # (backup url, shard) -> state
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self.beats = 0

    # -- the loop ----------------------------------------------------------------------------
    async def start(self) -> None:
        self._stopping = False
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            # The flag as well as the cancel: a cancellation swallowed on its way (3.11's
            # wait_for, a client library's own cancel scopes) must not leave the loop beating
            # on, and the node's stop waiting for it forever.
            self._stopping = True
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        self.engine.journal = None

    async def _run(self) -> None:
        while not self._stopping:
            began = self._mono()
            try:
                await self.tick(began)
            except Exception:  # the next beat tries again; this one is in the log
                log.exception("heartbeat failed")
            wait = self.heartbeat_ms - (self._mono() - began)
            await asyncio.sleep(max(0, wait) / 1000)

    async def tick(self, now_mono: int) -> None:
        """One beat: bring the journal in step with what this node owns, then beat every
        backup of every owned shard, all at once."""
        targets = self._targets()
        await asyncio.gather(*(self._beat(backup, shard) for backup, shard in targets))
        self.beats += 1
        held: dict[str, list[int | None]] = {}
        for (_, shard), peer in self.peers.items():
            held.setdefault(shard, []).append(peer.acked)
        for shard, acked in held.items():
            known = [a for a in acked if a is not None]
            if len(known) == len(acked):  # (an unknown one may answer with an older seq)
                self.journal.logs[shard].trim(min(known))

    def _targets(self) -> list[tuple[str, str]]:
        targets: list[tuple[str, str]] = []
        for shard, epoch in self._owned().items():
            backups = {b.rstrip("/") for b in self._backups_of(shard)} - {self.node_url}
            if not backups:
                continue
            self.journal.open(shard, epoch)
            targets.extend((b, shard) for b in sorted(backups))
        wanted = {shard for _, shard in targets}
        for shard in [s for s in self.journal.logs if s not in wanted]:
            self.journal.close(shard)
        keep = set(targets)
        for key in [k for k in self.peers if k not in keep]:
            del self.peers[key]
        self.engine.journal = self.journal if self.journal.logs else None
        return targets

    async def _beat(self, backup: str, shard: str) -> None:
        log_ = self.journal.logs[shard]
        peer = self.peers.get((backup, shard))
        if peer is None or peer.epoch != log_.epoch:
            peer = self.peers[(backup, shard)] = Peer(log_.epoch)
        seq = newest = log_.seq
        deltas: list[Delta] = []
        if peer.acked is None:
            base = seq  # a probe: the backup answers with what it holds
        else:
            since = log_.since(peer.acked, self._beat_limit)
            base = -1 if since is None else peer.acked  # -1: resync by snapshot
            deltas = since or []
            if base >= 0:
                seq = base + len(deltas)
        hb = Heartbeat(shard, log_.epoch, self.node_id, self.node_url, base, seq, deltas)
        try:
            response = await self._http.post(
                backup + HEARTBEAT_PATH,
                content=_encoder.encode(hb),
                headers={SECRET_HEADER: self._secret, "Content-Type": "application/json"},
                timeout=self._timeout,
            )
            response.raise_for_status()
            answer = _answer_decoder.decode(response.content)
        except (httpx.HTTPError, msgspec.DecodeError) as exc:
            peer.lag += 1
            if not peer.failing:  # one line when it starts failing, one when it is back
                log.warning("heartbeat of %s to %s failed: %r", shard, backup, exc)
                peer.failing = True
            return
        if peer.failing:
            log.info("heartbeats of %s reach %s again", shard, backup)
            peer.failing = False
        if answer.snapshot or answer.applied is None:
            peer.acked = None
            peer.lag += 1
        else:
            peer.acked = answer.applied
            peer.lag = 0 if answer.applied >= newest else peer.lag + 1

    # -- hand-offs -----------------------------------------------------------------------------
    def behind(self, shard: str) -> dict[str, int | None]:
        """Beats each backup of the shard is behind, None for one that never acked a beat."""
        return {
            backup: None if peer.acked is None else peer.lag
            for (backup, s), peer in self.peers.items()
            if s == shard
        }

    async def catch_up(self, shard: str, backup: str, tries: int = 3) -> bool:
        """Beat one backup of the shard now, until it holds every delta up to the newest (a
        hand-off: the shard's writes are drained, so the newest stays put). Whether it does."""
        backup = backup.rstrip("/")
        log_ = self.journal.logs.get(shard)
        if log_ is None:
            return False
        for _ in range(tries):  # a probe first when its seq is unknown, then the deltas
            await self._beat(backup, shard)
            peer = self.peers.get((backup, shard))
            if peer is not None and peer.acked is not None and peer.acked >= log_.seq:
                return True
        return False

    # -- what the node shows and serves ---------------------------------------------------
    def lag(self) -> dict[str, dict[str, int]]:
        """Beats behind, per backup url and shard (GET /cluster, /metrics)."""
        out: dict[str, dict[str, int]] = {}
        for (backup, shard), peer in self.peers.items():
            # One that never confirmed a beat (just met, or resyncing) is not caught up.
            lag = peer.lag if peer.acked is not None else max(peer.lag, 1)
            out.setdefault(backup, {})[shard] = lag
        return out

    def snapshot(self, shard: str) -> Snapshot:
        """The shard's mirror image for a backup that resyncs (only while it is journaled)."""
        if shard not in self.journal.logs:
            raise Fenced(f"this node does not own shard {shard} with backups to mirror it")
        return self.journal.snapshot(shard, self.node_id, self.engine.channels)


__all__ = ["HEARTBEAT_PATH", "HeartbeatSender", "Peer"]
