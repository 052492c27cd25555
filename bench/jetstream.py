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
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import TracebackType

import nats
import psutil
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    PubAck,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)

from bench.config import Profile
from bench.install import version
from bench.ports import accepts, free_port, spawn, wait_ready
from bench.stats import (
    Budget,
    Metrics,
    PeakRss,
    Record,
    Results,
    RunMatrix,
    RunResult,
    body,
    latency_metrics,
    long_queue_result,
    measured,
    recorder,
)

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
# A drain's fetch: the stream is full, so only the last fetches wait (as LionMQ's drain
# dequeues without waiting, its consumers end as soon as the channel is empty).
DRAIN_WAIT_S = 0.05
# Upper bound on waiting for the acks of one batch of publishes (a lost reply must not hang).
PUBLISH_ACKS_S = 30.0


def log(message: str) -> None:
    print(message, flush=True, file=sys.stderr)


class NatsServer:
    """Our own nats-server with JetStream on 127.0.0.1, its store under one temp dir."""

    def __init__(self, *, boot_timeout: float = 30.0) -> None:
        self.port = free_port()
        self.url = f"nats://127.0.0.1:{self.port}"
        self.boot_timeout = boot_timeout
        self.dir = Path(tempfile.mkdtemp(prefix="nats-bench-"))
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

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

    def start(self) -> NatsServer:
        with (self.dir / "server.out").open("wb") as out:
            self.proc = spawn(self.command(), dict(os.environ), self.dir, out)
        what = f"nats-server's client port {self.port}"
        wait_ready(self._accepting, self.boot_timeout, what, self.stop)
        return self

    def _accepting(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            tail = (self.dir / "server.out").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"nats-server exited with {self.proc.returncode}: {tail}")
        return accepts(self.port)

    def rss_bytes(self) -> int:
        return int(psutil.Process(self.pid).memory_info().rss)

    def stop(self) -> None:
        """SIGTERM to our server's PID (it flushes the store and exits), SIGKILL after 10 s."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> NatsServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


async def wait_jetstream(url: str, within_s: float) -> None:
    """The port accepts before JetStream has recovered its store: wait until it answers."""
    deadline = time.monotonic() + within_s
    while True:
        try:
            nc = await nats.connect(url, connect_timeout=2, allow_reconnect=False)
            try:
                await nc.jetstream().account_info()
                return
            finally:
                await nc.close()
        except Exception:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


class Js:
    """Connections to one server (one per producer or consumer) and a run's stream."""

    def __init__(self, server: NatsServer) -> None:
        self.server = server
        self.connections: list[Client] = []

    async def context(self) -> JetStreamContext:
        nc = await nats.connect(self.server.url, allow_reconnect=False)
        self.connections.append(nc)
        return nc.jetstream(timeout=PUBLISH_ACKS_S)

    async def contexts(self, n: int) -> list[JetStreamContext]:
        """n JetStream contexts, each on a connection of its own, opened before a run's clock
        starts."""
        return [await self.context() for _ in range(n)]

    async def subscriptions(self, stream: str, n: int) -> list[JetStreamContext.PullSubscription]:
        """n pull subscriptions to `stream`'s durable consumer, each on a connection of its
        own, bound before a run's clock starts."""
        return [
            await js.pull_subscribe_bind(durable=DURABLE, stream=stream)
            for js in await self.contexts(n)
        ]

    async def stream(self, tag: str, max_ack_pending: int) -> str:
        """A file-stored work-queue stream whose subject is its name, and its durable pull
        consumer with explicit acks."""
        name = f"bench-{tag}-{uuid.uuid4().hex[:8]}"
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
                max_ack_pending=max_ack_pending,
            ),
        )
        return name

    async def delete(self, name: str) -> None:
        """Deletes a run's stream so that later runs start from the same server; best effort."""
        with contextlib.suppress(Exception):
            js = await self.context()
            await js.delete_stream(name)

    async def close(self) -> None:
        for nc in self.connections:
            with contextlib.suppress(Exception):
                await nc.close()
        self.connections.clear()


async def publish_batch(js: JetStreamContext, subject: str, size: int, n: int) -> None:
    """n publishes sent at once, then wait for all their acks (stored)."""
    acks = [await js.publish_async(subject, body(size).encode()) for _ in range(n)]
    await asyncio.wait_for(asyncio.gather(*acks), PUBLISH_ACKS_S)


async def produce(
    js: JetStreamContext,
    subject: str,
    size: int,
    counter: Budget,
    batch: int,
    received: Budget | None = None,
    backlog: int = 0,
) -> None:
    """Publish batches until `counter` is done; with `received`, hold back while more than
    `backlog` messages wait for delivery (the end-to-end flow-control credit)."""
    while n := counter.claim(batch):
        while received is not None and counter.done - received.done > backlog:
            if counter.expired():
                return
            await asyncio.sleep(0.002)
        await publish_batch(js, subject, size, n)
        counter.add(n)


async def fill(conn: Js, subject: str, size: int, total: int, p: Profile) -> None:
    counter = Budget(total, p.fill_deadline_s)
    contexts = await conn.contexts(4)
    await asyncio.gather(*(produce(js, subject, size, counter, p.fill_batch) for js in contexts))
    if counter.timed_out:
        raise TimeoutError(f"filled only {counter.done} of {total} in {p.fill_deadline_s}s")


async def ack_all(messages: list[Msg], confirm: bool) -> None:
    """Acks each message; with `confirm`, the last one's ack is confirmed by the server, which
    handles a connection's acks in order, so the batch is acked when this returns."""
    for message in messages[:-1]:
        await message.ack()
    if confirm:
        await messages[-1].ack_sync(timeout=PUBLISH_ACKS_S)
    else:
        await messages[-1].ack()


async def consume(
    sub: JetStreamContext.PullSubscription,
    counter: Budget,
    batch: int,
    wait_s: float,
    *,
    confirm_acks: bool,
    record: Record | None = None,
) -> None:
    """Fetches up to `batch` (waiting up to `wait_s` for the first) and acks them, until every
    consumer together has received `counter.total`, or its deadline. With `confirm_acks` (the
    drain, whose LionMQ consumers wait for their ack) a batch's acks are confirmed before the
    next fetch; the end-to-end and paced consumers send theirs without waiting, as LionMQ's."""
    while not counter.complete and not counter.expired():
        try:
            messages = await sub.fetch(batch, timeout=min(wait_s, max(counter.left_s, 0.01)))
        except TimeoutError:  # nothing came (nats.errors.TimeoutError is one too)
            continue
        if record is not None:
            record(time.time(), [m.data for m in messages])
        counter.add(len(messages))
        await ack_all(messages, confirm=confirm_acks)


async def batch_enqueue(conn: Js, size: int, p: Profile) -> RunResult:
    stream = await conn.stream("batch", p.drain_prefill)
    counter = Budget(p.batch_total, p.deadline_s)
    contexts = await conn.contexts(p.batch_producers)

    async def work() -> Metrics:
        start = time.perf_counter()
        await asyncio.gather(*(produce(js, stream, size, counter, p.batch_size) for js in contexts))
        return {"msg_s": counter.done / (time.perf_counter() - start), "count": counter.done}

    try:
        return RunResult(
            await measured([conn.server.pid], work, counter), partial=counter.cut_short
        )
    finally:
        await conn.delete(stream)


async def single_enqueue(conn: Js, size: int, p: Profile) -> RunResult:
    stream = await conn.stream("single", p.drain_prefill)
    counter = Budget(p.single_total, p.deadline_s)
    latencies: list[float] = []
    js = await conn.context()

    async def producer() -> None:
        while counter.claim(1):
            t0 = time.perf_counter()
            await js.publish(stream, body(size).encode())
            latencies.append(time.perf_counter() - t0)
            counter.add(1)

    async def work() -> Metrics:
        start = time.perf_counter()
        await asyncio.gather(*(producer() for _ in range(p.single_concurrency)))
        rate = counter.done / (time.perf_counter() - start)
        return {"msg_s": rate, "count": counter.done, **latency_metrics(latencies)}

    try:
        return RunResult(
            await measured([conn.server.pid], work, counter), partial=counter.cut_short
        )
    finally:
        await conn.delete(stream)


async def drain_stream(conn: Js, stream: str, total: int, p: Profile) -> RunResult:
    counter = Budget(total, p.deadline_s)
    subs = await conn.subscriptions(stream, p.drain_consumers)

    async def work() -> Metrics:
        start = time.perf_counter()
        await asyncio.gather(
            *(consume(sub, counter, p.drain_batch, DRAIN_WAIT_S, confirm_acks=True) for sub in subs)
        )
        return {"msg_s": counter.done / (time.perf_counter() - start), "count": counter.done}

    metrics = await measured([conn.server.pid], work, counter)
    return RunResult(metrics, partial=counter.cut_short)


async def drain(conn: Js, size: int, p: Profile) -> RunResult:
    stream = await conn.stream("drain", p.drain_prefill)
    try:
        await fill(conn, stream, size, p.drain_prefill, p)
        return await drain_stream(conn, stream, p.drain_prefill, p)
    finally:
        await conn.delete(stream)


async def end_to_end(conn: Js, size: int, p: Profile) -> RunResult:
    stream = await conn.stream("e2e", p.e2e_backlog + p.e2e_consumers * p.batch_size)
    produced = Budget(p.e2e_total, p.deadline_s)
    received = Budget(p.e2e_total, p.deadline_s)
    latencies: list[float] = []
    record = recorder(latencies)
    contexts = await conn.contexts(p.e2e_producers)
    subs = await conn.subscriptions(stream, p.e2e_consumers)

    async def work() -> Metrics:
        start = time.perf_counter()
        await asyncio.gather(
            *(
                produce(js, stream, size, produced, p.batch_size, received, p.e2e_backlog)
                for js in contexts
            ),
            *(
                consume(sub, received, p.batch_size, 0.2, confirm_acks=False, record=record)
                for sub in subs
            ),
        )
        rate = received.done / (time.perf_counter() - start)
        return {"msg_s": rate, "count": received.done, **latency_metrics(latencies)}

    try:
        metrics = await measured([conn.server.pid], work, received)
        partial = produced.cut_short or received.cut_short
        return RunResult(metrics, partial=partial)
    finally:
        await conn.delete(stream)


async def paced(conn: Js, size: int, p: Profile) -> RunResult:
    """p.paced_rate single publishes a second, each sent on schedule in its own task and
    counted once acked; one consumer long-polls (fetch up to 100, wait up to 1 s)."""
    stream = await conn.stream("paced", p.drain_prefill)
    total = int(p.paced_rate * p.paced_seconds)
    received = Budget(total, p.paced_seconds + p.deadline_s)
    latencies: list[float] = []
    js = await conn.context()
    (sub,) = await conn.subscriptions(stream, 1)
    pending: set[asyncio.Future[PubAck]] = set()

    async def producer() -> float:
        start = time.perf_counter()
        sent = 0
        while sent < total and not received.expired():
            due = min(total, int((time.perf_counter() - start) * p.paced_rate) + 1)
            for _ in range(due - sent):
                task = asyncio.ensure_future(js.publish(stream, body(size).encode()))
                pending.add(task)
                task.add_done_callback(pending.discard)
            sent = due
            await asyncio.sleep(1 / p.paced_rate)
        return sent / (time.perf_counter() - start)

    async def work() -> Metrics:
        consuming = asyncio.ensure_future(
            consume(sub, received, 100, 1.0, confirm_acks=False, record=recorder(latencies))
        )
        await asyncio.sleep(0.2)  # the consumer is parked in its fetch before the first send
        sent_rate = await producer()
        await consuming
        if pending:
            await asyncio.gather(*pending)
        return {"sent_msg_s": sent_rate, "count": received.done, **latency_metrics(latencies)}

    try:
        metrics = await measured([conn.server.pid], work, received)
        return RunResult(metrics, partial=received.cut_short)
    finally:
        await conn.delete(stream)


async def long_queue(conn: Js, size: int, p: Profile) -> RunResult:
    server = conn.server
    shallow = await conn.stream("shallow", p.long_drain)
    deep = await conn.stream("deep", p.long_drain)
    try:
        async with PeakRss(server.rss_bytes) as memory:
            await fill(conn, shallow, size, p.long_drain, p)
            empty = await drain_stream(conn, shallow, p.long_drain, p)
            t0 = time.perf_counter()
            await fill(conn, deep, size, p.long_depth, p)
            fill_s = time.perf_counter() - t0
            await asyncio.sleep(p.settle_s)
            rss_full = server.rss_bytes()
            at_depth = await drain_stream(conn, deep, p.long_drain, p)
    finally:
        await conn.delete(shallow)
        await conn.delete(deep)
    return long_queue_result(
        depth=p.long_depth,
        fill_s=fill_s,
        rss_full=rss_full,
        memory=memory,
        empty=empty,
        at_depth=at_depth,
    )


Scenario = Callable[[Js, int, Profile], Awaitable[RunResult]]
SCENARIOS: dict[int, Scenario] = {
    1: batch_enqueue,
    2: single_enqueue,
    3: drain,
    4: end_to_end,
    5: paced,
    6: long_queue,
}


async def run_scenario(server: NatsServer, number: int, size: int, p: Profile) -> RunResult:
    conn = Js(server)
    try:
        return await SCENARIOS[number](conn, size, p)
    finally:
        await conn.close()


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

        async def run_one(number: int, size: int) -> RunResult:
            return await run_scenario(server, number, size, profile)

        name = "nats/nats-py"
        await run_matrix(name, run_one, args, results.setdefault(name, {}))
    return version(PACKAGE)
