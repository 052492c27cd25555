"""Mirroring over real HTTP: an owner and a backup, each a uvicorn server on a loopback port,
the owner's engine under enqueue/dequeue/ack traffic, heartbeats every 50 ms.

The backup's mirror must converge (lag 0, the engine's state) within a few beats, a restarted
backup must resync by snapshot, and the internal routes must refuse a wrong or missing secret.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import httpx
import pytest
import uvicorn
from fastapi import FastAPI

from app.api import internal, problems
from app.cluster.heartbeat import HEARTBEAT_PATH, HeartbeatSender
from app.cluster.journal import HEAD_LIMIT, Journal
from app.cluster.liveness import Liveness
from app.cluster.mirror import SECRET_HEADER, Follower, Mirror, snapshot_path
from app.engine.ids import receipt
from app.engine.queue import QueueEngine
from tests.conftest import free_port
from tests.test_engine import Env, msg

SHARD = "s1"
SECRET = "s3cret-of-the-cluster"
BEAT_MS = 50


def mono() -> int:
    return time.monotonic_ns() // 1_000_000


async def eventually(predicate: Callable[[], bool], within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out after {within}s waiting for {what}")


class Peer:
    """One node: an engine, its heartbeat sender and mirror, the internal routes on uvicorn."""

    def __init__(
        self,
        path: Path,
        port: int,
        owned: dict[str, int],
        backups: list[str],
        http: httpx.AsyncClient,
    ) -> None:
        self.env = Env(path)
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.mirror = Mirror(Liveness(mono()))
        self.follower = Follower(self.mirror, http, SECRET, mono)
        self.sender = HeartbeatSender(
            engine=self.env.engine,
            journal=Journal(lambda name: SHARD),
            owned=lambda: owned,
            backups_of=lambda shard: backups,
            node_id=f"node-{port}",
            node_url=self.url,
            secret=SECRET,
            heartbeat_ms=BEAT_MS,
            http=http,
            monotonic_ms=mono,
        )
        app = FastAPI()
        problems.install(app)
        app.include_router(internal.router(SECRET))
        app.state.mirroring = internal.Mirroring(
            self.follower, self.sender, lambda shard, owner: None, 1 << 20
        )
        config = uvicorn.Config(
            app, host="127.0.0.1", port=port, log_level="warning", lifespan="off"
        )
        self.server = uvicorn.Server(config)
        self.task: asyncio.Task[None] | None = None

    @property
    def engine(self) -> QueueEngine:
        return self.env.engine

    async def start(self, *, beating: bool = True) -> Peer:
        await self.env.open()
        self.task = asyncio.create_task(self.server.serve())
        await eventually(lambda: self.server.started, 10, f"server on {self.port}")
        if beating:
            await self.sender.start()
        return self

    async def stop(self) -> None:
        await self.sender.stop()
        await self.follower.stop()
        self.server.should_exit = True
        if self.task is not None:
            await self.task
        await self.env.engine.stop()
        await self.env.store.close()


def mirrored(owner: Peer, backup: Peer) -> bool:
    """The backup's mirror holds what the owner's engine holds, and the owner sees lag 0."""
    if owner.sender.lag().get(backup.url, {}).get(SHARD) != 0:
        return False
    m = backup.mirror.shards.get(SHARD)
    if m is None or set(m.channels) != set(owner.engine.channels):
        return False
    for name, ch in owner.engine.channels.items():
        mc = m.channels[name]
        leases = {i: (le.attempt, le.deadline) for i, le in ch.leases.items()}
        if (mc.total, mc.delayed, mc.leases) != (ch.total, ch.delayed, leases):
            return False
        if mc.head != sorted(ch.ready)[:HEAD_LIMIT]:
            return False
    return True


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient() as client:
        yield client


async def traffic(engine: QueueEngine, rounds: int) -> int:
    """Producers and a consumer on three channels; returns how many were acked."""
    acked = 0
    for i in range(rounds):
        for name in ("a", "b", "c"):
            await engine.enqueue(name, [msg(i), msg(i + 1)])
            leases = await engine.dequeue(name, 3, 0, None)
            keep = leases[:1]  # one stays in flight
            rest = [receipt(le.message.id, le.attempt) for le in leases[1:]]
            if rest:
                acked += (await engine.ack(name, rest)).done
            if i % 5 == 0 and keep:
                await engine.nack(name, [receipt(keep[0].message.id, keep[0].attempt)], 0, False)
        await asyncio.sleep(0.005)
    return acked


async def test_backup_converges_and_resyncs_after_a_restart(
    tmp_path: Path, http: httpx.AsyncClient
) -> None:
    backup_port = free_port()
    backup_url = f"http://127.0.0.1:{backup_port}"
    owner = Peer(tmp_path / "owner.db", free_port(), {SHARD: 4}, [backup_url], http)
    backup = Peer(tmp_path / "backup.db", backup_port, {}, [], http)
    await owner.start()
    await backup.start()
    try:
        assert await traffic(owner.engine, 30) > 0
        await eventually(lambda: mirrored(owner, backup), 5, "the mirror to converge")
        lag = backup.mirror.lag(mono())[SHARD]
        assert lag.epoch == 4 and lag.channels == 3
        assert lag.heartbeat_age_ms is not None and lag.heartbeat_age_ms < 1000
        # The backup restarts with an empty mirror: resynced by snapshot, then deltas again.
        await backup.stop()
        await traffic(owner.engine, 5)
        await eventually(
            lambda: owner.sender.lag()[backup_url][SHARD] >= 2, 5, "the owner to see lag"
        )
        backup = Peer(tmp_path / "backup2.db", backup_port, {}, [], http)
        await backup.start()
        await eventually(lambda: mirrored(owner, backup), 5, "the restarted mirror")
        assert backup.mirror.snapshots_installed == 1
        await traffic(owner.engine, 10)
        await eventually(lambda: mirrored(owner, backup), 5, "deltas after the snapshot")
        assert backup.mirror.snapshots_installed == 1  # followed by deltas, not snapshots
    finally:
        await backup.stop()
        await owner.stop()


async def test_internal_routes_need_the_cluster_secret(
    tmp_path: Path, http: httpx.AsyncClient
) -> None:
    node = await Peer(tmp_path / "n.db", free_port(), {SHARD: 1}, [], http).start()
    try:
        body = b'{"shard":"s1","epoch":1,"owner_id":"x","owner_url":"http://127.0.0.1:9","base":0,"seq":0,"deltas":[]}'
        for headers in ({}, {SECRET_HEADER: "wrong"}, {SECRET_HEADER: ""}):
            r = await http.post(node.url + HEARTBEAT_PATH, content=body, headers=headers)
            assert r.status_code == 401, r.text
            assert r.headers["content-type"] == "application/problem+json"
            r = await http.get(node.url + snapshot_path(SHARD), headers=headers)
            assert r.status_code == 401
        r = await http.post(
            node.url + HEARTBEAT_PATH, content=body, headers={SECRET_HEADER: SECRET}
        )
        assert r.status_code == 200 and r.json() == {"snapshot": True}
        # A shard this node does not mirror out (no backups): no snapshot, and no 500.
        r = await http.get(node.url + snapshot_path(SHARD), headers={SECRET_HEADER: SECRET})
        assert r.status_code == 503, r.text
        r = await http.post(
            node.url + HEARTBEAT_PATH, content=b"{", headers={SECRET_HEADER: SECRET}
        )
        assert r.status_code == 400, r.text
    finally:
        await node.stop()


async def test_a_dead_backup_does_not_slow_the_others(
    tmp_path: Path, http: httpx.AsyncClient
) -> None:
    """One backup accepts connections and never answers: each beat still ends within the
    beat, and the live backup keeps lag 0 while the dead one's lag grows by one a beat."""
    hung: list[asyncio.StreamWriter] = []

    async def never_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        hung.append(writer)

    silent = await asyncio.start_server(never_answer, "127.0.0.1", 0)
    dead_url = f"http://127.0.0.1:{silent.sockets[0].getsockname()[1]}"
    live_port = free_port()
    live_url = f"http://127.0.0.1:{live_port}"
    owner = Peer(tmp_path / "owner.db", free_port(), {SHARD: 1}, [dead_url, live_url], http)
    live = Peer(tmp_path / "live.db", live_port, {}, [], http)
    await owner.start(beating=False)  # beats driven by hand below
    await live.start()
    try:
        await owner.engine.enqueue("a", [msg(1)])
        for _ in range(4):
            began = time.monotonic()
            await owner.sender.tick(mono())
            assert time.monotonic() - began < BEAT_MS / 1000 * 0.8 + 0.15
            await live.follower.settle()
        assert owner.sender.lag() == {dead_url: {SHARD: 4}, live_url: {SHARD: 0}}
        assert mirrored_channels(live) == {"a"}
    finally:
        await live.stop()
        await owner.stop()
        for writer in hung:
            writer.close()
        silent.close()
        await silent.wait_closed()


def mirrored_channels(peer: Peer) -> set[str]:
    m = peer.mirror.shards.get(SHARD)
    return set(m.channels) if m is not None else set()
