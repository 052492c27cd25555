"""The cluster harness itself: its checks on synthetic books, the proxy, and the load driving a
single node on the shared store file (what works before any cluster code exists)."""

from __future__ import annotations

import json
import math
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.cluster.ledger import (
    Ack,
    Books,
    Delivery,
    Enqueued,
    Ledger,
    Op,
    acked_redelivered,
    duplicated,
    longest_outage,
    lost,
    overlapping,
    problems,
    refused,
    server_errors,
)
from tests.cluster.load import Caller, Load, Probe, drain, first_served
from tests.cluster.nodes import API_TOKEN, Cluster, channels_on
from tests.cluster.proxy import TcpProxy
from tests.conftest import NodeProcess, wait_until

V = 5.0  # visibility of the synthetic deliveries, seconds


def delivery(
    id: str, attempt: int, node: str, at: float, receipt: str | None = None, token: str = "t"
) -> Delivery:
    return Delivery("c", id, token, attempt, receipt or f"{id}-{attempt}-{node}", node, at, at, V)


# -- the checks, on synthetic books


def test_lost_is_a_confirmed_enqueue_never_delivered() -> None:
    books = Books(
        enqueued=[Enqueued("c", "1", "a", 0), Enqueued("c", "2", "b", 0)],
        deliveries=[delivery("1", 1, "n1", 1)],
    )
    assert len(lost(books)) == 1 and "message 2 " in lost(books)[0]
    assert (
        lost(
            Books(
                enqueued=books.enqueued, deliveries=[*books.deliveries, delivery("2", 1, "n1", 1)]
            )
        )
        == []
    )


def test_an_acked_message_delivered_again_is_caught_by_attempt_or_by_time() -> None:
    first = delivery("1", 1, "n1", 10)
    ack = Ack("c", "1", first.receipt, 10.1)
    # a later attempt, even one that came before the ack was confirmed
    assert acked_redelivered(Books(deliveries=[first, delivery("1", 2, "n2", 10.05)], acks=[ack]))
    # the same attempt number again (a new owner that lost the count), asked after the ack
    assert acked_redelivered(
        Books(deliveries=[first, delivery("1", 1, "n2", 30, "r2")], acks=[ack])
    )
    # redelivered because the ack was stale (not confirmed): no ack in the books, no finding
    assert acked_redelivered(Books(deliveries=[first, delivery("1", 2, "n2", 30)])) == []
    assert acked_redelivered(Books(deliveries=[first], acks=[ack])) == []


def test_two_deliveries_within_one_lease_overlap_whatever_the_nodes() -> None:
    first = delivery("1", 1, "n1", 10)
    inside = delivery("1", 2, "n2", 10 + V - 1)
    after = delivery("1", 2, "n2", 10 + V + 0.01)
    assert overlapping(Books(deliveries=[first, inside]))
    assert overlapping(Books(deliveries=[inside, first]))  # order of booking does not matter
    assert overlapping(Books(deliveries=[first, after])) == []
    # a lease that began late (answer slow to come) still counts from when it was asked
    slow = Delivery("c", "1", "t", 1, "r", "n1", 10, 12, V)
    assert overlapping(Books(deliveries=[slow, delivery("1", 2, "n2", 10 + V + 0.06)])) == []


def test_a_token_stored_twice_is_a_duplicate() -> None:
    books = Books(
        enqueued=[Enqueued("c", "1", "a", 0), Enqueued("c", "2", "b", 0)],
        deliveries=[delivery("3", 1, "n1", 1, token="a")],
    )
    assert len(duplicated(books)) == 1 and "'1', '3'" in duplicated(books)[0]


def test_server_errors_and_refusals_but_not_503_or_429() -> None:
    ops = [
        Op("c", "enqueue", "u", 0, 1, status)
        for status in (201, 200, 0, 503, 429, 500, 502, 400, 401)
    ]
    books = Books(ops=ops)
    assert [e.split()[-3] for e in server_errors(books)] == ["500", "502"]
    assert [e.split()[-3] for e in refused(books)] == ["400", "401"]
    assert len(problems(books)) == 4


def test_longest_outage_is_the_widest_gap_between_successes() -> None:
    ops = [Op("c", "enqueue", "u", t - 0.01, t, 201) for t in (1.0, 1.1, 1.2, 2.0, 2.1)]
    ops += [Op("c", "enqueue", "u", 1.3, 1.9, 503), Op("d", "enqueue", "u", 0, 5, 201)]
    assert longest_outage(ops, "c", 1.15, 2.05) == pytest.approx(0.8)
    assert longest_outage(ops, "c", 2.05, 3) == pytest.approx(0.1)
    assert longest_outage(ops, "c", 2.2, 3) == math.inf


# -- the proxy


@pytest.fixture
def echo_port() -> Iterator[int]:
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        for _ in range(10_000):
            if stop.is_set():
                return
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            threading.Thread(target=echo, args=(conn,), daemon=True).start()

    def echo(conn: socket.socket) -> None:
        with conn:
            conn.settimeout(5)
            try:
                while data := conn.recv(4096):
                    conn.sendall(data)
            except OSError:
                return

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    stop.set()
    thread.join(5)
    server.close()


def talk(port: int, data: bytes, timeout: float = 1.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        return s.recv(4096)


def test_the_proxy_relays_cuts_and_restores(echo_port: int) -> None:
    with TcpProxy(echo_port) as proxy:
        assert talk(proxy.port, b"hello") == b"hello"
        assert proxy.bytes_up == 5 and proxy.bytes_down == 5 and proxy.connections == 1
        # an open connection dies with the cut
        held = socket.create_connection(("127.0.0.1", proxy.port), timeout=1)
        held.sendall(b"x")
        assert held.recv(10) == b"x"
        proxy.cut("refuse")
        with pytest.raises(OSError):
            held.sendall(b"y")
            if held.recv(10) == b"":
                raise ConnectionResetError("closed")
        held.close()
        with pytest.raises(OSError):
            if talk(proxy.port, b"again") == b"":
                raise ConnectionResetError("closed")
        proxy.cut("blackhole")
        with pytest.raises(TimeoutError):
            talk(proxy.port, b"lost", timeout=0.3)
        proxy.restore()
        assert talk(proxy.port, b"back") == b"back"


# -- the cluster's layout, without starting it


def test_build_lays_out_shards_secrets_and_proxied_hosts(tmp_path: Path) -> None:
    cluster = Cluster.build(tmp_path, [[0, 1], [2, 3]], spare=1, proxied=[1])
    assert len(cluster.nodes) == 5
    n = cluster.nodes
    assert n[1].server_host == cluster.proxies[1].url != n[1].url
    assert cluster.proxies[1].target_port == n[1].port
    init = json.loads(n[4].env["CLUSTER_INIT"])
    assert init == {
        "shards": [
            {"primary": n[0].url, "backups": [n[1].server_host]},
            {"primary": n[2].url, "backups": [n[3].url]},
        ]
    }
    assert {node.env["STORE_URL"] for node in n} == {f"sqlite:///{tmp_path}/lionmq.db"}
    assert len({node.node_id for node in n}) == 5
    assert {node.env["SERVER_HOST"] for node in n} == {node.server_host for node in n}
    for key in ("CLUSTER_SECRET", "ADMIN_TOKEN", "API_TOKEN", "HEARTBEAT_MS", "LEASE_MS"):
        assert len({node.env[key] for node in n}) == 1


def test_channels_on_places_as_many_on_each_shard() -> None:
    from lionmq.placement import shard_for

    names = channels_on(["s1", "s2", "s3"], 4)
    assert len(set(names)) == 12
    assert [shard_for(c, ["s1", "s2", "s3"]) for c in names] == ["s1"] * 4 + ["s2"] * 4 + ["s3"] * 4
    # a subset of the shards, placed over all of them
    (one,) = channels_on(["s2"], 1, among=["s1", "s2", "s3"])
    assert shard_for(one, ["s1", "s2", "s3"]) == "s2"


# -- load and books against one real node on the shared file


def test_load_drain_and_checks_on_a_standalone_node(
    node_factory: type[NodeProcess], tmp_path: Path
) -> None:
    """Producers and consumers through a kill -9 and a restart: the retries carry them over,
    and a node that keeps its promises passes every check."""
    node = node_factory(tmp_path / "store", API_TOKEN=API_TOKEN).start()
    ledger = Ledger()
    channels = ["h-a", "h-b", "h-c"]
    targets = lambda: [node.url]  # noqa: E731
    with Load(targets, channels, ledger, API_TOKEN, visibility_ms=2000):
        wait_until(lambda: ledger.confirmed_count() >= 60, 20, "60 confirmed enqueues")
        node.kill9()
        node = node_factory(tmp_path / "store", port=node.port, API_TOKEN=API_TOKEN).start()
        more = ledger.confirmed_count() + 30
        wait_until(lambda: ledger.confirmed_count() >= more, 20, "30 more after the restart")
        probe = Probe(targets, "h-probe", ledger, API_TOKEN).start()
        caller = Caller(ledger, API_TOKEN)
        started = time.monotonic()
        answer = first_served(caller, node.url, "h-first", None, 5)
        assert answer.status == 201 and time.monotonic() - started < 5
        caller.close()
        wait_until(lambda: ledger.delivered_count() >= 30, 20, "30 deliveries")
        probe.stop()
    drain(targets, [*channels, "h-probe", "h-first"], ledger, API_TOKEN, 2000, 30)
    books = ledger.books()
    assert problems(books) == []
    assert len(books.enqueued) >= 90
    assert {op.status for op in books.ops} >= {0, 200, 201}, "the kill went unnoticed"
    assert {e.id for e in books.enqueued} <= {d.id for d in books.deliveries}
    since = min(op.started for op in books.ops if op.channel == "h-probe")
    assert longest_outage(books.ops, "h-probe", since, since + 0.5) < 1.0


def test_pause_resume_kill_restart_and_proxy_a_node(tmp_path: Path) -> None:
    """Without a topology a node serves alone; the process controls work on it, and the proxy
    (its SERVER_HOST) carries and cuts its traffic."""
    cluster = Cluster.build(tmp_path, [[0]], proxied=[0], CLUSTER_INIT="")
    node = cluster.nodes[0]
    proxy = cluster.proxies[0]
    try:
        proxy.start()
        node.start()
        headers = {"Authorization": f"Bearer {API_TOKEN}"}
        url = f"{node.url}/channels/pr/enqueue"
        body = {"messages": [{"body": 1}]}
        assert httpx.post(url, json=body, headers=headers).status_code == 201
        via_proxy = f"{node.server_host}/channels/pr/enqueue"
        assert httpx.post(via_proxy, json=body, headers=headers).status_code == 201
        assert proxy.bytes_up > 0 and proxy.bytes_down > 0
        proxy.cut("refuse")
        with pytest.raises(httpx.TransportError):
            httpx.post(via_proxy, json=body, headers=headers, timeout=1)
        proxy.cut("blackhole")
        with pytest.raises(httpx.TimeoutException):
            httpx.post(via_proxy, json=body, headers=headers, timeout=0.5)
        proxy.restore()
        assert httpx.post(via_proxy, json=body, headers=headers).status_code == 201
        node.pause()
        assert not node.serving and cluster.urls() == []
        with pytest.raises(httpx.TimeoutException):
            httpx.post(url, json=body, headers=headers, timeout=0.5)
        node.resume()
        assert httpx.post(url, json=body, headers=headers, timeout=5).status_code == 201
        node.kill9()
        assert not node.running
        node.restart()
        # The lease of the killed incarnation runs out first (at most LEASE_MS).
        wait_until(lambda: httpx.get(f"{node.url}/ready").status_code == 200, 10, "ready again")
        r = httpx.get(f"{node.url}/channels/pr", headers=headers)
        assert r.json()["counts"]["ready"] >= 4  # the SIGSTOPped one may have landed too
    finally:
        cluster.stop()
