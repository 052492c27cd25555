"""Hand-offs: a shard's owner gives its lease straight to an up-to-date backup.

On SIGTERM (every shard, before the server stops accepting: app/server.py) and on
`POST /cluster/shards/{id}/handoff`. One shard's hand-off, in order:

1. pick the backup (`decide.successor`: acked every heartbeat, reported up);
2. stop serving the shard here: its requests get 503 + Retry-After: 0 and its writes are
   fenced from now on; the writes under way are drained (`engine.quiesce`);
3. a last heartbeat, so the backup's mirror holds every delta (else: no hand-off, serve on);
4. `store.transfer_lease` from (this node, epoch) to (backup, epoch + 1): the store's
   compare-and-set alone decides, whatever either node believes;
5. this node lets the shard's channels go and routes the shard to the new owner (a request that
   reaches it now is forwarded there);
6. the backup is told (`POST /cluster/internal/shards/{id}/adopt`) and serves at once; without
   that call it adopts at its next tick (`Action.ADOPT`). The shard's other members are told to
   read the leases again, so they forward to the new owner before their next tick.

A hand-off that cannot be made before step 4 changes nothing (the shard is served again); on
SIGTERM the node then releases the lease as before, and a backup takes it at its next tick.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Awaitable, Callable, Sequence

import httpx
import msgspec

from app.cluster.decide import (
    Candidate,
    Refusal,
    handoff_refusal,
    status_of,
    successor,
    worth_waiting,
)
from app.cluster.heartbeat import HeartbeatSender
from app.cluster.keeper import HandoffRecord, MemberDoc, OwnershipKeeper
from app.engine.queue import QueueEngine
from app.errors import HandoffRefused, LionMQError
from app.settings import CLUSTER_SECRET_HEADER
from app.store.base import Store

log = logging.getLogger("lionmq.cluster")

# The new owner's adoption is awaited this long before the hand-off is reported (it serves
# whenever it is done; after this, its next tick adopts in any case).
_ADOPT_TIMEOUT_S = 2.0
# Telling the other members to look again: a hint, bounded, never waited on for long.
_LOOK_TIMEOUT_S = 0.5


def adopt_path(shard: str) -> str:
    return f"/cluster/internal/shards/{shard}/adopt"


def look_path(shard: str) -> str:
    return f"/cluster/internal/shards/{shard}/look"


class Adopt(msgspec.Struct, forbid_unknown_fields=True):
    """The old owner's call to the new one: the lease is yours at `epoch`."""

    epoch: int
    from_url: str = msgspec.field(name="from")


class Adopted(msgspec.Struct):
    served: bool


class Handover:
    def __init__(
        self,
        *,
        keeper: OwnershipKeeper,
        engine: QueueEngine,
        store: Store,
        sender: HeartbeatSender,
        http: httpx.AsyncClient,
        secret: str,
        members: Callable[[], Awaitable[dict[str, tuple[int, MemberDoc]]]],
        backups_of: Callable[[str], Sequence[str]],
        peers: Callable[[], Sequence[str]],
    ) -> None:
        self.keeper = keeper
        self.engine = engine
        self.store = store
        self.sender = sender
        self.http = http
        self.secret = secret
        self.members = members
        self.backups_of = backups_of
        self.peers = peers
        self._headers = {CLUSTER_SECRET_HEADER: secret}

    async def leave(self) -> None:
        """SIGTERM: hand every shard this node serves to an up-to-date backup, one by one, each
        unavailable only for its own hand-off. A shard that cannot be handed is released now
        when it has backups (one takes it at its next tick); one without (a lone node, the
        implicit shard) is served until the node exits and released then, as before, so its
        requests under way finish. Nothing is taken from here on."""
        keeper = self.keeper
        keeper.leaving = True
        await keeper.report()  # so that no owner hands a shard to this node meanwhile
        for shard in sorted(keeper.held):
            try:
                await self._hand_off_soon(shard)
            except LionMQError as exc:
                if not self.backups_of(shard):
                    continue  # released by the lifespan's exit, after the requests under way
                log.warning("shard %s: no hand-off (%s); releasing it", shard, exc.detail)
                await keeper.let_go(shard)

    async def _hand_off_soon(self, shard: str) -> None:
        """Hand the shard off; while its backups are up but not up to date (one just restarted
        and still resyncing: a rolling restart that did not wait for it), try again each
        heartbeat for up to 2 x LEASE_MS, serving the shard meanwhile."""
        keeper = self.keeper
        deadline = keeper.mono() + 2 * keeper.lease_ms
        while True:
            try:
                await self.hand_off(shard)
                return
            except HandoffRefused:
                if keeper.mono() >= deadline or shard not in keeper.held:
                    raise
                members = await self.members()
                if not worth_waiting(self._candidates(shard, members)):
                    raise
            await asyncio.sleep(keeper.heartbeat_ms / 1000)

    async def hand_off(self, shard: str, wanted: str | None = None) -> HandoffRecord:
        """Hand `shard` to an up-to-date backup (`wanted`, if given). HandoffRefused when none
        is, or when this node does not serve the shard; then nothing changed."""
        keeper = self.keeper
        # The reports first: from the check on, nothing awaits until the shard is marked as
        # being handed off, so a second hand-off asked meanwhile is refused, not run alongside.
        members = await self.members()
        h = keeper.held.get(shard)
        refusal = handoff_refusal(
            held=h.held if h else None,
            adopted=h.adopted if h else False,
            handing=h.handing if h else False,
            now_mono=keeper.mono(),
            lease_ms=keeper.lease_ms,
        )
        if refusal is not None or h is None:
            raise HandoffRefused(_refused(shard, refusal))
        to = successor(self._candidates(shard, members), wanted)
        if isinstance(to, Refusal):
            raise HandoffRefused(_refused(shard, to))
        to_id = members[to][1].id  # an up candidate has a report
        began = keeper.mono()
        keeper.begin_handoff(shard)
        steps = [began]  # when each step ended, for the log: where a slow hand-off's time went
        try:
            await self.engine.quiesce()
            steps.append(keeper.mono())
            if not await self.sender.catch_up(shard, to):
                raise HandoffRefused(
                    f"shard {shard}: {to} did not confirm the last heartbeat; it stays here"
                )
            steps.append(keeper.mono())
            lease = await self.store.transfer_lease(
                shard, keeper.node_id, h.held.epoch, to_id, to, keeper.lease_ms
            )
            steps.append(keeper.mono())
        except BaseException:
            keeper.abandon_handoff(shard, h)
            raise
        if lease is None:  # the store gave it to another meanwhile (a takeover): not ours
            await keeper.let_go(shard, release=False)
            raise HandoffRefused(f"shard {shard}: this node no longer holds its lease")
        record = HandoffRecord(shard, keeper.url, to, lease.epoch, 0, 0)
        await keeper.handed(shard, lease, record)
        served = await self._tell(shard, lease.epoch, to)
        steps.append(keeper.mono())
        record.took_ms = steps[-1] - began
        record.at = await self.store.store_time_ms()
        drained, beaten, moved, adopted = (b - a for a, b in itertools.pairwise(steps))
        log.info(
            "shard %s: handed to %s at epoch %d in %d ms (writes drained in %d, last heartbeat"
            " %d, lease transferred %d, %s %d)",
            shard,
            to,
            lease.epoch,
            record.took_ms,
            drained,
            beaten,
            moved,
            "serving there after" if served else "not told; it adopts at its next tick, after",
            adopted,
        )
        await keeper.report()
        return record

    def _candidates(self, shard: str, members: dict[str, tuple[int, MemberDoc]]) -> list[Candidate]:
        behind = self.sender.behind(shard)
        lease_ms = self.keeper.lease_ms
        out = []
        for url in self.backups_of(shard):
            age, doc = members.get(url, (None, None))
            up = (
                doc is not None
                and not (doc.stopped or doc.leaving)
                and status_of(age, lease_ms) == "up"
            )
            out.append(Candidate(url, behind.get(url.rstrip("/")), up))
        return out

    async def _tell(self, shard: str, epoch: int, to: str) -> bool:
        """Tell the new owner to adopt (whether it serves now) and every other node of the
        cluster to read the leases again (each forwards the shard's requests). A call that
        fails is logged: the new owner's tick adopts anyway, the others' ticks see the lease,
        and the store's lease was the truth all along."""
        others = [u for u in self.peers() if u != to]
        adopt = self._post(to + adopt_path(shard), Adopt(epoch, self.keeper.url), _ADOPT_TIMEOUT_S)
        looks = (self._post(u + look_path(shard), None, _LOOK_TIMEOUT_S) for u in others)
        answers = await asyncio.gather(adopt, *looks)
        raw = answers[0]
        if raw is None:
            return False
        try:
            return msgspec.json.decode(raw, type=Adopted).served
        except msgspec.DecodeError:
            log.warning("shard %s: %s answered the hand-off with %r", shard, to, raw[:200])
            return False

    async def _post(self, url: str, body: object, wait_s: float) -> bytes | None:
        try:
            response = await self.http.post(
                url,
                content=msgspec.json.encode(body),
                headers={**self._headers, "Content-Type": "application/json"},
                timeout=wait_s,
            )
        except httpx.HTTPError as exc:
            log.warning("hand-off call to %s failed: %r", url, exc)
            return None
        if response.status_code != 200:
            log.warning("hand-off call to %s answered %d", url, response.status_code)
            return None
        return response.content


def _refused(shard: str, refusal: Refusal | None) -> str:
    return f"shard {shard} is not handed off: {refusal.reason if refusal else 'not held'}"


__all__ = [
    "Adopt",
    "Adopted",
    "Handover",
    "adopt_path",
    "look_path",
]
