"""The mirror's parts without a network: the engine's journal, the backup's mirror, the sender.

A real engine on SQLite with the clock in the test's hands emits deltas; a `Mirror` applies them
as a backup would (encoded and decoded on the way, as on the wire) and must hold what the
engine holds: counts, leases with their attempts and deadlines, the head of the ready window.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import msgspec
import pytest

from app.cluster.heartbeat import HEARTBEAT_PATH, HeartbeatSender
from app.cluster.journal import (
    HEAD_LIMIT,
    Answer,
    Heartbeat,
    Journal,
    ShardLog,
    Snapshot,
)
from app.cluster.liveness import Liveness
from app.cluster.mirror import Follower, Mirror, snapshot_path
from app.engine.channel import ChannelState
from app.engine.ids import receipt
from app.errors import Fenced
from app.models import Lease
from tests.test_engine import Env, msg

SHARD = "s1"
_enc = msgspec.json.Encoder()
_hb = msgspec.json.Decoder(Heartbeat)
_snap = msgspec.json.Decoder(Snapshot)


def rc(leases: list[Lease]) -> list[str]:
    return [receipt(lease.message.id, lease.attempt) for lease in leases]


def wire_hb(hb: Heartbeat) -> Heartbeat:
    return _hb.decode(_enc.encode(hb))


class Pair:
    """An owner's engine with a journal, and a backup's mirror fed by hand."""

    def __init__(self, env: Env) -> None:
        self.env = env
        self.journal = Journal(lambda name: SHARD, bound=1000)
        self.log = self.journal.open(SHARD, 1)
        env.engine.journal = self.journal
        self.liveness = Liveness(0)
        self.mirror = Mirror(self.liveness)
        self.acked: int | None = None
        self.now = 0

    def snapshot(self) -> Snapshot:
        snap = self.journal.snapshot(SHARD, "owner", self.env.engine.channels)
        return _snap.decode(_enc.encode(snap))

    def beat(self, epoch: int = 1) -> Answer:
        """One heartbeat, as the sender builds it; a snapshot is installed when asked for."""
        self.now += 100
        base = self.log.seq if self.acked is None else self.acked
        deltas = self.log.since(base)
        if deltas is None:
            base, deltas = -1, []
        hb = Heartbeat(SHARD, epoch, "owner", "http://owner", base, self.log.seq, deltas)
        answer = self.mirror.receive(wire_hb(hb), self.now)
        if answer.snapshot:
            assert self.mirror.install(self.snapshot(), "http://owner")
            self.acked = None
        else:
            self.acked = answer.applied
        return answer

    def converge(self) -> None:
        for _ in range(4):
            if self.beat().applied == self.log.seq:
                return
        raise AssertionError("the mirror did not converge in 4 beats")

    def check(self) -> None:
        """The mirror holds what the engine holds."""
        self.converge()
        m = self.mirror.shards[SHARD]
        engine = self.env.engine.channels
        assert set(m.channels) == set(engine)
        for name, ch in engine.items():
            mc = m.channels[name]
            assert (mc.total, mc.delayed) == (ch.total, ch.delayed), name
            assert mc.settings.max_attempts == ch.config.max_attempts
            assert mc.leases == {i: (le.attempt, le.deadline) for i, le in ch.leases.items()}
            assert mc.head == sorted(ch.ready)[:HEAD_LIMIT], name


@pytest.fixture
async def pair(tmp_path: Path) -> AsyncIterator[Pair]:
    env = Env(tmp_path / "owner.db")
    await env.open()
    try:
        yield Pair(env)
    finally:
        await env.engine.stop()
        await env.store.close()


def test_log_is_bounded_and_says_when_it_no_longer_reaches_back() -> None:
    log = ShardLog(SHARD, 1, bound=3)
    journal = Journal(lambda name: SHARD)
    journal.logs[SHARD] = log
    for i in range(5):
        journal.dropped(f"c{i}")
    assert log.seq == 5
    assert [d.channel for d in log.since(3) or []] == ["c3", "c4"]  # type: ignore[union-attr]
    assert log.since(5) == []
    assert log.since(2) is not None and log.since(1) is None  # 3 held: 3, 4, 5
    assert log.since(6) is None  # ahead of the log: a stale backup


async def test_no_journal_when_no_shard_is_mirrored(tmp_path: Path) -> None:
    env = Env(tmp_path / "plain.db")
    engine = await env.open()
    try:
        assert engine.journal is None
        await engine.enqueue("jobs", [msg(1)])
        await engine.dequeue("jobs", 1, 0, None)
    finally:
        await engine.stop()
        await env.store.close()


async def test_deltas_keep_the_mirror_equal_to_the_engine(pair: Pair) -> None:
    engine, env = pair.env.engine, pair.env
    await engine.enqueue("jobs", [msg(i) for i in range(10)])
    pair.check()
    leases = await engine.dequeue("jobs", 4, 0, None)
    pair.check()
    await engine.ack("jobs", rc(leases[:2]))
    pair.check()
    await engine.nack("jobs", rc(leases[2:3]), 0, False)  # ready again
    await engine.nack("jobs", rc(leases[3:4]), 5_000, False)  # delayed
    pair.check()
    more = await engine.dequeue("jobs", 3, 0, 1_000)
    await engine.extend("jobs", rc(more[:1]), 60_000)
    pair.check()
    await env.tick(5_001)  # two leases expire, the delayed one falls due
    pair.check()
    await engine.give_back("jobs", await engine.dequeue("jobs", 1, 0, None))  # consumer gone
    pair.check()
    await engine.configure("jobs", {"max_attempts": 1})
    await engine.dequeue("jobs", 2, 0, 1_000)  # attempts used up: dead-lettered
    await env.tick(1_001)  # (at delivery, or when these leases expire)
    pair.check()
    assert pair.mirror.shards[SHARD].channels["jobs.dlq"].total > 0
    await engine.purge("jobs")
    pair.check()
    await engine.delete_channel("jobs.dlq")
    pair.check()
    assert "jobs.dlq" not in pair.mirror.shards[SHARD].channels


async def test_gap_old_epoch_and_resync(pair: Pair) -> None:
    engine = pair.env.engine
    await engine.enqueue("a", [msg(1)])
    assert pair.beat().snapshot  # nothing mirrored yet: snapshot
    pair.converge()
    seq = pair.log.seq
    await engine.enqueue("a", [msg(2)])
    await engine.enqueue("a", [msg(3)])
    # A heartbeat from past what the mirror holds: it answers with what it holds, applies none.
    hb = Heartbeat(SHARD, 1, "owner", "u", seq + 1, seq + 2, pair.log.since(seq + 1) or [])
    assert pair.mirror.receive(wire_hb(hb), 1001) == Answer(applied=seq)
    # In order from there: applied; a repeat of the same deltas is harmless.
    hb = Heartbeat(SHARD, 1, "owner", "u", seq, seq + 2, pair.log.since(seq) or [])
    assert pair.mirror.receive(wire_hb(hb), 1002) == Answer(applied=seq + 2)
    assert pair.mirror.receive(wire_hb(hb), 1003) == Answer(applied=seq + 2)
    assert pair.mirror.shards[SHARD].channels["a"].total == 3
    # base -1 (the owner's journal no longer reaches back): snapshot.
    hb = Heartbeat(SHARD, 1, "owner", "u", -1, seq + 2, [])
    assert pair.mirror.receive(wire_hb(hb), 1004).snapshot
    # A new epoch (a new owner): snapshot; then the old epoch is refused, and is no beat.
    hb = Heartbeat(SHARD, 2, "owner2", "u2", seq + 2, seq + 2, [])
    assert pair.mirror.receive(wire_hb(hb), 1005).snapshot
    assert pair.liveness.last(SHARD) == 1005
    hb = Heartbeat(SHARD, 1, "owner", "u", seq + 2, seq + 2, [])
    with pytest.raises(Fenced):
        pair.mirror.receive(wire_hb(hb), 1006)
    assert pair.liveness.last(SHARD) == 1005
    assert pair.mirror.refused == 1
    # A snapshot of the deposed epoch is not installed either.
    assert not pair.mirror.install(pair.snapshot(), "u")


async def test_epoch_seen_elsewhere_fences_heartbeats(pair: Pair) -> None:
    pair.mirror.note_epoch(SHARD, 7)
    hb = Heartbeat(SHARD, 6, "owner", "u", 0, 0, [])
    with pytest.raises(Fenced):
        pair.mirror.receive(hb, 1)
    assert pair.liveness.last(SHARD) is None


async def test_a_delta_for_an_unknown_channel_asks_for_a_snapshot(pair: Pair) -> None:
    await pair.env.engine.enqueue("a", [msg(1)])
    pair.converge()
    seq = pair.log.seq
    del pair.mirror.shards[SHARD].channels["a"]  # as if the mirror had missed its start
    await pair.env.engine.enqueue("a", [msg(2)])
    hb = Heartbeat(SHARD, 1, "owner", "u", seq, pair.log.seq, pair.log.since(seq) or [])
    assert pair.mirror.receive(wire_hb(hb), 1).snapshot
    pair.check()


async def test_reconcile_counts_what_the_mirror_missed(pair: Pair) -> None:
    engine = pair.env.engine
    await engine.enqueue("a", [msg(i) for i in range(3)])
    await engine.enqueue("b", [msg(1)])
    await engine.dequeue("a", 2, 0, None)
    pair.check()
    channels: dict[str, ChannelState] = dict(engine.channels)
    mirror = pair.mirror
    assert mirror.reconcile(SHARD, channels).differences == 0
    # Again with a mirror that missed a channel, a lease and holds an extra channel.
    pair.acked = None
    pair.converge()
    m = mirror.shards[SHARD]
    del m.channels["b"]
    m.channels["gone"] = m.channels["a"]
    m.channels["a"].leases.popitem()
    found = mirror.reconcile(SHARD, channels)
    assert (found.channels_missing, found.channels_extra, found.leases) == (1, 1, 1)
    assert mirror.reconcile_differences == found.differences
    assert SHARD not in mirror.shards  # the owner serves the store's state now


async def test_sender_resyncs_a_backup_past_the_bound(tmp_path: Path) -> None:
    """The sender against a backup behind an in-memory transport: converges, then a backup
    the journal no longer reaches back to is resynced by snapshot; the lag is in beats."""
    env = Env(tmp_path / "owner.db")
    engine = await env.open()
    mirror = Mirror(Liveness(0))
    clock = [0]
    follower: Follower
    sender: HeartbeatSender

    async def route(request: httpx.Request) -> httpx.Response:
        if request.url.path == HEARTBEAT_PATH:
            answer = follower.heartbeat(_hb.decode(request.content))
            return httpx.Response(200, content=_enc.encode(answer))
        assert request.url.path == snapshot_path(SHARD)
        return httpx.Response(200, content=_enc.encode(sender.snapshot(SHARD)))

    async with httpx.AsyncClient(transport=httpx.MockTransport(route)) as http:
        follower = Follower(mirror, http, "secret", lambda: clock[0])
        journal = Journal(lambda name: SHARD, bound=10)
        sender = HeartbeatSender(
            engine=engine,
            journal=journal,
            owned=lambda: {SHARD: 3},
            backups_of=lambda shard: ["http://backup", "http://owner"],
            node_id="owner",
            node_url="http://owner/",
            secret="secret",
            heartbeat_ms=100,
            http=http,
            monotonic_ms=lambda: clock[0],
            beat_limit=3,
        )

        async def beats(n: int) -> None:
            for _ in range(n):
                clock[0] += 100
                await sender.tick(clock[0])
                await follower.settle()

        try:
            await beats(1)
            assert engine.journal is journal  # a backup exists: the hook is on
            assert list(sender.lag()) == ["http://backup"]  # never itself
            await engine.enqueue("jobs", [msg(1)])
            await beats(3)
            assert sender.lag() == {"http://backup": {SHARD: 0}}
            installed = mirror.snapshots_installed
            assert installed == 1
            assert not journal.logs[SHARD].deltas  # all acknowledged: trimmed
            for i in range(7):  # 3 deltas a beat at most: caught up over 3 beats
                await engine.enqueue("jobs", [msg(i)])
            await beats(2)
            assert sender.lag()["http://backup"][SHARD] == 2
            await beats(1)
            assert sender.lag()["http://backup"][SHARD] == 0
            assert mirror.snapshots_installed == installed  # by deltas, no snapshot
            for i in range(11):  # past the bound of 10, between two beats
                await engine.enqueue("jobs", [msg(i)])
            await beats(1)
            assert sender.lag()["http://backup"][SHARD] >= 1
            await beats(3)
            assert mirror.snapshots_installed == installed + 1
            assert sender.lag() == {"http://backup": {SHARD: 0}}
            assert mirror.shards[SHARD].channels["jobs"].total == 19
            assert mirror.lag(clock[0])[SHARD].heartbeat_age_ms == 0
        finally:
            await sender.stop()
            await follower.stop()
            await engine.stop()
            await env.store.close()
        assert engine.journal is None


async def test_a_channel_that_moves_shards_is_dropped_from_its_old_shard(tmp_path: Path) -> None:
    """After a new topology the channel is released (hand-off): its Dropped goes to the shard
    it was journaled under, and it is adopted anew under its new shard."""
    env = Env(tmp_path / "owner.db")
    engine = await env.open()
    placement = {"a": "s1"}
    journal = Journal(lambda name: placement[name])
    old, new = journal.open("s1", 1), journal.open("s2", 1)
    engine.journal = journal
    try:
        await engine.enqueue("a", [msg(1)])
        assert [type(d).__name__ for d in old.deltas] == ["Adopted", "Enqueued"]
        placement["a"] = "s2"  # the new topology moves it
        await engine.enqueue("a", [msg(2)])  # still s1's until it is handed off
        engine.release("a")
        assert [type(d).__name__ for d in old.deltas][-2:] == ["Enqueued", "Dropped"]
        assert not new.deltas
        await engine.adopt("a", engine.default_config("a"))
        assert [type(d).__name__ for d in new.deltas] == ["Adopted"]
        snap = journal.snapshot("s2", "owner", engine.channels)
        assert [c.name for c in snap.channels] == ["a"] and snap.seq == 1
        assert snap.channels[0].config.total == 2
        assert journal.snapshot("s1", "owner", engine.channels).channels == []
    finally:
        await engine.stop()
        await env.store.close()


async def test_a_journal_restarted_at_the_same_epoch_resyncs_the_backup(pair: Pair) -> None:
    """The owner's log for a shard starts again from 0 at the same epoch (its backups were
    gone for a while): the backup, ahead of it, asks for a snapshot and takes it."""
    await pair.env.engine.enqueue("a", [msg(1), msg(2)])
    pair.check()
    assert pair.mirror.shards[SHARD].seq > 0
    pair.journal.close(SHARD)
    pair.log = pair.journal.open(SHARD, 1)
    pair.acked = None
    assert pair.beat().snapshot
    assert pair.mirror.shards[SHARD].seq == 0
    await pair.env.engine.enqueue("a", [msg(3)])
    pair.check()
