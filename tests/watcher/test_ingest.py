"""Bad input on `/ingest` against a real watcher process: refused or dropped, and counted, without
harming another node's data. Browsers' messages on `/feed` go nowhere."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Iterator
from typing import Any

import httpx
import msgspec
import pytest
from watcher_harness import TOKEN, Proc, Processes, open_feed
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from watcher.schema import SCHEMA_VERSION

MAX_FRAME = 4096


@pytest.fixture(scope="module")
def watcher(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proc]:
    processes = Processes(tmp_path_factory.mktemp("ingest"))
    try:
        yield processes.watcher(
            max_frame_bytes=str(MAX_FRAME), max_frames_per_s="20", flood_close_after="40"
        )
    finally:
        processes.close()


def frame(node_id: str, ready: int = 1, **kw: Any) -> str:
    snap = {
        "type": "snapshot",
        "node_id": node_id,
        "interval_ms": 1000,
        "url": f"http://{node_id}:8000",
        "channels": [{"name": "orders", "ready": ready, "delayed": 0, "in_flight": 0}],
        **kw,
    }
    return json.dumps(snap)


async def ingest(w: Proc, token: str | None = TOKEN) -> ClientConnection:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    return await connect(
        w.base_url.replace("http://", "ws://") + "/ingest",
        additional_headers=headers,
        proxy=None,
        max_size=None,
    )


def counters(w: Proc) -> dict[str, int]:
    return httpx.get(w.base_url + "/health").json()["ingest"]  # type: ignore[no-any-return]


async def acounters(w: Proc) -> dict[str, int]:
    async with httpx.AsyncClient() as client:
        return (await client.get(w.base_url + "/health")).json()["ingest"]  # type: ignore[no-any-return]


async def wait_counter(w: Proc, name: str, at_least: int) -> None:
    for _ in range(200):  # 5 s at most
        if (await acounters(w))[name] >= at_least:
            return
        await asyncio.sleep(0.025)
    raise AssertionError(f"{name} never reached {at_least}")


@pytest.mark.parametrize("token", [None, "wrong-token-0123456789", TOKEN + "x", ""])
async def test_without_the_token_the_handshake_is_refused(watcher: Proc, token: str | None) -> None:
    before = (await acounters(watcher))["refused"]
    with pytest.raises(InvalidStatus) as info:
        await ingest(watcher, token)
    assert info.value.response.status_code == 403
    assert (await acounters(watcher))["refused"] == before + 1


async def test_bad_frames_are_dropped_without_harming_another_node(watcher: Proc) -> None:
    good = await ingest(watcher)
    await good.send(frame("steady", ready=42))
    feed = await open_feed(watcher.base_url)
    await feed.until(lambda f: "steady" in f.nodes, 5, "the good node")
    before = await acounters(watcher)

    bad = await ingest(watcher)
    await bad.send("{not json")
    await bad.send(b"\xff\xfe\x00")
    await bad.send(json.dumps({"type": "snapshot", "node_id": "x"}))  # no interval_ms
    await bad.send(frame("evil", ready=-5))  # a negative count
    await bad.send(frame("evil", interval_ms=5))  # an interval out of range
    await bad.send(frame("<b>" * 200))  # an overlong node id
    await bad.send(json.dumps([1, 2, 3]))
    # Nested past the recursion limit: the decoder's RecursionError ended the connection.
    await bad.send('{"type":"snapshot","x":' + "[" * 1500 + "]" * 1500 + "}")
    await bad.send(frame("steady", ready=0, url="x" * MAX_FRAME))  # oversized
    await wait_counter(watcher, "oversized", before["oversized"] + 1)
    after = await acounters(watcher)
    assert after["malformed"] - before["malformed"] == 3
    assert after["invalid"] - before["invalid"] == 5
    assert after["accepted"] == before["accepted"]

    # A connection reports for one node only: it cannot write over another node's data.
    await bad.send(frame("intruder"))
    await bad.send(frame("steady", ready=0))
    await wait_counter(watcher, "wrong_node", before["wrong_node"] + 1)

    # A frame far beyond the limit is cut off by the server: that connection ends.
    huge = await ingest(watcher)
    await huge.send("x" * (8 * MAX_FRAME))
    with pytest.raises(ConnectionClosed):
        await asyncio.wait_for(huge.recv(), 5)

    await good.send(frame("steady", ready=43))
    await feed.until(
        lambda f: f.nodes["steady"]["channels"][0]["ready"] == 43, 5, "the good node's update"
    )
    assert set(feed.nodes) == {"steady", "intruder"}
    steady = feed.nodes["steady"]
    assert steady["status"] == "up" and steady["url"] == "http://steady:8000"
    assert all(m.get("node", {}).get("id") != "evil" for m in feed.messages)
    for ws in (good, bad, feed.ws):
        await ws.close()


async def test_a_node_with_many_channels_is_kept_and_what_it_lists_is_still_bounded(
    watcher: Proc,
) -> None:
    many = await ingest(watcher)
    totals = {"ready": 5000, "delayed": 0, "in_flight": 0}
    await many.send(frame("crowded", v=2, channels_total=100_000, totals=totals))
    feed = await open_feed(watcher.base_url)
    await feed.until(lambda f: "crowded" in f.nodes, 5, "the node with many channels")
    shown = feed.nodes["crowded"]
    assert shown["totals"]["channels"] == 100_000 and shown["totals"]["ready"] == 5000

    before = await acounters(watcher)
    await many.send(frame("crowded", v=2, channels_total=0))  # counts fewer than it lists
    # A version it does not know.
    await many.send(frame("crowded", v=SCHEMA_VERSION + 1, channels_total=1))
    await wait_counter(watcher, "invalid", before["invalid"] + 2)
    assert (await acounters(watcher))["accepted"] == before["accepted"]
    for ws in (many, feed.ws):
        await ws.close()


async def test_a_flooding_connection_is_rate_limited_then_closed(watcher: Proc) -> None:
    good = await ingest(watcher)
    await good.send(frame("calm", ready=7))
    feed = await open_feed(watcher.base_url)
    await feed.until(lambda f: "calm" in f.nodes, 5, "the calm node")
    before = await acounters(watcher)

    flood = await ingest(watcher)
    with pytest.raises(ConnectionClosed) as info:
        for i in range(2000):
            await flood.send(frame("flood", ready=i))
        await asyncio.wait_for(flood.recv(), 5)
    assert info.value.rcvd is not None and info.value.rcvd.code == 1008
    after = await acounters(watcher)
    assert after["closed_for_flood"] == before["closed_for_flood"] + 1
    assert after["rate_limited"] - before["rate_limited"] >= 40
    # The burst allowance got through; the rest did not.
    assert after["accepted"] - before["accepted"] <= 41

    await good.send(frame("calm", ready=8))
    await feed.until(lambda f: f.nodes["calm"]["channels"][0]["ready"] == 8, 5, "calm's update")
    assert feed.nodes["calm"]["status"] == "up"
    await good.close()
    await feed.ws.close()


async def test_browsers_only_listen(watcher: Proc) -> None:
    node = await ingest(watcher)
    await node.send(frame("listened", ready=1))
    one = await open_feed(watcher.base_url)
    two = await open_feed(watcher.base_url)
    await one.until(lambda f: "listened" in f.nodes, 5, "the node")
    before = await acounters(watcher)
    await one.ws.send(frame("forged", ready=999))
    await one.ws.send("<script>alert(1)</script>")
    await node.send(frame("listened", ready=2))
    await two.until(
        lambda f: f.nodes.get("listened", {}).get("channels", [{}])[0].get("ready") == 2,
        5,
        "the node's update",
    )
    await one.until(lambda f: f.nodes["listened"]["channels"][0]["ready"] == 2, 5, "update")
    texts = [msgspec.json.encode(m) for m in two.messages]
    assert not any(b"forged" in t or b"<script>" in t for t in texts)
    assert (await acounters(watcher))["accepted"] == before["accepted"] + 1
    for ws in (node, one.ws, two.ws):
        await ws.close()


async def test_a_page_from_another_origin_cannot_open_the_feed(watcher: Proc) -> None:
    url = watcher.base_url.replace("http://", "ws://") + "/feed"
    with pytest.raises(InvalidStatus):
        await connect(url, origin="http://evil.example", proxy=None)  # type: ignore[arg-type]
    ok = await connect(url, origin=watcher.base_url, proxy=None)  # type: ignore[arg-type]
    await ok.close()


def test_a_rebound_page_cannot_open_the_feed(watcher: Proc) -> None:
    """DNS rebinding: a page at evil.example, re-resolved to this machine, asks with its own
    name as Host and Origin. Matching each other, they passed, and any site read the feed."""
    port = watcher.base_url.rpartition(":")[2]

    def handshake(name: str) -> bytes:
        request = (
            f"GET /feed HTTP/1.1\r\nHost: {name}:{port}\r\nOrigin: http://{name}:{port}\r\n"
            "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
        )
        with socket.create_connection(("127.0.0.1", int(port)), timeout=5) as s:
            s.sendall(request.encode())
            return s.recv(256)

    assert handshake("evil.example").startswith(b"HTTP/1.1 403 ")
    assert handshake("localhost").startswith(b"HTTP/1.1 101 ")


def test_health_and_page(watcher: Proc) -> None:
    health = httpx.get(watcher.base_url + "/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    page = httpx.get(watcher.base_url + "/")
    assert page.status_code == 200 and "LionMQ" in page.text
    assert "default-src 'none'" in page.headers["content-security-policy"]
    assert "http" not in page.text.split("<body>")[0].replace("http-equiv", "")  # no CDN
    for asset in ("/app.js", "/style.css"):
        assert httpx.get(watcher.base_url + asset).status_code == 200
    assert "innerHTML" not in httpx.get(watcher.base_url + "/app.js").text
