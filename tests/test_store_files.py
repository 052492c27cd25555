"""The store's files changing under a running node: deleted, moved, turned read-only.

The node must answer 503 (never 201 for a write it cannot keep) and must not die of it.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from app.errors import StoreUnavailable
from app.main import create_app
from app.store.sqlite import SQLiteStore
from tests.conftest import NodeProcess, make_settings, wait_until
from tests.store_contract import CH, all_ids, msg

ONE = {"messages": [{"body": "m"}]}


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    app: FastAPI = create_app(make_settings(tmp_path))
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://localhost") as c,
    ):
        yield c


def assert_lost(r: httpx.Response, path: Path) -> None:
    assert r.status_code == 503, r.text
    assert r.headers["retry-after"] == "1"
    assert str(path) in r.json()["detail"]


async def test_deleted_store_file_answers_503_not_201(
    client: httpx.AsyncClient, tmp_path: Path
) -> None:
    db = tmp_path / "inproc.db"
    assert (await client.post("/channels/c/enqueue", json=ONE)).status_code == 201
    os.unlink(db)  # SQLite would go on writing to the unlinked file
    for _ in range(3):
        assert_lost(await client.post("/channels/c/enqueue", json=ONE), db)
    assert_lost(await client.post("/channels/c/dequeue", json={"max": 1}), db)
    ready = await client.get("/ready")
    assert_lost(ready, db)
    assert "deleted or moved" in ready.json()["detail"]


async def test_deleted_wal_answers_503(client: httpx.AsyncClient, tmp_path: Path) -> None:
    wal = tmp_path / "inproc.db-wal"
    assert (await client.post("/channels/c/enqueue", json=ONE)).status_code == 201
    os.unlink(wal)  # committed transactions not yet checkpointed live there
    assert_lost(await client.post("/channels/c/enqueue", json=ONE), wal)
    assert_lost(await client.get("/ready"), wal)


async def test_moved_store_file_is_whole_again_once_moved_back(tmp_path: Path) -> None:
    """ "Whole again" means the path names the very file the node has open (same device and
    inode): moved back, or hard-linked back. A different file at the path stays refused."""
    settings = make_settings(tmp_path)
    db = tmp_path / "inproc.db"
    app: FastAPI = create_app(settings)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://localhost") as c,
    ):
        assert (await c.post("/channels/c/enqueue", json={"messages": [{"body": 1}]})).is_success
        os.rename(db, tmp_path / "away.db")
        assert_lost(await c.post("/channels/c/enqueue", json={"messages": [{"body": 2}]}), db)
        shutil.copy(tmp_path / "away.db", db)  # a copy is another file: still refused
        assert_lost(await c.post("/channels/c/enqueue", json={"messages": [{"body": 3}]}), db)
        os.replace(tmp_path / "away.db", db)
        assert (await c.get("/ready")).status_code == 200
        assert (await c.post("/channels/c/enqueue", json={"messages": [{"body": 4}]})).is_success
    app = create_app(settings)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://localhost") as c,
    ):
        got = (await c.post("/channels/c/dequeue", json={"max": 10})).json()["messages"]
        assert [m["body"] for m in got] == [1, 4]  # every 201, and none of the 503s


async def test_file_unlinked_during_the_commit_is_not_acknowledged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The file goes between the writer's check and its COMMIT: the group is committed to a
    file no path names, so it must fail rather than be acknowledged."""
    store = SQLiteStore(str(tmp_path / "s.db"))
    await store.open()
    try:
        await store.insert(CH, [msg(1)], dedup_since=0)
        real = SQLiteStore._lost
        calls = 0

        def lost_after_the_check(self: SQLiteStore) -> str | None:
            nonlocal calls
            calls += 1
            if calls == 1:  # the check before COMMIT still finds the file, then it goes
                os.unlink(tmp_path / "s.db")
                return None
            return real(self)

        monkeypatch.setattr(SQLiteStore, "_lost", lost_after_the_check)
        with pytest.raises(StoreUnavailable, match="is gone"):
            await store.insert(CH, [msg(2)], dedup_since=0)
        with pytest.raises(StoreUnavailable, match="is gone"):
            await store.insert(CH, [msg(3)], dedup_since=0)
        with pytest.raises(StoreUnavailable, match="is gone"):
            await store.ping()
        assert await all_ids(store) == [1, 2]  # the unlinked file has it; no 201 was given
    finally:
        await store.close()


# -- a read-only file system --------------------------------------------------------------


def _chattr_problem() -> str | None:
    """Why `chattr +i` cannot be tried here (it needs root and ext2/3/4, xfs or btrfs)."""
    if shutil.which("chattr") is None:
        return "chattr is not installed"
    with tempfile.NamedTemporaryFile(dir=tempfile.gettempdir()) as probe:
        done = subprocess.run(["chattr", "+i", probe.name], capture_output=True, text=True)
        if done.returncode != 0:
            return f"chattr +i fails on {tempfile.gettempdir()}: {done.stderr.strip()}"
        subprocess.run(["chattr", "-i", probe.name], check=True)
    return None


CHATTR_PROBLEM = _chattr_problem()


@pytest.fixture
def immutable() -> Iterator[list[Path]]:
    """Files made immutable by the test, made mutable again at teardown whatever happens."""
    files: list[Path] = []
    yield files
    for f in files:
        subprocess.run(["chattr", "-i", str(f)], check=False, capture_output=True)


def _post(node: NodeProcess, path: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(node.url + path, json=body, timeout=10)


@pytest.mark.skipif(CHATTR_PROBLEM is not None, reason=f"needs chattr +i: {CHATTR_PROBLEM}")
@pytest.mark.parametrize("exclusive", ["false", "true"], ids=["shared", "exclusive"])
def test_read_only_store_answers_503_and_the_node_lives(
    node_factory: type[NodeProcess], tmp_path: Path, immutable: list[Path], exclusive: str
) -> None:
    """`chattr +i` stands in for ext4 remounting read-only after an error. The node used to
    die of SIGBUS (SQLite's mmap of the WAL index, written after the file went read-only); a
    shared store checks before SQLite touches the mapping, an exclusive one has none."""
    data = tmp_path / "ro"
    node = node_factory(data, SQLITE_EXCLUSIVE=exclusive).start()
    assert _post(node, "/channels/c/enqueue", {"messages": [{"body": 1}]}).status_code == 201
    store_files = sorted(data.glob("lionmq.db*"))
    for f in store_files:
        subprocess.run(["chattr", "+i", str(f)], check=True)
        immutable.append(f)
    for body in (2, 3, 4):
        r = _post(node, "/channels/c/enqueue", {"messages": [{"body": body}]})
        assert r.status_code == 503, r.text
        assert r.headers["retry-after"] == "1"
    ready = httpx.get(node.url + "/ready", timeout=10)
    assert ready.status_code == 503 and "cannot be written" in ready.json()["detail"]
    assert node.proc is not None and node.proc.poll() is None, node.log.read_text()

    for f in store_files:
        subprocess.run(["chattr", "-i", str(f)], check=True)
    wait_until(
        lambda: httpx.get(node.url + "/ready", timeout=5).status_code == 200, 10, "ready again"
    )
    assert _post(node, "/channels/c/enqueue", {"messages": [{"body": 5}]}).status_code == 201
    node.stop()
    again = node_factory(data, port=node.port, SQLITE_EXCLUSIVE=exclusive).start()
    got = _post(again, "/channels/c/dequeue", {"max": 10}).json()["messages"]
    assert [m["body"] for m in got] == [1, 5]


# -- a full disk ----------------------------------------------------------------------------
BIG = "x" * 20_000  # a message body that needs pages of its own (less than the probe's)


async def test_full_store_is_unready_while_idle_and_ready_once_writable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Reads work on a full store, so a read-only ping said "ready" while every write failed.
    `max_page_count` fills the database in-process as a full disk would."""
    monkeypatch.setattr("app.store.sqlite._PROBE_EVERY_S", 0.0)  # every ping probes
    store = SQLiteStore(str(tmp_path / "s.db"))
    await store.open()
    try:
        await store.insert(CH, [msg(1)], dedup_since=0)
        await store._write(lambda conn: conn.execute("PRAGMA max_page_count = 1"), None)  # = now
        with pytest.raises(StoreUnavailable, match="SQLITE_FULL"):
            await store.insert(CH, [msg(2, BIG.encode())], dedup_since=0)
        for _ in range(3):  # idle: each ping's own write fails too
            with pytest.raises(StoreUnavailable, match=r"are failing .*SQLITE_FULL"):
                await store.ping()
        await store._write(lambda conn: conn.execute("PRAGMA max_page_count = 1000000"), None)
        await store.ping()  # no traffic needed: the probe finds writes work again
        await store.insert(CH, [msg(3, BIG.encode())], dedup_since=0)
        assert await all_ids(store) == [1, 3]
    finally:
        await store.close()


async def test_a_failing_store_is_probed_at_most_every_half_second(tmp_path: Path) -> None:
    """Concurrent pings share one probe, and a ping within _PROBE_EVERY_S of the last probe
    reports the recorded failure without writing."""
    store = SQLiteStore(str(tmp_path / "s.db"))
    await store.open()
    try:
        await store._write(lambda conn: conn.execute("PRAGMA max_page_count = 1"), None)
        with pytest.raises(StoreUnavailable):
            await store.insert(CH, [msg(2, BIG.encode())], dedup_since=0)
        writes: list[object] = []
        real = store._write

        async def counted(op: Any, channel: str | None) -> Any:
            writes.append(op)
            return await real(op, channel)

        store._write = counted  # type: ignore[method-assign]
        results = await asyncio.gather(*(store.ping() for _ in range(5)), return_exceptions=True)
        assert all(isinstance(r, StoreUnavailable) for r in results), results
        with pytest.raises(StoreUnavailable):
            await store.ping()
        assert len(writes) == 1
    finally:
        await store.close()


def _tmpfs_problem() -> str | None:
    """Why a small tmpfs cannot be mounted here (it needs root and mount(8))."""
    if os.geteuid() != 0:
        return "mounting a tmpfs needs root"
    if shutil.which("mount") is None or shutil.which("umount") is None:
        return "mount/umount are not installed"
    with tempfile.TemporaryDirectory() as probe:
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", probe],
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            return f"mount -t tmpfs fails: {done.stderr.strip()}"
        subprocess.run(["umount", probe], check=True)
    return None


TMPFS_PROBLEM = _tmpfs_problem()


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 3 MiB tmpfs, unmounted at teardown whatever happens."""
    where = tmp_path / "disk"
    where.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(where)], check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False, capture_output=True)


@pytest.mark.skipif(TMPFS_PROBLEM is not None, reason=f"needs a tmpfs: {TMPFS_PROBLEM}")
def test_full_disk_makes_the_node_unready_until_space_is_back(
    small_disk: Path, node_factory: type[NodeProcess], tmp_path: Path
) -> None:
    node = node_factory(small_disk, port=None)
    node.log = tmp_path / "node.log"  # not on the full disk
    node.start()
    for _ in range(400):  # 3 MiB fills within ~150 of these
        r = _post(node, "/channels/c/enqueue", {"messages": [{"body": BIG}]})
        if r.status_code != 201:
            break
    assert r.status_code == 503, r.text
    assert "SQLITE_FULL" in r.json()["detail"]
    accepted = httpx.get(node.url + "/channels/c", timeout=10).json()["counts"]["ready"]
    # Idle with the disk full: unready every time it is asked, for longer than a probe period.
    deadline = time.monotonic() + 1.5
    while time.monotonic() < deadline:
        ready = httpx.get(node.url + "/ready", timeout=10)
        assert ready.status_code == 503, ready.text
        assert "are failing" in ready.json()["detail"], ready.text
    subprocess.run(["mount", "-o", "remount,size=20m", str(small_disk)], check=True)
    wait_until(
        lambda: httpx.get(node.url + "/ready", timeout=5).status_code == 200,
        3,
        "ready again once the disk has room, without traffic",
    )
    assert _post(node, "/channels/c/enqueue", {"messages": [{"body": 1}]}).status_code == 201
    assert node.proc is not None and node.proc.poll() is None, node.log.read_text()
    node.stop()
    again = node_factory(small_disk, port=node.port)
    again.log = node.log
    again.start()
    ready_after = httpx.get(again.url + "/channels/c", timeout=10).json()["counts"]["ready"]
    assert ready_after == accepted + 1  # every 201 kept, none of the 503s


@pytest.mark.skipif(CHATTR_PROBLEM is not None, reason=f"needs chattr +i: {CHATTR_PROBLEM}")
@pytest.mark.parametrize(
    ("exclusive", "why"),
    [
        # The WAL index is guarded (shared), but a clean stop left none: SQLite refuses the
        # write to the database itself, in both modes.
        (
            "false",
            "the embedded store failed: attempt to write a readonly database (SQLITE_READONLY)",
        ),
        (
            "true",
            "the embedded store failed: attempt to write a readonly database (SQLITE_READONLY)",
        ),
    ],
    ids=["shared", "exclusive"],
)
def test_start_on_a_store_that_cannot_be_written_fails_in_one_line(
    node_factory: type[NodeProcess],
    tmp_path: Path,
    immutable: list[Path],
    exclusive: str,
    why: str,
) -> None:
    """It used to fail at the node-secret write with SQLITE_READONLY inside the lifespan, and
    uvicorn printed the traceback."""
    data = tmp_path / "ro-start"
    node = node_factory(data, SQLITE_EXCLUSIVE=exclusive).start()
    assert _post(node, "/channels/c/enqueue", {"messages": [{"body": 1}]}).status_code == 201
    node.stop()
    for f in sorted(data.glob("lionmq.db*")):
        subprocess.run(["chattr", "+i", str(f)], check=True)
        immutable.append(f)
    again = NodeProcess(data, port=node.port, SQLITE_EXCLUSIVE=exclusive)
    done = subprocess.run(
        [sys.executable, "-m", "app"],
        cwd=data,
        env=again.env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    store = str(data / "lionmq.db")
    named = [line for line in done.stderr.splitlines() if store in line]
    assert named == [f"lionmq: cannot start (sqlite {store}): {why.format(store=store)}"], (
        done.stderr
    )


_READER = """
import asyncio, sys
from app.errors import StoreUnavailable
from app.models import Message
from app.store.sqlite import SQLiteStore

async def main():
    store = SQLiteStore(sys.argv[1])
    await store.open()
    await store.insert("c", [Message(id=1, body=b"1", headers=None, enqueued_at=1)], 0)
    print("written", flush=True)
    sys.stdin.readline()  # the files are immutable now
    try:
        await store.page_ready("c", 0, 10, 10)
    except StoreUnavailable as exc:
        print("refused:", exc.detail, flush=True)
        return
    print("read", flush=True)

asyncio.run(main())
"""


@pytest.mark.skipif(CHATTR_PROBLEM is not None, reason=f"needs chattr +i: {CHATTR_PROBLEM}")
def test_a_read_of_a_shared_store_gone_read_only_is_refused_not_a_sigbus(
    tmp_path: Path, immutable: list[Path]
) -> None:
    """A read transaction writes its read mark into the mmapped WAL index; once that file is
    immutable (its pages written back and write-protected), the write is a SIGBUS. The shared
    store checks the -shm file before each read and refuses instead."""
    path = tmp_path / "r.db"
    proc = subprocess.Popen(
        [sys.executable, "-c", _READER, str(path)],
        cwd=Path(__file__).resolve().parent.parent,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stdin is not None
        assert proc.stdout.readline().strip() == "written"
        for f in sorted(tmp_path.glob("r.db*")):
            subprocess.run(["chattr", "+i", str(f)], check=True)
            immutable.append(f)
        proc.stdin.write("\n")
        proc.stdin.flush()
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
        proc.wait(5)
    assert proc.returncode == 0, (proc.returncode, err)  # -7 would be SIGBUS
    assert out.startswith("refused:") and "r.db-shm cannot be written" in out, out
