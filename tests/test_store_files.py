"""The store's files changing under a running node: deleted, moved, turned read-only.

The node must answer 503 (never 201 for a write it cannot keep) and must not die of it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
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
def test_read_only_store_answers_503_and_the_node_lives(
    node_factory: type[NodeProcess], tmp_path: Path, immutable: list[Path]
) -> None:
    """`chattr +i` stands in for ext4 remounting read-only after an error. The node used to
    die of SIGBUS (SQLite's mmap of the WAL index, written after the file went read-only)."""
    data = tmp_path / "ro"
    node = node_factory(data).start()
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
    again = node_factory(data, port=node.port).start()
    got = _post(again, "/channels/c/dequeue", {"max": 10}).json()["messages"]
    assert [m["body"] for m in got] == [1, 5]
