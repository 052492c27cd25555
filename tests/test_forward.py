"""The router: a node forwards a channel it does not own one hop to the owner (two real nodes)."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import httpx
import msgspec
import pytest
from fastapi import FastAPI

from app.api import forward
from app.api.channels import ChannelList
from app.cluster.route import Local, NoOwner, Remote
from app.errors import ConfigError, OwnerUnreachable, ShardUnavailable
from app.main import NodeApp, create_app
from app.settings import CLUSTER_SECRET_HEADER, Settings
from tests.conftest import free_port
from tests.forward_support import Echo, FakeRouter, Served, eventually

TOKEN = "s3cret-token"
SECRET = "pair-cluster-secret"
AUTH = {"authorization": f"Bearer {TOKEN}"}
LIMIT = 4096  # MAX_REQUEST_BYTES of the nodes here


@dataclass
class Pair:
    """Node A (the one clients ask) and node B (the owner of channel `far`)."""

    a: Served
    b: Served
    app_a: NodeApp
    app_b: NodeApp
    router_a: FakeRouter
    router_b: FakeRouter
    client: httpx.AsyncClient  # a client of node A
    fwd_a: aiohttp.ClientSession  # node A's forwarding session

    def remote_b(self) -> Remote:
        return Remote("s1", self.b.url, "node-b")

    def channel_at(self, app: NodeApp, name: str) -> object:
        return app.state.node.engine.channels.get(name)


def node_app(tmp_path: Path, node_id: str, port: int) -> NodeApp:
    settings = Settings(
        _env_file=None,  # type: ignore[call-arg]
        node_id=node_id,
        host="127.0.0.1",
        port=port,
        api_token=TOKEN,
        cluster_secret=SECRET,
        max_request_bytes=LIMIT,
        store_url=f"sqlite:///{tmp_path}/{node_id}.db",
    )
    app = create_app(settings)
    assert isinstance(app, NodeApp)
    return app


@pytest.fixture
async def pair(tmp_path: Path) -> AsyncIterator[Pair]:
    port_a, port_b = free_port(), free_port()
    app_a, app_b = node_app(tmp_path, "node-a", port_a), node_app(tmp_path, "node-b", port_b)
    router_a, router_b = FakeRouter("node-a"), FakeRouter("node-b")
    async with (
        forward.forward_session() as fwd_a,
        forward.forward_session() as fwd_b,
        Served(app_a, port_a) as a,
        Served(app_b, port_b) as b,
        httpx.AsyncClient(base_url=a.url, headers=AUTH, timeout=15) as client,
    ):
        forward.install(app_a, router_a, fwd_a)
        forward.install(app_b, router_b, fwd_b)
        pair = Pair(a, b, app_a, app_b, router_a, router_b, client, fwd_a)
        router_a.routes["far"] = pair.remote_b()
        yield pair


def forwarded_by_a(response: httpx.Response, served_by: str | None = "node-b") -> None:
    assert response.headers.get("x-lionmq-forwarded-by") == "node-a", response.headers
    assert response.headers.get("x-lionmq-node") == served_by, response.headers


async def test_every_channel_route_is_forwarded_to_the_owner(pair: Pair) -> None:
    c = pair.client
    r = await c.put("/channels/far", json={"max_attempts": 5})
    assert r.status_code == 200, r.text
    forwarded_by_a(r, served_by=None)  # not a message operation
    assert pair.channel_at(pair.app_b, "far") is not None
    assert pair.channel_at(pair.app_a, "far") is None

    r = await c.post("/channels/far/enqueue", json={"messages": [{"body": {"n": 1}}]})
    assert r.status_code == 201, r.text
    forwarded_by_a(r)
    r = await c.post("/channels/far/dequeue", json={"max": 1})
    forwarded_by_a(r)
    [message] = r.json()["messages"]
    assert message["body"] == {"n": 1}
    receipt = message["receipt"]
    r = await c.post("/channels/far/extend", json={"receipts": [receipt], "visibility_ms": 5000})
    assert (r.status_code, r.json()["extended"]) == (200, 1)
    forwarded_by_a(r)
    r = await c.post("/channels/far/nack", json={"receipts": [receipt]})
    assert (r.status_code, r.json()["nacked"]) == (200, 1)
    forwarded_by_a(r)
    r = await c.post("/channels/far/dequeue", json={"max": 1})
    [again] = r.json()["messages"]
    assert again["attempt"] == 2
    r = await c.post("/channels/far/ack", json={"receipts": [again["receipt"]]})
    assert (r.status_code, r.json()["acked"]) == (200, 1)
    forwarded_by_a(r)

    await c.post("/channels/far/enqueue", json={"messages": [{"body": 2}, {"body": 3}]})
    r = await c.get("/channels/far")
    assert r.status_code == 200
    assert r.json()["counts"]["ready"] == 2
    assert r.json()["settings"]["max_attempts"] == 5
    forwarded_by_a(r, served_by=None)
    r = await c.post("/channels/far/purge")
    assert r.json() == {"purged": 2}
    forwarded_by_a(r, served_by=None)
    r = await c.delete("/channels/far")
    assert r.status_code == 204
    assert "content-length" not in r.headers  # none on a 204, as the owner sends it
    forwarded_by_a(r, served_by=None)
    assert pair.channel_at(pair.app_b, "far") is None

    # The owner's problem+json errors come back unchanged.
    r = await c.get("/channels/far")
    direct = await httpx.AsyncClient(headers=AUTH).get(f"{pair.b.url}/channels/far")
    assert r.status_code == direct.status_code == 404
    assert r.headers["content-type"] == "application/problem+json"
    assert r.json() == direct.json()
    r = await c.post("/channels/far/ack", json={"receipts": []})
    assert r.status_code == 422
    assert r.headers["content-type"] == "application/problem+json"
    forwarded_by_a(r)


async def test_a_channel_served_here_names_this_node_and_is_not_forwarded(pair: Pair) -> None:
    r = await pair.client.post("/channels/near/enqueue", json={"messages": [{"body": 1}]})
    assert r.status_code == 201
    assert r.headers["x-lionmq-node"] == "node-a"
    assert "x-lionmq-forwarded-by" not in r.headers
    r = await pair.client.post("/channels/near/ack", json={"receipts": ["nope"]})
    assert r.status_code == 400
    assert r.headers["x-lionmq-node"] == "node-a"  # refusals too
    assert pair.channel_at(pair.app_b, "near") is None


async def test_long_poll_is_forwarded_and_answered_when_a_message_comes(pair: Pair) -> None:
    await pair.client.put("/channels/far")
    poll = asyncio.ensure_future(
        pair.client.post("/channels/far/dequeue", json={"max": 1, "wait_ms": 5000})
    )
    far = pair.app_b.state.node.engine.channels["far"]
    await eventually(lambda: any(not w.done() for w in far.waiters), 5, "the poll at the owner")
    async with httpx.AsyncClient(base_url=pair.b.url, headers=AUTH) as direct:
        r = await direct.post("/channels/far/enqueue", json={"messages": [{"body": "late"}]})
        assert r.status_code == 201
    r = await asyncio.wait_for(poll, 10)
    assert [m["body"] for m in r.json()["messages"]] == ["late"]
    forwarded_by_a(r)


async def test_a_client_that_hangs_up_cancels_the_long_poll_at_the_owner(pair: Pair) -> None:
    await pair.client.put("/channels/far")
    far = pair.app_b.state.node.engine.channels["far"]
    polling = lambda: any(not w.done() for w in far.waiters)  # noqa: E731
    async with httpx.AsyncClient(base_url=pair.a.url, headers=AUTH, timeout=15) as gone:
        poll = asyncio.ensure_future(
            gone.post("/channels/far/dequeue", json={"max": 1, "wait_ms": 10_000})
        )
        await eventually(polling, 5, "the poll at the owner")
        poll.cancel()  # closes the client's connection to node A
        await asyncio.wait((poll,))
    await eventually(lambda: not polling(), 3, "the owner to stop the poll of a gone client")
    # Nothing was leased to the client that left: the next message goes to the next consumer.
    async with httpx.AsyncClient(base_url=pair.b.url, headers=AUTH) as direct:
        await direct.post("/channels/far/enqueue", json={"messages": [{"body": "kept"}]})
        r = await direct.post("/channels/far/dequeue", json={"max": 1})
    [message] = r.json()["messages"]
    assert (message["body"], message["attempt"]) == ("kept", 1)


async def test_a_forwarded_request_is_never_forwarded_again(pair: Pair) -> None:
    # A and B disagree for a moment (a hand-off): each sees the other as the owner.
    pair.router_a.routes["ping"] = pair.remote_b()
    pair.router_b.routes["ping"] = Remote("s1", pair.a.url, "node-a")
    r = await pair.client.post("/channels/ping/enqueue", json={"messages": [{"body": 1}]})
    assert r.status_code == 503
    assert r.headers["retry-after"] == "1"
    assert r.headers["content-type"] == "application/problem+json"
    assert "moving" in r.json()["detail"]
    assert "forwarded once" in r.json()["detail"]
    forwarded_by_a(r, served_by=None)  # B refused what A forwarded; A passed B's answer back
    # A request that comes marked is not sent on either.
    r = await pair.client.post(
        "/channels/far/enqueue",
        json={"messages": [{"body": 1}]},
        headers={"x-lionmq-forwarded": "node-z"},
    )
    assert (r.status_code, r.headers["retry-after"]) == (503, "1")
    assert "node-z" in r.json()["detail"]
    assert pair.channel_at(pair.app_b, "far") is None


async def test_no_owner_answers_503_with_retry_after(pair: Pair) -> None:
    pair.router_a.routes["orphan"] = NoOwner("s2", 2, "failover under way")
    for method, path in [("POST", "/channels/orphan/dequeue"), ("GET", "/channels/orphan")]:
        r = await pair.client.request(method, path)
        assert r.status_code == 503
        assert r.headers["retry-after"] == "2"
        assert r.headers["content-type"] == "application/problem+json"
        assert "s2" in r.json()["detail"]
        assert "failover under way" in r.json()["detail"]


async def test_an_owner_that_is_down_answers_503_never_500(pair: Pair) -> None:
    dead = free_port()  # nothing listens there
    pair.router_a.routes["far"] = Remote("s1", f"http://127.0.0.1:{dead}", "node-dead")
    r = await pair.client.post("/channels/far/enqueue", json={"messages": [{"body": 1}]})
    assert r.status_code == 503
    assert r.headers["retry-after"] == "1"
    assert r.headers["content-type"] == "application/problem+json"
    detail = r.json()["detail"]
    assert "node-dead" in detail
    assert f"127.0.0.1:{dead}" in detail
    assert "Cannot connect" in detail


async def test_an_owner_that_never_answers_times_out_with_503(pair: Pair) -> None:
    accepted: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)  # reads nothing, answers nothing

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with forward.forward_session(read_s=0.3) as impatient:
            forward.install(pair.app_a, pair.router_a, impatient)
            pair.router_a.routes["far"] = Remote("s1", f"http://127.0.0.1:{port}", "node-stuck")
            r = await pair.client.post("/channels/far/dequeue")
        assert r.status_code == 503
        assert "node-stuck" in r.json()["detail"]
        assert "timed out" in r.json()["detail"]
        assert accepted
    finally:
        for writer in accepted:
            writer.close()
        server.close()
        await server.wait_closed()


async def test_a_stuck_owner_is_given_up_on_before_a_long_polls_wait(
    pair: Pair, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The forwarding session reads for as long as the longest long poll; anything else an owner
    # holds for seconds means it is stuck (frozen): the client must not wait out the long poll.
    accepted: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    stuck = Remote("s1", f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}", "node-stuck")
    lists = msgspec.json.Decoder(ChannelList)
    try:
        assert pair.fwd_a.timeout.sock_read == forward.READ_TIMEOUT_S
        with pytest.raises(OwnerUnreachable, match=r"node-stuck.*timed out"):
            await asyncio.wait_for(
                forward.fan_out(
                    pair.fwd_a,
                    [stuck],
                    "/channels",
                    lists,
                    node_id="node-a",
                    secret=SECRET,
                    authorization=None,
                    read_s=0.3,
                ),
                5,
            )
        assert forward.ANSWER_TIMEOUT_S < forward.READ_TIMEOUT_S / 2
        monkeypatch.setattr(forward, "ANSWER_TIMEOUT_S", 0.3)
        pair.router_a.routes["far"] = stuck
        enqueue = pair.client.post("/channels/far/enqueue", json={"messages": [{"body": 1}]})
        r = await asyncio.wait_for(enqueue, 5)
        assert r.status_code == 503 and "timed out" in r.json()["detail"], r.text
        timeout = forward.patience(pair.fwd_a, forward.ANSWER_TIMEOUT_S)
        assert timeout.sock_read == forward.ANSWER_TIMEOUT_S
        assert timeout.sock_connect == pair.fwd_a.timeout.sock_connect
    finally:
        for writer in accepted:
            writer.close()
        server.close()
        await server.wait_closed()


async def test_request_and_answer_pass_through_but_hop_by_hop_headers(pair: Pair) -> None:
    echo = Echo()
    async with Served(echo, free_port()) as owner:
        pair.router_a.routes["far"] = Remote("s1", owner.url, "node-echo")
        body = b'{"messages": [{"body": "x"}]}'
        r = await pair.client.post(
            "/channels/far/enqueue?trace=1&q=a%20b",
            content=body,
            headers={
                "content-type": "application/json",
                "x-custom": "kept",
                "connection": "keep-alive, x-private",
                "x-private": "dropped",
                "keep-alive": "timeout=5",
                "te": "trailers",
            },
        )
        head = await pair.client.head("/channels/far")  # the owner's length, and no body
    assert (head.status_code, head.headers["content-length"], head.content) == (418, "14", b"")
    assert r.status_code == 418
    assert r.json() == {"echo": True}
    assert r.headers["content-type"] == "application/problem+json"
    assert r.headers["x-echo"] == "yes"
    assert r.headers["cache-control"] == "no-store"
    assert r.headers["x-lionmq-forwarded-by"] == "node-a"
    assert len(r.headers.get_list("date")) == 1
    assert len(r.headers.get_list("server")) <= 1
    seen, _ = echo.seen
    assert seen["method"] == "POST"
    assert seen["raw_path"] == b"/channels/far/enqueue"
    assert seen["query"] == b"trace=1&q=a%20b"
    assert seen["body"] == body
    headers = dict(seen["headers"])
    assert headers[b"host"] == f"127.0.0.1:{owner.port}".encode()
    assert headers[b"authorization"] == f"Bearer {TOKEN}".encode()
    assert headers[b"x-lionmq-forwarded"] == b"node-a"
    assert headers[b"x-custom"] == b"kept"
    assert headers[b"content-type"] == b"application/json"
    assert headers[b"content-length"] == str(len(body)).encode()
    for hop in (b"x-private", b"keep-alive", b"te"):
        assert hop not in headers, hop
    assert [n for n, _ in seen["headers"]].count(b"host") == 1


async def test_the_edge_refuses_before_forwarding(pair: Pair) -> None:
    echo = Echo()
    async with Served(echo, free_port()) as owner:
        pair.router_a.routes["far"] = Remote("s1", owner.url, "node-echo")
        too_big = b'{"messages": [{"body": "' + b"x" * LIMIT + b'"}]}'
        r = await pair.client.post(
            "/channels/far/enqueue", content=too_big, headers={"content-type": "application/json"}
        )
        assert r.status_code == 413
        async with httpx.AsyncClient(base_url=pair.a.url) as stranger:
            r = await stranger.post("/channels/far/dequeue", headers={"authorization": "Bearer x"})
            assert r.status_code == 401
            r = await stranger.post("/channels/far/enqueue", content=b"{}", headers=AUTH)
            assert r.status_code == 415  # not declared JSON: the Guard's refusal
    assert echo.seen == []


async def test_the_channel_list_gathers_every_owner(pair: Pair) -> None:
    async with httpx.AsyncClient(base_url=pair.b.url, headers=AUTH) as direct:
        await direct.put("/channels/far")
        await direct.put("/channels/b-two")
    await pair.client.put("/channels/here")
    lists = msgspec.json.Decoder(ChannelList)
    ask = functools.partial(
        forward.fan_out,
        pair.fwd_a,
        path="/channels",
        decoder=lists,
        node_id="node-a",
        secret=SECRET,
        authorization=AUTH["authorization"],
    )
    remote = await ask([pair.remote_b(), Remote("s9", pair.b.url, "node-b")])  # one ask
    assert [[c.name for c in one.channels] for one in remote] == [["b-two", "far"]]
    r = await pair.client.get("/channels")
    local = lists.decode(r.content).channels
    merged = forward.merge_by_name(local, *(one.channels for one in remote))
    assert [c.name for c in merged] == ["b-two", "far", "here"]

    dead = free_port()
    with pytest.raises(OwnerUnreachable) as caught:
        await ask([pair.remote_b(), Remote("s2", f"http://127.0.0.1:{dead}", "node-dead")])
    assert caught.value.status == 503
    assert "node-dead" in caught.value.detail
    assert "node-b" not in caught.value.detail
    with pytest.raises(OwnerUnreachable, match="answered 401"):
        await forward.fan_out(
            pair.fwd_a,
            [pair.remote_b()],
            "/channels",
            lists,
            node_id="node-a",
            secret=SECRET,
            authorization="Bearer wrong",
        )


async def test_only_a_peer_with_the_secret_gets_a_nodes_part_of_the_channel_list(
    pair: Pair,
) -> None:
    # The forwarded mark makes a node answer for itself alone: a client that sends it must not
    # take that part for the whole list, and a peer with another secret must not make the
    # node ask the others again (two nodes would bounce the list between them).
    await pair.client.put("/channels/here")
    spoofed = await pair.client.get("/channels", headers={forward.FORWARDED: "me"})
    assert spoofed.status_code == 401, spoofed.text
    assert CLUSTER_SECRET_HEADER in spoofed.json()["detail"]
    lists = msgspec.json.Decoder(ChannelList)
    at_a = Remote("s0", pair.a.url, "node-a")
    with pytest.raises(OwnerUnreachable, match="answered 401"):
        await forward.fan_out(
            pair.fwd_a,
            [at_a],
            "/channels",
            lists,
            node_id="x",
            secret="wrong",
            authorization=AUTH["authorization"],
        )
    (part,) = await forward.fan_out(
        pair.fwd_a,
        [at_a],
        "/channels",
        lists,
        node_id="x",
        secret=SECRET,
        authorization=AUTH["authorization"],
    )
    assert [c.name for c in part.channels] == ["here"]


async def test_nodes_without_a_cluster_secret_still_gather_the_channel_list(
    tmp_path: Path,
) -> None:
    # Two nodes of an implicit shard may run without CLUSTER_SECRET: the peer's fan-out still
    # gets an answer (a secretless node cannot tell a peer from a client).
    port = free_port()
    app = create_app(
        Settings(
            _env_file=None,  # type: ignore[call-arg]
            node_id="node-c",
            port=port,
            api_token=TOKEN,
            store_url=f"sqlite:///{tmp_path}/c.db",
        )
    )
    lists = msgspec.json.Decoder(ChannelList)
    async with (
        forward.forward_session() as session,
        Served(app, port) as c,
        httpx.AsyncClient(base_url=c.url, headers=AUTH) as direct,
    ):
        forward.install(app, FakeRouter("node-c"), session)
        await direct.put("/channels/solo")
        (part,) = await forward.fan_out(
            session,
            [Remote("s0", c.url, "node-c")],
            "/channels",
            lists,
            node_id="node-d",
            secret="",
            authorization=AUTH["authorization"],
        )
        assert [ch.name for ch in part.channels] == ["solo"]


def test_the_owners_to_ask_are_the_other_owners_and_none_may_be_missing() -> None:
    b = Remote("s1", "http://127.0.0.1:2", "node-b")
    assert forward.owners_to_ask([Local("s0"), b]) == [b]
    with pytest.raises(ShardUnavailable, match="s2") as caught:
        forward.owners_to_ask([Local("s0"), b, NoOwner("s2", 3, "failover under way")])
    assert caught.value.retry_after == 3


async def test_without_forwarding_installed_every_channel_is_served_here(pair: Pair) -> None:
    forward.uninstall(pair.app_a)
    r = await pair.client.post("/channels/far/enqueue", json={"messages": [{"body": 1}]})
    assert r.status_code == 201
    assert r.headers["x-lionmq-node"] == "node-a"
    assert "x-lionmq-forwarded-by" not in r.headers
    assert pair.channel_at(pair.app_b, "far") is None
    with pytest.raises(ConfigError, match="no Forwarder"):
        forward.install(FastAPI(), pair.router_a, pair.fwd_a)


async def test_forwarding_installs_in_a_lifespan_entered_before_any_request(
    tmp_path: Path,
) -> None:
    app = node_app(tmp_path, "node-a", free_port())
    nowhere = f"http://127.0.0.1:{free_port()}"
    router = FakeRouter("node-a", {"far": Remote("s1", nowhere, "node-b")})
    async with (
        app.router.lifespan_context(app),
        forward.forward_session(connect_s=0.5) as session,
        httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://127.0.0.1") as c,
    ):
        forward.install(app, router, session)
        r = await c.post("/channels/far/dequeue", headers=AUTH)
        assert r.status_code == 503
        assert "node-b" in r.json()["detail"]  # forwarded, and refused: nothing listens there


async def test_the_forwarding_session_waits_longer_than_the_longest_long_poll() -> None:
    from app.api.messages import MAX_WAIT_MS

    async with forward.forward_session() as session:
        timeout = session.timeout
        assert timeout.sock_read is not None and timeout.sock_read > MAX_WAIT_MS / 1000
        assert timeout.sock_connect is not None and timeout.sock_connect <= 5
        assert timeout.total is None  # a long poll is bounded by its read, not by a total
