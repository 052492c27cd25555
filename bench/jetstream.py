"""`--peer nats`: NATS JetStream (Debian's nats-server, run with -js on loopback by us), driven
with nats-py (asyncio).

The server runs from a temp dir (its own client port, JetStream's file store inside the dir,
no cluster, no monitoring port) and is stopped by PID. Each run gets a stream of its own: file
storage, work-queue retention (a message is removed once acked, as a queue does), one durable
pull consumer with explicit acks that every consumer of the run fetches from. A publish counts
once JetStream has acked it (stored); a batch is 100 async publishes, then their acks.
Consumers fetch up to 100 and ack each message; a drain confirms the last ack of a batch
(`ack_sync`) before its next fetch, as LionMQ's drain waits for its ack.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import subprocess
import time
from pathlib import Path
from typing import Self

import nats
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)

from bench.config import Profile
from bench.install import version
from bench.ports import ServerProcess, terminate, until_answers
from bench.shape import (
    AsyncBroker,
    Consumer,
    Publisher,
    Pull,
    Runner,
    queue_name,
    run_clients,
    runners,
)
from bench.stats import Budget, Record, Results, RunMatrix, body, log

PACKAGE = "nats-server"
SERVER = Path("/usr/sbin/nats-server")
CLIENTS = ("nats-py",)
DURABILITY = (
    "JetStream file storage, work-queue stream, a publish counts once JetStream has acked it, "
    "durable pull consumer with explicit acks (a drain confirms each batch's). Weaker than "
    "the others: nats-server 2.9 fsyncs its file store every 2 minutes and has no setting to "
    "sync each write, so an acked message survives the server's crash, not the machine's"
)
DURABLE = "bench"
# Upper bound on waiting for the acks of one batch of publishes (a lost reply must not hang).
PUBLISH_ACKS_S = 30.0


class NatsServer(ServerProcess):
    """Our own nats-server with JetStream on 127.0.0.1, its store under one temp dir."""

    NAME = "nats-server"

    def __init__(self, *, boot_timeout: float = 30.0) -> None:
        super().__init__(prefix="nats-bench-", boot_timeout=boot_timeout)
        self.url = f"nats://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        return [
            str(SERVER),
            "-js",
            "--store_dir",
            str(self.dir / "jetstream"),
            "--addr",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--server_name",
            f"bench-{self.port}",
        ]

    def start(self) -> Self:
        self.launch(self.command(), os.environ, f"nats-server's client port {self.port}")
        return self

    def end(self, proc: subprocess.Popen[bytes]) -> None:
        """SIGTERM to our server's PID (it flushes the store and exits), SIGKILL after 10 s."""
        terminate(proc, 10, group=False)


async def wait_jetstream(url: str, within_s: float) -> None:
    """The port accepts before JetStream has recovered its store: wait until it answers."""

    async def attempt() -> None:
        nc = await nats.connect(url, connect_timeout=2, allow_reconnect=False)
        try:
            await nc.jetstream().account_info()
        finally:
            await nc.close()

    await until_answers(attempt, within_s)


class JsPublisher:
    """Publishes on one connection's JetStream context; a publish counts once acked."""

    def __init__(self, js: JetStreamContext) -> None:
        self.js = js

    async def publish_batch(self, queue: str, size: int, n: int) -> None:
        """n publishes sent at once, then wait for all their acks (stored)."""
        acks = [await self.js.publish_async(queue, body(size).encode()) for _ in range(n)]
        await asyncio.wait_for(asyncio.gather(*acks), PUBLISH_ACKS_S)

    async def publish(self, queue: str, data: bytes) -> None:
        await self.js.publish(queue, data)


async def ack_all(messages: list[Msg], confirm: bool) -> None:
    """Acks each message; with `confirm`, the last one's ack is confirmed by the server, which
    handles a connection's acks in order, so the batch is acked when this returns."""
    for message in messages[:-1]:
        await message.ack()
    if confirm:
        await messages[-1].ack_sync(timeout=PUBLISH_ACKS_S)
    else:
        await messages[-1].ack()


class JsConsumer:
    def __init__(self, sub: JetStreamContext.PullSubscription) -> None:
        self.sub = sub

    async def consume(self, counter: Budget, pull: Pull, record: Record | None = None) -> None:
        """Fetches up to `pull.batch` (waiting up to `pull.wait_s` for the first) and acks
        them, until every consumer together has received `counter.total`, or its deadline.
        With `pull.confirm` (the drain, whose LionMQ consumers wait for their ack) a batch's
        acks are confirmed before the next fetch; the end-to-end and paced consumers send
        theirs without waiting, as LionMQ's."""
        while not counter.complete and not counter.expired():
            try:
                timeout = min(pull.wait_s, max(counter.left_s, 0.01))
                messages = await self.sub.fetch(pull.batch, timeout=timeout)
            except TimeoutError:  # nothing came (nats.errors.TimeoutError is one too)
                continue
            if record is not None:
                record(time.time(), [m.data for m in messages])
            counter.add(len(messages))
            await ack_all(messages, confirm=pull.confirm)


class Js(AsyncBroker[Client]):
    """Connections to one server (one per producer or consumer) and a run's streams."""

    hold_back_s = 0.002
    subscribe_s = 0.2  # the consumer is parked in its fetch before the first send

    def __init__(self, server: NatsServer) -> None:
        super().__init__(server)
        self.url = server.url

    async def context(self) -> JetStreamContext:
        nc = await nats.connect(self.url, allow_reconnect=False)
        self.connections.append(nc)
        return nc.jetstream(timeout=PUBLISH_ACKS_S)

    async def publishers(self, n: int) -> list[Publisher]:
        return [JsPublisher(await self.context()) for _ in range(n)]

    async def single_publishers(self, n: int) -> list[Publisher]:
        """n concurrent publishers sharing one connection."""
        return [JsPublisher(await self.context())] * n

    async def consumers(self, queue: str, n: int) -> list[Consumer]:
        """n pull subscriptions to `queue`'s durable consumer, each on a connection of its
        own."""
        return [
            JsConsumer(
                await (await self.context()).pull_subscribe_bind(durable=DURABLE, stream=queue)
            )
            for _ in range(n)
        ]

    async def queue(self, tag: str, max_unacked: int) -> str:
        """A file-stored work-queue stream whose subject is its name, and its durable pull
        consumer with explicit acks."""
        name = queue_name(tag)
        js = await self.context()
        await js.add_stream(
            StreamConfig(
                name=name,
                subjects=[name],
                storage=StorageType.FILE,
                retention=RetentionPolicy.WORK_QUEUE,
            )
        )
        await js.add_consumer(
            name,
            ConsumerConfig(
                durable_name=DURABLE,
                ack_policy=AckPolicy.EXPLICIT,
                ack_wait=60.0,
                max_ack_pending=max_unacked,
            ),
        )
        return name

    async def delete(self, name: str) -> None:
        with contextlib.suppress(Exception):
            js = await self.context()
            await js.delete_stream(name)


RUNNERS: dict[int, Runner[NatsServer]] = runners(Js)


async def run(
    args: argparse.Namespace,
    profile: Profile,
    results: Results,
    run_matrix: RunMatrix,
) -> str:
    """Starts, drives and stops nats-server; returns its version. Results go to
    `results["nats/nats-py"]`."""
    with NatsServer() as server:
        log(f"[nats] {version(PACKAGE)} pid {server.pid} on {server.url}")
        await wait_jetstream(server.url, server.boot_timeout)
        clients = {"nats-py": RUNNERS}
        await run_clients("nats", server, clients, args, profile, results, run_matrix)
    return version(PACKAGE)
