"""`lionmq nodes …` against a real cluster: one shard, a primary and its backup, two node
processes on one SQLite file; and the hand-off call's routing, on a fake transport."""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import msgspec
import pytest
from cli_support import cli_env, lionmq, lionmq_here
from lionmq import AsyncClient, Client, RetryPolicy, ServiceUnavailable

from tests.conftest import NodeProcess, wait_until

ADMIN = "cli-admin-token"


def view(node: NodeProcess) -> dict[str, object]:
    got: dict[str, object] = httpx.get(node.url + "/cluster", timeout=5).json()
    return got


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[NodeProcess, NodeProcess]]:
    data: Path = tmp_path_factory.mktemp("cli-cluster")
    a, b = NodeProcess(data), NodeProcess(data)
    init = msgspec.json.encode({"shards": [{"primary": a.url, "backups": [b.url]}]}).decode()
    settings = {
        "LEASE_MS": "1000",
        "HEARTBEAT_MS": "200",
        "CLUSTER_INIT": init,
        "CLUSTER_SECRET": "cli-secret",
        "ADMIN_TOKEN": ADMIN,
    }
    for node in (a, b):
        node.env.update(settings)
    try:
        with ThreadPoolExecutor(1) as pool:  # the two start-ups overlap
            second = pool.submit(b.start)
            a.start()
            second.result()
        wait_until(
            lambda: (
                all(
                    n.get("status") == "up" and n.get("heartbeat_age_ms") is not None
                    for n in view(a)["nodes"]  # type: ignore[attr-defined]
                )
                and len(view(a)["nodes"]) == 2  # type: ignore[arg-type]
                and view(a)["shards"][0]["owner"] == a.url
            ),  # type: ignore[index]
            15,
            "a owns s1, both nodes up",
        )
        yield a, b
    finally:
        a.kill9()
        b.kill9()


def test_nodes_show_handoff_and_set(pair: tuple[NodeProcess, NodeProcess]) -> None:
    a, b = pair
    env = cli_env(LIONMQ_URL=f"{b.url},{a.url}", LIONMQ_ADMIN_TOKEN=ADMIN)
    shown = lionmq("nodes", "show", "--json", env=env)
    assert shown.code == 0, shown.err
    (shard,) = json.loads(shown.out)["shards"]
    assert (shard["id"], shard["owner"], shard["backups"]) == ("s1", a.url, [b.url])
    table = lionmq_here("nodes", "show", env=env).out.splitlines()
    assert table[0] == f"topology version 1, answered by {b.url} (backup)"
    assert table[2].split() == ["SHARD", "PRIMARY", "BACKUPS", "OWNER", "EPOCH", "LEASE",
                                "CHANNELS"]  # fmt: skip
    assert table[3].split()[:4] == ["s1", a.url, b.url, a.url]
    roles = {line.split()[0]: line.split()[2] for line in table[6:]}
    assert roles == {a.url: "primary", b.url: "backup"}

    # The backup must have heard the owner's latest state to be handed the shard.
    handed = lionmq("nodes", "handoff", "s1", env=env)
    assert handed.code == 0, handed.err
    assert handed.out.startswith(f"shard s1 handed from {a.url} to {b.url} (epoch ")
    wait_until(lambda: view(a)["shards"][0]["owner"] == b.url, 5, "b owns s1")  # type: ignore[index]
    again = lionmq_here("nodes", "handoff", "s1", "--to", b.url, env=env)
    assert again.code == 1 and again.err.startswith("lionmq: error: ")

    stored = lionmq_here("nodes", "set", "--shard", f"{b.url}={a.url}", env=env)
    assert stored.code == 0, stored.err
    assert stored.out.splitlines()[0] == "stored topology version 2"
    assert stored.out.splitlines()[2].split() == ["s1", b.url, a.url]
    refused = lionmq_here("nodes", "set", "--shard", f"{b.url}={b.url}", env=env)
    assert refused.code == 2  # checked before sending, as the nodes would
    assert (
        refused.err == f"lionmq: error: {b.url} is the primary of shard 1 and a backup of shard 1\n"
    )


def fake_cluster(sent: list[str]) -> httpx.MockTransport:
    """GET /cluster names p:1 as the owner of s1; every hand-off answers 503."""
    topology = {
        "version": 1,
        "shards": [
            {"id": "s1", "primary": "http://p:1", "backups": ["http://k:2"], "owner": "http://p:1"}
        ],
    }

    def answer(request: httpx.Request) -> httpx.Response:
        sent.append(f"{request.method} {request.url}")
        if request.url.path == "/cluster":
            return httpx.Response(200, json=topology)
        return httpx.Response(503, json={"title": "Unavailable", "detail": "draining"})

    return httpx.MockTransport(answer)


RETRY = RetryPolicy(attempts=4, base_delay=0.001, max_delay=0.01)
ONCE = ["GET http://k:2/cluster", "POST http://p:1/cluster/shards/s1/handoff"]


def test_handoff_goes_to_the_owner_once_never_retried() -> None:
    """A hand-off repeated after a failure could move the shard on again: sent once, to the
    shard's owner as GET /cluster names it."""
    sent: list[str] = []
    transport = fake_cluster(sent)
    with (
        Client("http://k:2", transport=transport, retry=RETRY, admin_token=ADMIN) as client,
        pytest.raises(ServiceUnavailable, match="draining"),
    ):
        client.handoff("s1")
    assert sent == ONCE


async def test_async_handoff_goes_to_the_owner_once_never_retried() -> None:
    sent: list[str] = []
    transport = fake_cluster(sent)
    async with AsyncClient(
        "http://k:2", transport=transport, retry=RETRY, admin_token=ADMIN
    ) as client:
        with pytest.raises(ServiceUnavailable, match="draining"):
            await client.handoff("s1")
    assert sent == ONCE
