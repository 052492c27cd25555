"""Counts and time bounds of each scenario: the full run, and `--quick` for the smoke test."""

from __future__ import annotations

from dataclasses import dataclass

SCENARIOS = {
    1: "batch enqueue (100/request, 4 producers)",
    2: "single enqueue (32 concurrent)",
    3: "drain (dequeue 100 + ack 100)",
    4: "end to end (batches of 100)",
    5: "paced 1,000 msg/s (1 long-polling consumer)",
    6: "long queue (1,000,000 pending)",
}


@dataclass(frozen=True)
class Profile:
    batch_total: int = 200_000
    batch_size: int = 100
    batch_producers: int = 4
    single_total: int = 10_000
    single_concurrency: int = 32
    drain_prefill: int = 200_000
    drain_consumers: int = 4
    drain_batch: int = 100
    e2e_total: int = 100_000
    e2e_producers: int = 4
    e2e_consumers: int = 4
    # Messages enqueued but not yet delivered before producers wait (their flow-control credit).
    e2e_backlog: int = 4_000
    paced_rate: int = 1000
    paced_seconds: float = 10.0
    long_depth: int = 1_000_000
    long_drain: int = 100_000
    fill_batch: int = 1000
    settle_s: float = 1.0
    """Pause between filling the deep queue and reading the server's RSS at depth."""
    long_runs: int = 1
    """Runs of the long queue (each fills 1,000,000): one unless --runs says fewer."""
    deadline_s: float = 30.0
    """Upper bound on the measured part of one run; it stops and reports partial figures."""
    fill_deadline_s: float = 300.0
    """Upper bound on filling a channel before a drain (200k, or 1M for the long queue)."""
    trace: bool = False
    """LionMQ's channels with per-message history on (`--trace`): what tracing costs."""


FULL = Profile()

QUICK = Profile(
    batch_total=2_000,
    single_total=300,
    drain_prefill=2_000,
    e2e_total=2_000,
    paced_rate=200,
    paced_seconds=1.0,
    long_depth=5_000,
    long_drain=1_000,
    deadline_s=10.0,
    fill_deadline_s=20.0,
)
