"""`--peer rabbitmq`: Debian's rabbitmq-server, run on loopback by us, driven with aio-pika.

The server runs from a temp dir (its own node name, AMQP, distribution and epmd ports, no
plugins) in its own process group, and is stopped by PID. Scenarios map onto AMQP as: durable
classic queue, persistent messages (delivery_mode=2), publisher confirms, manual acks; a batch
is 100 publishes followed by waiting for their confirms; consumers use basic.qos prefetch and
ack with multiple=true every 100 deliveries.
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
from typing import Any

import aio_pika
import psutil
from aio_pika.abc import (
    AbstractChannel,
    AbstractConnection,
    AbstractIncomingMessage,
    AbstractQueue,
)

from bench.config import Profile
from bench.ports import accepts, free_port, spawn, wait_ready
from bench.stats import (
    Budget,
    CpuMeter,
    Metrics,
    PeakRss,
    RunResult,
    ScenarioResult,
    body,
    latency_metrics,
    sent_at,
)

DURABILITY = (
    "durable classic queue, persistent messages (delivery_mode=2), publisher confirms, "
    "manual acks (RabbitMQ confirms persistent messages once written and fsynced)"
)
SERVER = Path("/usr/lib/rabbitmq/bin/rabbitmq-server")
CTL = Path("/usr/lib/rabbitmq/bin/rabbitmqctl")
POLICY_RC = Path("/usr/sbin/policy-rc.d")
ACK_EVERY = 100


def log(message: str) -> None:
    print(message, flush=True, file=sys.stderr)


def ensure_installed() -> None:
    """Installs Debian's rabbitmq-server when missing, without letting its postinst start the
    system service (a policy-rc.d that denies service starts, removed afterwards)."""
    if SERVER.exists():
        return
    log("[rabbitmq] installing Debian's rabbitmq-server with apt")
    sudo = [] if os.geteuid() == 0 else ["sudo"]
    added_policy = False
    if not POLICY_RC.exists() and os.geteuid() == 0:
        POLICY_RC.write_text("#!/bin/sh\n# bench: no service starts during install\nexit 101\n")
        POLICY_RC.chmod(0o755)
        added_policy = True
    try:
        subprocess.run([*sudo, "apt-get", "update", "-qq"], check=True)
        subprocess.run(
            [*sudo, "apt-get", "install", "-y", "-qq", "rabbitmq-server"],
            check=True,
            env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
        )
    finally:
        if added_policy:
            POLICY_RC.unlink(missing_ok=True)
    # Should a system instance have started anyway, it must not compete for the CPU.
    subprocess.run([*sudo, "service", "rabbitmq-server", "stop"], capture_output=True)


def version() -> str:
    out = subprocess.run(
        ["dpkg-query", "-W", "-f=${Version}", "rabbitmq-server"], capture_output=True, text=True
    )
    return out.stdout.strip() or "unknown"


class RabbitServer:
    """Our own rabbitmq-server on 127.0.0.1, everything under one temp dir."""

    def __init__(self, *, boot_timeout: float = 90.0) -> None:
        self.port = free_port()
        self.node = f"bench-{self.port}@localhost"
        self.url = f"amqp://guest:guest@127.0.0.1:{self.port}/"
        self.boot_timeout = boot_timeout
        self.dir = Path(tempfile.mkdtemp(prefix="rabbit-bench-"))
        self.epmd_port = free_port()
        self.env = {
            **os.environ,
            "HOME": str(self.dir),  # the Erlang cookie lives here, not in root's home
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(free_port()),
            "ERL_EPMD_PORT": str(self.epmd_port),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            "RABBITMQ_MNESIA_BASE": str(self.dir / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.dir / "log"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.dir / "enabled_plugins"),
            "RABBITMQ_CONFIG_FILE": str(self.dir / "rabbitmq"),
            "RABBITMQ_CONF_ENV_FILE": str(self.dir / "rabbitmq-env.conf"),
            "RABBITMQ_PID_FILE": str(self.dir / "rabbit.pid"),
        }
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> RabbitServer:
        (self.dir / "enabled_plugins").write_text("[].\n")
        (self.dir / "rabbitmq.conf").write_text(f"listeners.tcp.default = 127.0.0.1:{self.port}\n")
        (self.dir / "rabbitmq-env.conf").write_text("")
        with (self.dir / "server.out").open("wb") as out:
            self.proc = spawn([str(SERVER)], self.env, self.dir, out)
        what = f"RabbitMQ's AMQP port {self.port}"
        wait_ready(self._accepting, self.boot_timeout, what, self.stop)
        return self

    def _accepting(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            tail = (self.dir / "server.out").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"rabbitmq-server exited with {self.proc.returncode}: {tail}")
        return accepts(self.port)

    def rss_bytes(self) -> int:
        """The server's resident memory: the Erlang VM and its helpers."""
        total = 0
        with contextlib.suppress(psutil.Error):
            root = psutil.Process(self.pid)
            for proc in [root, *root.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):
                    total += proc.memory_info().rss
        return total

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(subprocess.TimeoutExpired, OSError):
                subprocess.run(
                    [str(CTL), "-n", self.node, "stop"],
                    env=self.env,
                    capture_output=True,
                    timeout=30,
                )
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        self._stop_epmd()
        shutil.rmtree(self.dir, ignore_errors=True)

    def _stop_epmd(self) -> None:
        """epmd daemonizes out of our process group: find ours by its port and end it."""
        for proc in psutil.process_iter(["name", "pid"]):
            if proc.info["name"] != "epmd":
                continue
            with contextlib.suppress(psutil.Error):
                if proc.environ().get("ERL_EPMD_PORT") == str(self.epmd_port):
                    proc.kill()

    def __enter__(self) -> RabbitServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


async def wait_amqp(url: str, within_s: float) -> None:
    deadline = time.monotonic() + within_s
    while True:
        try:
            connection = await aio_pika.connect(url, timeout=5)
            await connection.close()
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


# -- scenarios ----------------------------------------------------------------------------


class Amqp:
    """Connections to one server; each producer or consumer gets its own channel."""

    def __init__(self, server: RabbitServer) -> None:
        self.server = server
        self.connections: list[AbstractConnection] = []

    async def connection(self) -> AbstractConnection:
        connection = await aio_pika.connect(self.server.url)
        self.connections.append(connection)
        return connection

    async def channel(self, connection: AbstractConnection | None = None) -> AbstractChannel:
        connection = connection or await self.connection()
        return await connection.channel(publisher_confirms=True)

    async def queue(self, tag: str) -> str:
        name = f"bench-{tag}-{uuid.uuid4().hex[:8]}"
        channel = await self.channel(self.connections[0] if self.connections else None)
        await channel.declare_queue(name, durable=True)
        await channel.close()
        return name

    async def delete(self, name: str) -> None:
        with contextlib.suppress(Exception):
            channel = await self.channel(self.connections[0])
            await channel.queue_delete(name)
            await channel.close()

    async def close(self) -> None:
        for connection in self.connections:
            with contextlib.suppress(Exception):
                await connection.close()
        self.connections.clear()


def persistent(size: int) -> aio_pika.Message:
    return aio_pika.Message(body(size).encode(), delivery_mode=aio_pika.DeliveryMode.PERSISTENT)


async def publish_batch(channel: AbstractChannel, queue: str, size: int, n: int) -> None:
    """n publishes, then wait for all their confirms."""
    exchange = channel.default_exchange
    await asyncio.gather(*(exchange.publish(persistent(size), routing_key=queue) for _ in range(n)))


async def produce(
    amqp: Amqp,
    queue: str,
    size: int,
    counter: Budget,
    batch: int,
    received: Budget | None = None,
    backlog: int = 0,
) -> None:
    """Publish batches until `counter` is done; with `received`, hold back while more than
    `backlog` messages wait for delivery (as the LionMQ end-to-end producers do)."""
    channel = await amqp.channel()
    while n := counter.claim(batch):
        while received is not None and counter.done - received.done > backlog:
            if counter.left_s <= 0:
                return
            await asyncio.sleep(0.005)
        await publish_batch(channel, queue, size, n)
        counter.done += n


async def fill(amqp: Amqp, queue: str, size: int, total: int, p: Profile) -> None:
    counter = Budget(total, p.fill_deadline_s)
    await asyncio.gather(*(produce(amqp, queue, size, counter, p.fill_batch) for _ in range(4)))
    if counter.timed_out:
        raise TimeoutError(f"filled only {counter.done} of {total} in {p.fill_deadline_s}s")


async def consume(
    amqp: Amqp,
    queue: str,
    counter: Budget,
    prefetch: int,
    on_batch: Callable[[float, list[bytes]], None] | None = None,
) -> None:
    """Consumes until `counter` reaches its total (shared by all consumers) or its deadline;
    acks with multiple=true every ACK_EVERY deliveries and once more at the end."""
    channel = await amqp.channel()
    await channel.set_qos(prefetch_count=prefetch)
    q: AbstractQueue = await channel.get_queue(queue, ensure=False)
    last: AbstractIncomingMessage | None = None
    unacked = 0

    async def receive() -> None:
        nonlocal last, unacked
        async with q.iterator() as messages:
            async for message in messages:
                if on_batch is not None:
                    on_batch(time.time(), [message.body])
                counter.done += 1
                last, unacked = message, unacked + 1
                if unacked >= ACK_EVERY:
                    await message.ack(multiple=True)
                    unacked = 0
                if counter.done >= counter.total:
                    counter.finished.set()
                    return

    receiving = asyncio.ensure_future(receive())
    finished = asyncio.ensure_future(counter.finished.wait())
    try:
        await asyncio.wait(
            {receiving, finished}, timeout=counter.left_s, return_when=asyncio.FIRST_COMPLETED
        )
        if not counter.finished.is_set():
            counter.timed_out = True
    finally:
        for task in (receiving, finished):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        with contextlib.suppress(Exception):
            if last is not None and unacked:
                await last.ack(multiple=True)
            await channel.close()


async def _measured(server: RabbitServer, work: Callable[[], Awaitable[Metrics]]) -> Metrics:
    cpu = CpuMeter([server.pid])
    metrics = await work()
    return {**metrics, **cpu.stop()}


async def batch_enqueue(amqp: Amqp, size: int, p: Profile) -> RunResult:
    queue = await amqp.queue("batch")
    counter = Budget(p.batch_total, p.deadline_s)
    channels = [await amqp.channel() for _ in range(p.batch_producers)]

    async def producer(channel: AbstractChannel) -> None:
        while n := counter.claim(p.batch_size):
            await publish_batch(channel, queue, size, n)
            counter.done += n

    async def work() -> Metrics:
        start = time.perf_counter()
        await asyncio.gather(*(producer(c) for c in channels))
        return {"msg_s": counter.done / (time.perf_counter() - start), "count": counter.done}

    try:
        return RunResult(await _measured(amqp.server, work), partial=counter.timed_out)
    finally:
        await amqp.delete(queue)


async def single_enqueue(amqp: Amqp, size: int, p: Profile) -> RunResult:
    queue = await amqp.queue("single")
    counter = Budget(p.single_total, p.deadline_s)
    connection = await amqp.connection()
    channels = [await amqp.channel(connection) for _ in range(p.single_concurrency)]
    latencies: list[float] = []

    async def producer(channel: AbstractChannel) -> None:
        while counter.claim(1):
            t0 = time.perf_counter()
            await channel.default_exchange.publish(persistent(size), routing_key=queue)
            latencies.append(time.perf_counter() - t0)
            counter.done += 1

    async def work() -> Metrics:
        start = time.perf_counter()
        await asyncio.gather(*(producer(c) for c in channels))
        rate = counter.done / (time.perf_counter() - start)
        return {"msg_s": rate, "count": counter.done, **latency_metrics(latencies)}

    try:
        return RunResult(await _measured(amqp.server, work), partial=counter.timed_out)
    finally:
        await amqp.delete(queue)


async def drain_queue(amqp: Amqp, queue: str, total: int, p: Profile) -> RunResult:
    counter = Budget(total, p.deadline_s)

    async def work() -> Metrics:
        start = time.perf_counter()
        await asyncio.gather(
            *(consume(amqp, queue, counter, 2 * p.drain_batch) for _ in range(p.drain_consumers))
        )
        return {"msg_s": counter.done / (time.perf_counter() - start), "count": counter.done}

    return RunResult(await _measured(amqp.server, work), partial=counter.timed_out)


async def drain(amqp: Amqp, size: int, p: Profile) -> RunResult:
    queue = await amqp.queue("drain")
    try:
        await fill(amqp, queue, size, p.drain_prefill, p)
        return await drain_queue(amqp, queue, p.drain_prefill, p)
    finally:
        await amqp.delete(queue)


async def end_to_end(amqp: Amqp, size: int, p: Profile) -> RunResult:
    queue = await amqp.queue("e2e")
    produced = Budget(p.e2e_total, p.deadline_s)
    received = Budget(p.e2e_total, p.deadline_s)
    latencies: list[float] = []

    def record(now: float, bodies: list[bytes]) -> None:
        latencies.extend(now - sent_at(b[:16].decode()) for b in bodies)

    async def work() -> Metrics:
        start = time.perf_counter()
        await asyncio.gather(
            *(
                produce(amqp, queue, size, produced, p.batch_size, received, p.e2e_backlog)
                for _ in range(p.e2e_producers)
            ),
            *(consume(amqp, queue, received, 5 * p.batch_size, record) for _ in range(4)),
        )
        rate = received.done / (time.perf_counter() - start)
        return {"msg_s": rate, "count": received.done, **latency_metrics(latencies)}

    try:
        metrics = await _measured(amqp.server, work)
        return RunResult(metrics, partial=produced.timed_out or received.timed_out)
    finally:
        await amqp.delete(queue)


async def paced(amqp: Amqp, size: int, p: Profile) -> RunResult:
    queue = await amqp.queue("paced")
    total = int(p.paced_rate * p.paced_seconds)
    received = Budget(total, p.paced_seconds + p.deadline_s)
    latencies: list[float] = []
    channel = await amqp.channel()
    pending: set[asyncio.Future[Any]] = set()

    def record(now: float, bodies: list[bytes]) -> None:
        latencies.extend(now - sent_at(b[:16].decode()) for b in bodies)

    async def producer() -> float:
        start = time.perf_counter()
        sent = 0
        while sent < total and received.left_s > 0:
            due = min(total, int((time.perf_counter() - start) * p.paced_rate) + 1)
            for _ in range(due - sent):
                publish = channel.default_exchange.publish(persistent(size), routing_key=queue)
                task = asyncio.ensure_future(publish)
                pending.add(task)
                task.add_done_callback(pending.discard)
            sent = due
            await asyncio.sleep(1 / p.paced_rate)
        return sent / (time.perf_counter() - start)

    async def work() -> Metrics:
        consuming = asyncio.ensure_future(consume(amqp, queue, received, 100, record))
        await asyncio.sleep(0.5)  # the consumer is subscribed before the first publish
        sent_rate = await producer()
        await consuming
        if pending:
            await asyncio.gather(*pending)
        return {"sent_msg_s": sent_rate, "count": received.done, **latency_metrics(latencies)}

    try:
        metrics = await _measured(amqp.server, work)
        return RunResult(metrics, partial=received.timed_out)
    finally:
        await amqp.delete(queue)


async def long_queue(amqp: Amqp, size: int, p: Profile) -> RunResult:
    server = amqp.server
    shallow = await amqp.queue("shallow")
    deep = await amqp.queue("deep")
    try:
        async with PeakRss(server.rss_bytes) as memory:
            await fill(amqp, shallow, size, p.long_drain, p)
            empty = await drain_queue(amqp, shallow, p.long_drain, p)
            t0 = time.perf_counter()
            await fill(amqp, deep, size, p.long_depth, p)
            fill_rate = p.long_depth / (time.perf_counter() - t0)
            await asyncio.sleep(1.0)
            rss_full = server.rss_bytes()
            at_depth = await drain_queue(amqp, deep, p.long_drain, p)
    finally:
        await amqp.delete(shallow)
        await amqp.delete(deep)
    rate_empty = empty.metrics.get("msg_s", 0.0)
    rate_depth = at_depth.metrics.get("msg_s", 0.0)
    return RunResult(
        {
            "depth": float(p.long_depth),
            "fill_msg_s": fill_rate,
            "rss_mb": rss_full / 2**20,
            "peak_rss_mb": memory.peak / 2**20,
            "drain_empty_msg_s": rate_empty,
            "drain_depth_msg_s": rate_depth,
            "depth_vs_empty": rate_depth / max(rate_empty, 1e-9),
            "server_cpu_pct": at_depth.metrics.get("server_cpu_pct", 0.0),
            "bench_cpu_pct": at_depth.metrics.get("bench_cpu_pct", 0.0),
        },
        partial=empty.partial or at_depth.partial,
    )


RUNNERS: dict[int, Callable[[Amqp, int, Profile], Awaitable[RunResult]]] = {
    1: batch_enqueue,
    2: single_enqueue,
    3: drain,
    4: end_to_end,
    5: paced,
    6: long_queue,
}

RunMatrix = Callable[
    [
        str,
        Callable[[int, int], Awaitable[RunResult]],
        argparse.Namespace,
        dict[str, ScenarioResult],
    ],
    Awaitable[None],
]


async def run(
    args: argparse.Namespace,
    profile: Profile,
    results: dict[str, ScenarioResult],
    run_matrix: RunMatrix,
) -> str:
    """Installs (if needed), starts, drives and stops RabbitMQ; returns its version."""
    await asyncio.to_thread(ensure_installed)
    with RabbitServer() as server:
        log(f"[rabbitmq] {version()} pid {server.pid} on {server.url} ({server.node})")
        await wait_amqp(server.url, server.boot_timeout)

        async def run_one(number: int, size: int) -> RunResult:
            amqp = Amqp(server)
            try:
                return await RUNNERS[number](amqp, size, profile)
            finally:
                await amqp.close()

        await run_matrix("rabbitmq", run_one, args, results)
    return version()
