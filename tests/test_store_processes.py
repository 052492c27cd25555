"""One SQLite file shared by several processes, each with a SQLiteStore of its own, as the node
processes of a cluster on one host share it (see app/store/sqlite.py)."""

from __future__ import annotations

import asyncio
import multiprocessing
import queue
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from app.errors import StoreUnavailable
from app.store import sqlite as sqlite_store
from app.store.sqlite import SQLiteStore
from tests import store_processes as worker
from tests.conftest import wait_until
from tests.store_contract import all_ids, msg

ROOT = Path(__file__).resolve().parent.parent


def test_two_processes_write_one_file_at_once(tmp_path: Path) -> None:
    """Two processes enqueue, lease, ack and nack in one channel (and one each of their own) at
    the same time, enqueue the same dedup ids and race for one shard lease: nothing is lost or
    doubled, every dedup id holds one message that both were told of, one took the lease, and
    no write met "database is locked"."""
    path = str(tmp_path / "shared.db")
    spawn = multiprocessing.get_context("spawn")
    go = spawn.Event()
    ready = [spawn.Event() for _ in range(2)]
    out: Any = spawn.Queue()
    procs = [
        spawn.Process(target=worker.work, args=(path, k, ready[k], go, out), daemon=True)
        for k in range(2)
    ]
    for p in procs:
        p.start()
    try:
        # A process that failed to open the store says why on `out`.
        wait_until(lambda: all(r.is_set() for r in ready) or not out.empty(), 60, "stores open")
        assert out.empty(), out.get()
        go.set()
        results: dict[int, dict[str, Any]] = {}
        deadline = time.monotonic() + 60
        while len(results) < 2:
            try:
                k, result = out.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                pytest.fail(f"processes {sorted({0, 1} - set(results))} never finished")
            assert "error" not in result, result
            results[k] = result
        for p in procs:
            p.join(10)
            assert p.exitcode == 0
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(5)

    # They did write at the same time.
    assert max(r["started_at"] for r in results.values()) < min(
        r["ended_at"] for r in results.values()
    )
    for k, result in results.items():
        assert result["busy"] == [], f"process {k} met a busy store: {result['busy'][:3]}"
    won = [r["lease"] for r in results.values() if r["lease"] is not None]
    assert len(won) == 1 and won[0][1] == 1, won
    # Dedup: both were told the same message for each id, and the file holds just those.
    assert results[0]["dedup"] == results[1]["dedup"]
    winners = results[0]["dedup"]
    assert len(winners) == worker.DEDUP_IDS

    async def stored() -> tuple[list[int], list[int], list[list[int]]]:
        store = SQLiteStore(path)
        await store.open()
        try:
            return (
                await all_ids(store, worker.DEDUP_CHANNEL),
                await all_ids(store, worker.SHARED_CHANNEL),
                [await all_ids(store, f"own{k}") for k in range(2)],
            )
        finally:
            await store.close()

    dedup, shared, own = asyncio.run(stored())
    assert dedup == sorted(winners.values())
    # Every message of the winners is one process's own, with its own dedup id.
    assert all(id % 1_000_000 == int(key[1:]) for key, id in winners.items())
    # Acked ones gone, nacked ones back; in the shared channel, both processes' ones.
    kept = [results[k]["kept"] for k in range(2)]
    assert shared == sorted(kept[0][worker.SHARED_CHANNEL] + kept[1][worker.SHARED_CHANNEL])
    assert own == [sorted(kept[k][f"own{k}"]) for k in range(2)]
    assert all(len(ids) == worker.BATCHES * worker.BATCH // 2 for ids in own)


@pytest.fixture
def lock_holder(tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    """Another process that holds the file's write lock until told (a line on stdin)."""
    path = str(tmp_path / "busy.db")
    script = (
        "import sqlite3, sys\n"
        f"conn = sqlite3.connect({path!r}, isolation_level=None)\n"
        "conn.execute('PRAGMA journal_mode=WAL')\n"
        "sys.stdin.readline()\n"
        "conn.execute('BEGIN IMMEDIATE')\n"
        "print('locked', flush=True)\n"
        "sys.stdin.readline()\n"
        "conn.execute('COMMIT')\n"
        "print('released', flush=True)\n"
        "sys.stdin.readline()\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        yield path, proc
    finally:
        proc.kill()
        proc.wait(5)


def _tell(proc: subprocess.Popen[str], expect: str) -> None:
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write("\n")
    proc.stdin.flush()
    assert proc.stdout.readline().strip() == expect


async def test_a_write_lock_held_by_another_process_is_a_bounded_503(
    tmp_path: Path,
    lock_holder: tuple[str, subprocess.Popen[str]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """While another process holds the write lock, writes wait at most _WRITER_BUSY_MS and then
    fail as StoreUnavailable (503, retry), reads go on, and writes work once it lets go."""
    path, holder = lock_holder
    monkeypatch.setattr(sqlite_store, "_WRITER_BUSY_MS", 300)  # the default, shortened
    monkeypatch.setattr(sqlite_store, "_PROBE_EVERY_S", 0.0)
    store = SQLiteStore(path)
    await store.open()
    try:
        await store.insert("c", [msg(1)], 0)
        _tell(holder, "locked")
        started = time.monotonic()
        with pytest.raises(StoreUnavailable, match="database is locked"):
            await store.insert("c", [msg(2)], 0)
        waited = time.monotonic() - started
        assert 0.25 <= waited < 3, waited
        assert await all_ids(store, "c") == [1]  # reads do not wait for the lock
        with pytest.raises(StoreUnavailable, match="are failing"):
            await store.ping()
        _tell(holder, "released")
        await store.ping()  # the probe finds writes work again
        await store.insert("c", [msg(3)], 0)
        assert await all_ids(store, "c") == [1, 3]
    finally:
        await store.close()


def test_the_writer_waits_for_another_process_for_a_bounded_time() -> None:
    assert 0 < sqlite_store._WRITER_BUSY_MS <= 5_000
    assert 0 < sqlite_store._READER_BUSY_MS <= 200  # reads run on the event loop


async def test_an_exclusive_store_keeps_other_processes_out(tmp_path: Path) -> None:
    path = str(tmp_path / "excl.db")
    store = SQLiteStore(path, exclusive=True)
    await store.open()
    try:
        await store.insert("c", [msg(1)], 0)
        other = (
            "import asyncio, sys\n"
            "from app.errors import StoreUnavailable\n"
            "from app.store.sqlite import SQLiteStore\n"
            "async def main():\n"
            f"    s = SQLiteStore({path!r})\n"
            "    try:\n"
            "        await s.open()\n"
            "    except StoreUnavailable as exc:\n"
            "        print('refused:', exc.detail)\n"
            "        return\n"
            "    print('opened')\n"
            "    await s.close()\n"
            "asyncio.run(main())\n"
        )
        done = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-c", other],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.stdout.startswith("refused:") and "locked" in done.stdout, done
    finally:
        await store.close()
