"""Results, percentiles, medians, CPU accounting and message bodies that carry their send time."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import psutil

Metrics = dict[str, float]

SIZES = {"16B": 16, "1KiB": 1024}


def body(size: int) -> str:
    """A JSON string body of `size` characters that starts with the send time in microseconds
    (16 digits, so a 16-byte body is the timestamp itself)."""
    stamp = str(time.time_ns() // 1000)
    return stamp + "x" * (size - len(stamp)) if size > len(stamp) else stamp


def sent_at(value: Any) -> float:
    """The send time (seconds since the epoch) carried by a `body()`."""
    return int(str(value)[:16]) / 1e6


def log(message: str) -> None:
    """Progress, on stderr (stdout carries the table)."""
    print(message, flush=True, file=sys.stderr)


Record = Callable[[float, list[bytes]], None]
"""Called by a consumer with the delivery time and the bodies it received."""


def recorder(latencies: list[float]) -> Record:
    """A `Record` that appends each body's enqueue -> delivery time to `latencies`."""

    def record(now: float, bodies: list[bytes]) -> None:
        latencies.extend(now - sent_at(b[:16].decode()) for b in bodies)

    return record


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def latency_metrics(latencies_s: list[float]) -> Metrics:
    return {
        "p50_ms": percentile(latencies_s, 50) * 1000,
        "p99_ms": percentile(latencies_s, 99) * 1000,
        "samples": float(len(latencies_s)),
    }


@dataclass
class RunResult:
    metrics: Metrics
    partial: bool = False
    note: str = ""


@dataclass
class ScenarioResult:
    """Every run of one scenario at one body size, and the median of each metric."""

    key: str
    runs: list[RunResult] = field(default_factory=list)

    @property
    def median(self) -> Metrics:
        names = {name for run in self.runs for name in run.metrics}
        out: Metrics = {}
        for name in sorted(names):
            values = [r.metrics[name] for r in self.runs if name in r.metrics]
            values = [v for v in values if v == v]  # drops NaN
            if values:
                out[name] = statistics.median(values)
        return out

    @property
    def partial(self) -> bool:
        return any(run.partial for run in self.runs)

    def to_json(self) -> dict[str, Any]:
        return {
            "median": self.median,
            "partial": self.partial,
            "runs": [
                {"metrics": r.metrics, "partial": r.partial, "note": r.note} for r in self.runs
            ],
        }


class CpuMeter:
    """CPU used by the server's processes and by this (the load generator's) process over a
    window, as a percentage of one core: what tells which side limits a figure."""

    def __init__(self, server_pids: list[int]) -> None:
        self._procs = [psutil.Process(pid) for pid in server_pids]
        self._me = psutil.Process(os.getpid())
        self._start = self._sample()

    def _sample(self) -> tuple[float, float, float]:
        server = 0.0
        for proc in self._procs:
            try:
                t = proc.cpu_times()
                server += t.user + t.system
                for child in proc.children(recursive=True):
                    ct = child.cpu_times()
                    server += ct.user + ct.system
            except psutil.Error:
                pass
        mine = self._me.cpu_times()
        return time.monotonic(), server, mine.user + mine.system

    def stop(self) -> Metrics:
        t1, s1, b1 = self._sample()
        t0, s0, b0 = self._start
        wall = max(t1 - t0, 1e-9)
        return {"server_cpu_pct": 100 * (s1 - s0) / wall, "bench_cpu_pct": 100 * (b1 - b0) / wall}


class Budget:
    """A count to reach and a deadline to respect, shared by a run's workers: asyncio tasks,
    or the threads of a blocking client (hence the lock)."""

    def __init__(self, total: int, seconds: float) -> None:
        self.total = total
        self.claimed = 0
        self.done = 0
        self.deadline = time.monotonic() + seconds
        self.timed_out = False
        self._lock = threading.Lock()

    def claim(self, n: int) -> int:
        """How many of the next `n` a worker may do (0: stop)."""
        if time.monotonic() >= self.deadline:
            self.timed_out = True
            return 0
        with self._lock:
            n = max(0, min(n, self.total - self.claimed))
            self.claimed += n
        return n

    def add(self, n: int) -> int:
        """Counts `n` more done; returns the new count."""
        with self._lock:
            self.done += n
            return self.done

    @property
    def complete(self) -> bool:
        return self.done >= self.total

    @property
    def cut_short(self) -> bool:
        """The run stopped at its deadline, or before its count: its figures are partial."""
        return self.timed_out or not self.complete

    def expired(self) -> bool:
        """True (and the run marked timed out) once the deadline has passed."""
        if time.monotonic() >= self.deadline:
            self.timed_out = True
            return True
        return False

    @property
    def left_s(self) -> float:
        return max(0.0, self.deadline - time.monotonic())


class PeakRss:
    """While in use, samples a server's resident memory every 0.25 s; `peak` is the highest."""

    def __init__(self, rss: Callable[[], int]) -> None:
        self._rss = rss
        self.start = self.peak = rss()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> PeakRss:
        self._task = asyncio.ensure_future(self._sample())
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _sample(self) -> None:
        while True:
            self.peak = max(self.peak, self._rss())
            await asyncio.sleep(0.25)


Results = dict[str, dict[str, ScenarioResult]]
"""Per broker and client ("lionmq", "rabbitmq/pika", "nats/nats-py"), per "scenario:size"."""
RunOne = Callable[[int, int], Awaitable[RunResult]]
"""Runs one scenario (number, body size in bytes) once."""
RunMatrix = Callable[[str, RunOne, argparse.Namespace, dict[str, ScenarioResult]], Awaitable[None]]
"""Runs every selected scenario and size `args.runs` times through a `RunOne`."""


HANG_S = 30.0
"""How long past its deadline a run may go before it is taken for hung."""


async def measured(
    pids: list[int], work: Callable[[], Awaitable[Metrics]], budget: Budget
) -> Metrics:
    """`work()`'s figures with the CPU the server (`pids`) and this process used meanwhile.
    The workers watch `budget`'s deadline themselves; a run still going HANG_S after it (a
    request or confirm that never came back) raises TimeoutError."""
    cpu = CpuMeter(pids)
    metrics = await asyncio.wait_for(work(), timeout=budget.left_s + HANG_S)
    return {**metrics, **cpu.stop()}


def long_queue_result(
    *,
    depth: int,
    fill_s: float,
    rss_full: int,
    memory: PeakRss,
    empty: RunResult,
    at_depth: RunResult,
) -> RunResult:
    """The long queue's figures, for every broker alike: drain rates over the same count from
    a shallow and a deep queue, the server's RSS at depth, at start and at peak."""
    rate_empty = empty.metrics.get("msg_s", 0.0)
    rate_depth = at_depth.metrics.get("msg_s", 0.0)
    return RunResult(
        {
            "depth": float(depth),
            "fill_msg_s": depth / max(fill_s, 1e-9),
            "rss_mb": rss_full / 2**20,
            "rss_start_mb": memory.start / 2**20,
            "peak_rss_mb": memory.peak / 2**20,
            "drain_empty_msg_s": rate_empty,
            "drain_depth_msg_s": rate_depth,
            "depth_vs_empty": rate_depth / max(rate_empty, 1e-9),
            "server_cpu_pct": at_depth.metrics.get("server_cpu_pct", 0.0),
            "bench_cpu_pct": at_depth.metrics.get("bench_cpu_pct", 0.0),
        },
        partial=empty.partial or at_depth.partial,
    )
