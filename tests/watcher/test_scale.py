"""A real node holding many channels, with the watcher attached: it idles near 0% CPU, answers
/health quickly while /metrics is scraped, and the watcher shows it (totals, top channels, count).

10,000 channels in the default suite (start-up reads each channel from the store, ~0.3 ms each,
and dominates the time); 100,000 in the slow version.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest
from many_channels import seed_channels
from watcher_harness import Processes, open_feed

DEEP = {f"deep{i}": 10 * (i + 1) for i in range(20)}


def idle_cpu_percent(pid: int, seconds: float) -> float:
    """CPU time the process used over `seconds` of wall time, in percent of one core."""
    proc = psutil.Process(pid)
    before, start = proc.cpu_times(), time.monotonic()
    time.sleep(seconds)  # measuring a span of time: nothing to wait on
    after, end = proc.cpu_times(), time.monotonic()
    used = (after.user + after.system) - (before.user + before.system)
    return 100 * used / (end - start)


def health_during_scrape(base_url: str) -> tuple[float, int]:
    """The slowest /health answer while one /metrics scrape runs, and the scrape's size."""
    latencies: list[float] = []
    done = threading.Event()

    def probe() -> None:
        with httpx.Client(base_url=base_url, timeout=30) as client:
            deadline = time.monotonic() + 60
            while not done.is_set() and time.monotonic() < deadline:
                started = time.monotonic()
                assert client.get("/health").status_code == 200
                latencies.append(time.monotonic() - started)

    prober = threading.Thread(target=probe)
    prober.start()
    try:
        scrape = httpx.get(base_url + "/metrics", timeout=60)
    finally:
        done.set()
        prober.join(70)
    assert scrape.status_code == 200
    return max(latencies), len(scrape.content)


async def run(procs: Processes, tmp_path: Path, channels: int, start_timeout: float) -> None:
    db = tmp_path / "many.db"
    seed_channels(db, channels, depths=DEEP)
    total = channels + len(DEEP)
    watcher = procs.watcher()
    node = procs.node(watcher, "crowded", interval_ms=1000, db=db, timeout=start_timeout)

    feed = await open_feed(watcher.base_url)
    await feed.until(
        lambda f: f.nodes.get("crowded", {}).get("totals", {}).get("channels") == total,
        10,
        "the watcher to show the node with its channel count",
    )
    view = feed.nodes["crowded"]
    assert view["status"] == "up"
    assert view["totals"]["ready"] == sum(DEEP.values())
    assert [c["name"] for c in view["channels"]][:3] == ["deep19", "deep18", "deep17"]
    await feed.ws.close()

    cpu = idle_cpu_percent(node.popen.pid, 3.0)
    assert cpu < 5.0, f"an idle node with {total} channels used {cpu:.1f}% of a core"

    slowest, size = health_during_scrape(node.base_url)
    assert size < 100_000, f"a scrape of {total} channels is {size} bytes"
    assert slowest < 0.5, f"/health took {slowest:.2f}s during a scrape"


async def test_a_node_with_10k_channels_idles_answers_and_is_shown(
    procs: Processes, tmp_path: Path
) -> None:
    await run(procs, tmp_path, 10_000, start_timeout=30)


@pytest.mark.slow
async def test_a_node_with_100k_channels_idles_answers_and_is_shown(
    procs: Processes, tmp_path: Path
) -> None:
    await run(procs, tmp_path, 100_000, start_timeout=120)
