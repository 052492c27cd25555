"""Hostile and malformed input: a clear 4xx problem, never a 500, and nothing stored."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI

from app.api.codec import MAX_JSON_DEPTH
from app.main import create_app
from tests.conftest import NodeProcess, make_settings
from tests.test_api import assert_problem

JSON = {"content-type": "application/json"}


def nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


async def stored(client: httpx.AsyncClient, channel: str) -> int:
    r = await client.get(f"/channels/{channel}")
    if r.status_code == 404:
        return 0
    counts: dict[str, int] = r.json()["counts"]
    return counts["ready"] + counts["delayed"] + counts["in_flight"]


@pytest.mark.parametrize(
    "message",
    [
        b'{"body": "caf\xe9"}',  # Latin-1, not UTF-8: in a raw body msgspec never looks at
        b'{"body": {"k": "\xff\xfe"}}',
        b'{"body": "\xed\xa0\x80"}',  # a UTF-16 surrogate encoded as UTF-8 (CESU-8)
        b'{"body": 1, "dedup_id": "d\xff"}',
        b'{"body": 1, "headers": {"k\xc3": "v"}}',
        b'{"body": 1, "headers": {"k": "\x80"}}',
    ],
)
async def test_invalid_utf8_is_refused_and_nothing_stored(
    app_client: httpx.AsyncClient, message: bytes
) -> None:
    body = b'{"messages": [{"body": "fine"}, ' + message + b"]}"
    r = await app_client.post("/channels/u/enqueue", content=body, headers=JSON)
    assert_problem(r, 400, "UTF-8")
    assert await stored(app_client, "u") == 0


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/channels/u/ack", b'{"receipts": ["\xff-1"]}'),
        ("/channels/u/nack", b'{"receipts": ["1-1"], "dead_letter": "\xc0"}'),
        ("/channels/u/dequeue", b'{"max": 1, "x\xff": 1}'),
    ],
)
async def test_invalid_utf8_in_other_requests(
    app_client: httpx.AsyncClient, path: str, body: bytes
) -> None:
    assert_problem(await app_client.post(path, content=body, headers=JSON), 400, "UTF-8")


async def test_invalid_utf8_in_channel_settings(app_client: httpx.AsyncClient) -> None:
    r = await app_client.put("/channels/u", content=b'{"dead_letter": "dl\xff"}', headers=JSON)
    assert_problem(r, 400, "UTF-8")
    assert (await app_client.get("/channels/u")).status_code == 404


@pytest.mark.parametrize("escape", [rb"\ud800", rb"\udfff", rb"\ud800x", rb"\ud800\u0041"])
async def test_lone_surrogate_escapes_are_refused(
    app_client: httpx.AsyncClient, escape: bytes
) -> None:
    for message in (
        b'{"body": "' + escape + b'"}',
        b'{"body": {"' + escape + b'": 1}}',
        b'{"body": 1, "headers": {"k": "' + escape + b'"}}',
    ):
        body = b'{"messages": [' + message + b"]}"
        r = await app_client.post("/channels/s/enqueue", content=body, headers=JSON)
        assert_problem(r, 400, "JSON")
    assert await stored(app_client, "s") == 0


async def test_escaped_text_that_only_looks_like_a_surrogate_is_fine(
    app_client: httpx.AsyncClient,
) -> None:
    body = rb'{"messages": [{"body": ["\\ud800", "\ud83d\ude00"]}]}'
    r = await app_client.post("/channels/s/enqueue", content=body, headers=JSON)
    assert r.status_code == 201, r.text
    got = (await app_client.post("/channels/s/dequeue", json={})).json()["messages"]
    assert got[0]["body"] == ["\\ud800", "\U0001f600"]


HIDDEN = b'["]", ' * (MAX_JSON_DEPTH + 1) + b"1" + b"]" * (MAX_JSON_DEPTH + 1)
ESCAPED = b'[{"\\"]": ' * (MAX_JSON_DEPTH // 2 + 1) + b"1" + b"}]" * (MAX_JSON_DEPTH // 2 + 1)


@pytest.mark.parametrize(
    "value",
    [nested(MAX_JSON_DEPTH + 1), nested(1_000), nested(5_000), nested(200_000), HIDDEN, ESCAPED],
)
async def test_too_deep_bodies_are_refused(app_client: httpx.AsyncClient, value: bytes) -> None:
    body = b'{"messages": [{"body": 1}, {"body": ' + value + b"}]}"
    r = await app_client.post("/channels/d/enqueue", content=body, headers=JSON)
    assert_problem(r, 422, "MAX_JSON_DEPTH")
    assert await stored(app_client, "d") == 0


async def test_bodies_up_to_the_limit_are_stored(app_client: httpx.AsyncClient) -> None:
    # At the limit, with brackets in strings (which do not nest) and many shallow brackets.
    deep = b'{"a": "]]]][[[[", "b": ' + nested(MAX_JSON_DEPTH - 1) + b"}"
    escaped = b'{"a": "\\"]]]][[[[", "b": ' + nested(MAX_JSON_DEPTH - 1) + b"}"
    wide = b"[" + b",".join([b'{"k": [1, "]"]}'] * 500) + b"]"
    for value in (nested(MAX_JSON_DEPTH), deep, escaped, wide):
        body = b'{"messages": [{"body": ' + value + b"}]}"
        r = await app_client.post("/channels/d/enqueue", content=body, headers=JSON)
        assert r.status_code == 201, r.text
    assert await stored(app_client, "d") == 4


async def test_deep_json_elsewhere_is_a_4xx(app_client: httpx.AsyncClient) -> None:
    deep = nested(100_000)
    for path in ("/channels/d/ack", "/channels/d/dequeue", "/channels/d/enqueue"):
        r = await app_client.post(path, content=deep, headers=JSON)
        assert 400 <= r.status_code < 500, r.text
    r = await app_client.put("/channels/d", content=b'{"dead_letter": ' + deep + b"}", headers=JSON)
    assert 400 <= r.status_code < 500, r.text


@pytest.mark.parametrize("name", ["dlx\n", "dlx\r", "\ndlx", "dlx\n\n", "dl x", ""])
async def test_dead_letter_names_are_anchored(app_client: httpx.AsyncClient, name: str) -> None:
    r = await app_client.put("/channels/src", json={"dead_letter": name})
    assert_problem(r, 422, "dead_letter")
    # Nothing changed: the channel does not exist, or keeps its earlier dead-letter channel.
    assert (await app_client.get("/channels/src")).status_code == 404


async def test_a_valid_dead_letter_name_is_kept(app_client: httpx.AsyncClient) -> None:
    r = await app_client.put("/channels/src", json={"dead_letter": "dlx"})
    assert r.status_code == 200 and r.json()["settings"]["dead_letter"] == "dlx"


@pytest.mark.parametrize("name", ["x%0A", "%0Ax", "x%0D%0A", "%FF", "x%00"])
async def test_channel_names_in_the_path_are_anchored(
    app_client: httpx.AsyncClient, name: str
) -> None:
    r = await app_client.post(f"/channels/{name}/enqueue", json={"messages": [{"body": 1}]})
    assert_problem(r, 422, "channel name")
    assert_problem(await app_client.get(f"/channels/{name}"), 422, "channel name")
    assert (await app_client.get("/channels")).json()["channels"] == []


async def test_too_many_receipts_is_413_like_too_many_messages(tmp_path: Path) -> None:
    app: FastAPI = create_app(make_settings(tmp_path, max_batch=3))
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://localhost") as c,
    ):
        receipts = {"receipts": ["1-1"] * 4}
        for verb, extra in (("ack", {}), ("nack", {}), ("extend", {"visibility_ms": 5000})):
            r = await c.post(f"/channels/x/{verb}", json={**receipts, **extra})
            assert_problem(r, 413, "MAX_BATCH")
        many = {"messages": [{"body": 1}] * 4}
        assert_problem(await c.post("/channels/x/enqueue", json=many), 413, "MAX_BATCH")


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER", "bEaReR"])
async def test_the_bearer_scheme_is_case_insensitive(tmp_path: Path, scheme: str) -> None:
    app: FastAPI = create_app(make_settings(tmp_path, api_token="s3cret"))
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://localhost") as c,
    ):
        ok = await c.get("/channels", headers={"Authorization": f"{scheme} s3cret"})
        assert ok.status_code == 200, ok.text
        r = await c.post(
            "/channels/x/dequeue", json={}, headers={"Authorization": f"{scheme} s3cret"}
        )
        assert r.status_code == 200, r.text
        for wrong in (f"{scheme} S3CRET", f"{scheme}s3cret", "Basic s3cret", f"{scheme} s3cre"):
            assert_problem(await c.get("/channels", headers={"Authorization": wrong}), 401)


# -- receipts -------------------------------------------------------------------------------


async def _one_delivery(client: httpx.AsyncClient, channel: str) -> dict[str, object]:
    r = await client.post(f"/channels/{channel}/enqueue", json={"messages": [{"body": 1}]})
    assert r.status_code == 201, r.text
    (got,) = (await client.post(f"/channels/{channel}/dequeue", json={})).json()["messages"]
    assert isinstance(got, dict)
    return got


async def test_receipts_cannot_be_forged_from_the_message_id(
    app_client: httpx.AsyncClient,
) -> None:
    got = await _one_delivery(app_client, "pay")
    real = str(got["receipt"])
    assert len(real) <= 40
    # What a producer knows: the id (it got it from enqueue) and that this is attempt 1.
    forged = [f"{int(str(got['id'])):x}-1", f"{int(str(got['id'])):x}-{got['attempt']:x}"]
    tampered = real[:-1] + ("A" if real[-1] != "A" else "B")
    other_attempt = real.replace("-1.", "-2.", 1)
    for bad in [*forged, tampered, other_attempt, real + "x", real.partition(".")[0] + "."]:
        for verb, extra in (("ack", {}), ("nack", {}), ("extend", {"visibility_ms": 5000})):
            r = await app_client.post(f"/channels/pay/{verb}", json={"receipts": [bad], **extra})
            assert_problem(r, 400, "not a receipt")
        # One bad receipt refuses the whole batch: the genuine one is not settled either.
        r = await app_client.post("/channels/pay/ack", json={"receipts": [real, bad]})
        assert_problem(r, 400, "not a receipt")
    assert (await app_client.get("/channels/pay")).json()["counts"]["in_flight"] == 1
    r = await app_client.post("/channels/pay/ack", json={"receipts": [real]})
    assert r.json() == {"acked": 1, "stale": []}


async def test_a_receipt_is_bound_to_its_channel(app_client: httpx.AsyncClient) -> None:
    got = await _one_delivery(app_client, "a")
    await _one_delivery(app_client, "b")
    r = await app_client.post("/channels/b/ack", json={"receipts": [got["receipt"]]})
    assert_problem(r, 400, "'b'")
    assert (await app_client.get("/channels/b")).json()["counts"]["in_flight"] == 1


def test_receipts_stay_valid_across_a_restart(
    node_factory: type[NodeProcess], tmp_path: Path
) -> None:
    node = node_factory(tmp_path / "r").start()
    url = f"{node.url}/channels/r"
    assert httpx.post(f"{url}/enqueue", json={"messages": [{"body": 1}] * 2}).status_code == 201
    got = httpx.post(f"{url}/dequeue", json={"max": 2}).json()["messages"]
    node.stop()
    node = node_factory(tmp_path / "r", port=node.port).start()
    receipts = [m["receipt"] for m in got]
    r = httpx.post(f"{url}/extend", json={"receipts": receipts[:1], "visibility_ms": 5000})
    assert r.json() == {"extended": 1, "stale": []}
    r = httpx.post(f"{url}/ack", json={"receipts": receipts})
    assert r.json() == {"acked": 2, "stale": []}
    node.stop()
