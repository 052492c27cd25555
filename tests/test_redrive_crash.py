"""A redrive killed midway (kill -9 of a real node process) loses nothing and copies nothing
twice: restarted, the same redrive moves what is left, and every message is then in its origin
channel exactly once."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import httpx

from tests.conftest import NodeProcess, wait_until

DLQ = "orders.dlq"
N = 6000
BATCH = 1000


def counts(url: str, channel: str) -> dict[str, int]:
    r = httpx.get(f"{url}/channels/{channel}", timeout=5)
    if r.status_code == 404:
        return {"ready": 0, "delayed": 0, "in_flight": 0}
    got: dict[str, int] = r.json()["counts"]
    return got


def bodies(url: str, channel: str) -> list[int]:
    """The `n` of every message of the channel, paged through with GET .../messages."""
    seen: list[int] = []
    after: str | None = None
    for _ in range(N // 1000 + 2):
        params: dict[str, Any] = {"limit": 1000, **({"after": after} if after else {})}
        r = httpx.get(f"{url}/channels/{channel}/messages", params=params, timeout=5)
        if r.status_code == 404:
            return seen
        doc = r.json()
        seen += [m["body"]["n"] for m in doc["messages"]]
        after = doc["next"]
        if after is None:
            return seen
    raise AssertionError(f"paging {channel} did not end")


def test_a_redrive_killed_midway_loses_and_duplicates_nothing(
    node_factory: type[NodeProcess], tmp_path: Path
) -> None:
    node = node_factory(tmp_path / "node").start()
    url = node.url
    origin = {"x-dead-letter-channel": "orders", "x-dead-letter-reason": "max_attempts"}
    with httpx.Client(base_url=url, timeout=10) as c:
        for start in range(0, N, BATCH):
            batch = [{"body": {"n": i}, "headers": origin} for i in range(start, start + BATCH)]
            assert c.post(f"/channels/{DLQ}/enqueue", json={"messages": batch}).status_code == 201
    assert counts(url, DLQ)["ready"] == N

    # Paced (3,000 a second: 300 per 100 ms), so that the kill lands in the middle of it.
    outcome: list[object] = []

    def run() -> None:
        try:
            outcome.append(
                httpx.post(
                    f"{url}/channels/{DLQ}/redrive", json={"max": N, "rate": 3000}, timeout=15
                )
            )
        except httpx.HTTPError as exc:  # the node was killed under it: expected
            outcome.append(exc)

    worker = threading.Thread(target=run)
    worker.start()
    wait_until(lambda: counts(url, "orders")["ready"] >= 600, 10, "a part of the redrive done")
    node.kill9()
    worker.join(timeout=15)
    assert outcome and isinstance(outcome[0], httpx.HTTPError), outcome

    node.start()
    moved_before = counts(url, "orders")["ready"]
    assert 0 < moved_before < N, "the kill did not land midway"
    assert moved_before + counts(url, DLQ)["ready"] == N  # nothing lost, nothing doubled

    # The same redrive again moves only what is left.
    for _ in range(5):
        r = httpx.post(f"{url}/channels/{DLQ}/redrive", json={"max": 10_000}, timeout=15)
        assert r.status_code == 200, r.text
        if r.json()["remaining"] == 0:
            break
    assert r.json()["moved"] == N - moved_before

    assert sorted(bodies(url, "orders")) == list(range(N))  # each exactly once
    assert bodies(url, DLQ) == []
    assert counts(url, "orders")["ready"] == N and counts(url, DLQ)["ready"] == 0
