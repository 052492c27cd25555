"""Hostile and malformed input: a clear 4xx problem, never a 500, and nothing stored."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI
from lionmq import Client

from app.api.codec import MAX_JSON_DEPTH
from app.errors import ConfigError
from app.main import create_app
from app.settings import load_settings
from tests.conftest import NodeProcess, make_settings
from tests.test_api import assert_problem
from watcher.app import create_app as create_watcher
from watcher.settings import WatcherSettings

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


# -- pages of other sites, and other hosts ----------------------------------------------------

EVIL = "http://evil.example"


async def _filled(client: httpx.AsyncClient, channel: str = "keep") -> None:
    r = await client.post(f"/channels/{channel}/enqueue", json={"messages": [{"body": 1}] * 3})
    assert r.status_code == 201, r.text


@pytest.mark.parametrize(
    "headers",
    [
        {"origin": EVIL, "sec-fetch-site": "cross-site", "content-type": "text/plain"},
        {"origin": EVIL, "content-type": "application/json"},  # an older browser
        {"origin": "null", "content-type": "application/json"},  # a sandboxed frame, a file
        {"origin": "http://localhost.evil.example:8000", "content-type": "application/json"},
        # A page on another local port (a dev server, say) is another site.
        {"origin": "http://127.0.0.1:3000", "content-type": "application/json"},
        {"origin": "http://localhost:3000", "sec-fetch-site": "same-site"},
        {"sec-fetch-site": "CROSS-SITE", "content-type": "application/json"},
        {"sec-fetch-site": "cross-site", "content-type": "application/json"},
        {"sec-fetch-site": "same-site", "content-type": "application/json"},
        {"host": "attacker.example", "content-type": "application/json"},
        {"host": "attacker.example:8000", "content-type": "application/json"},
        {"host": "127.0.0.1.nip.io", "content-type": "application/json"},
    ],
)
async def test_pages_and_unknown_hosts_are_refused(
    app_client: httpx.AsyncClient, headers: dict[str, str]
) -> None:
    await _filled(app_client)
    for method, path, body in (
        ("POST", "/channels/keep/purge", b""),
        ("POST", "/channels/keep/enqueue", b'{"messages": [{"body": 1}]}'),
        ("POST", "/channels/keep/dequeue", b"{}"),
        ("DELETE", "/channels/keep", b""),
        ("PUT", "/channels/keep", b'{"max_length": 1}'),
        ("GET", "/channels", b""),
        ("GET", "/metrics", b""),
    ):
        r = await app_client.request(method, path, content=body, headers=headers)
        assert_problem(r, 403)
    info = (await app_client.get("/channels/keep")).json()
    assert info["counts"]["ready"] == 3 and info["settings"]["max_length"] is None


async def test_a_body_must_be_declared_json(app_client: httpx.AsyncClient) -> None:
    await _filled(app_client)
    body = b'{"messages": [{"body": 1}]}'
    for content_type in (None, "text/plain", "application/x-www-form-urlencoded", "text/json"):
        headers = {} if content_type is None else {"content-type": content_type}
        r = await app_client.post("/channels/keep/enqueue", content=body, headers=headers)
        assert_problem(r, 415, "application/json")
        r = await app_client.put("/channels/keep", content=b'{"max_length": 1}', headers=headers)
        assert_problem(r, 415)
    for content_type in (
        "application/json",
        "Application/JSON; charset=utf-8",
        "application/x+json",
    ):
        r = await app_client.post(
            "/channels/keep/enqueue", content=body, headers={"content-type": content_type}
        )
        assert r.status_code == 201, r.text
    # No body, no content type needed.
    assert (await app_client.post("/channels/keep/dequeue")).status_code == 200
    assert (await app_client.post("/channels/keep/purge")).json() == {"purged": 6}


async def test_what_the_guard_lets_through(app_client: httpx.AsyncClient) -> None:
    ok = [
        {"sec-fetch-site": "same-origin", "origin": "http://localhost"},
        {
            "sec-fetch-site": "same-origin",
            "origin": "http://localhost:8000",
            "host": "localhost:8000",
        },
        {"origin": "http://localhost:80"},
        {"sec-fetch-site": "none"},  # typed into the address bar
        {"host": "LOCALHOST:9"},
        {"host": "[::1]:8000"},
        {"host": "127.0.0.1"},
    ]
    for headers in ok:
        r = await app_client.post("/channels/ok/enqueue", json={"messages": []}, headers=headers)
        assert r.status_code == 422, r.text  # through the guard, to the validation
    # A person following a link from another site to the docs is no attack.
    nav = {"sec-fetch-site": "cross-site", "sec-fetch-mode": "navigate"}
    assert (await app_client.get("/docs", headers=nav)).status_code == 200
    r = await app_client.post("/channels/ok/purge", headers=nav)
    assert_problem(r, 403, "Sec-Fetch-Site")
    # Probes answer whatever Host an orchestrator dialled.
    for path in ("/health", "/ready"):
        assert (await app_client.get(path, headers={"host": "10.1.2.3:8000"})).status_code == 200


async def test_allowed_hosts_adds_names(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, allowed_hosts="mq.example.com", server_host="http://n1:80")
    app: FastAPI = create_app(settings)
    async with app.router.lifespan_context(app):
        for host, status in (
            ("mq.example.com", 200),
            ("MQ.example.com:8000", 200),
            ("n1", 200),
            ("localhost", 200),
            ("other.example.com", 403),
        ):
            transport = httpx.ASGITransport(app)
            async with httpx.AsyncClient(transport=transport, base_url=f"http://{host}") as c:
                assert (await c.get("/channels")).status_code == status, host
    app = create_app(make_settings(tmp_path, allowed_hosts="*"))
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://any.example") as c,
    ):
        assert (await c.get("/channels")).status_code == 200
        assert_problem(await c.get("/channels", headers={"origin": EVIL}), 403)


def test_a_page_cannot_drive_a_node_without_a_token(
    node_factory: type[NodeProcess], tmp_path: Path
) -> None:
    """The attack as a browser makes it, against a real node on loopback, and the bundled client
    still working beside it."""
    node = node_factory(tmp_path / "g").start()
    with Client(node.url) as client:
        client.enqueue_many("keep", [1, 2, 3])
        page = {"origin": EVIL, "sec-fetch-site": "cross-site", "sec-fetch-mode": "no-cors"}
        text = {**page, "content-type": "text/plain;charset=UTF-8"}
        r = httpx.post(f"{node.url}/channels/keep/purge", headers=text, content=b"x")
        assert r.status_code == 403 and r.headers["content-type"] == "application/problem+json"
        r = httpx.post(f"{node.url}/channels/keep/purge", headers=page)
        assert r.status_code == 403
        enqueue = f"{node.url}/channels/keep/enqueue"
        r = httpx.post(enqueue, headers={"content-type": "text/plain"}, content=b'{"messages": []}')
        assert r.status_code == 415
        # DNS rebinding: the page's own name, resolved to 127.0.0.1, stays in the Host header.
        rebound = {"host": f"attacker.example:{node.port}"}
        assert httpx.get(f"{node.url}/channels", headers=rebound).status_code == 403
        assert httpx.post(f"{node.url}/channels/keep/purge", headers=rebound).status_code == 403
        assert httpx.get(f"{node.url}/channels/keep", headers={"host": "localhost"}).is_success
        (got,) = client.dequeue("keep", 1)
        assert client.ack("keep", [got.receipt]).acked == 1
        assert client.get_channel("keep").counts.ready == 2


@pytest.mark.parametrize("value", ["mq:8000", "http://mq", "::1", "[::1]:80", "*.example.com"])
def test_allowed_hosts_takes_names_only(value: str) -> None:
    with pytest.raises(ConfigError, match="ALLOWED_HOSTS"):
        load_settings(_env_file=None, allowed_hosts=value)


@pytest.mark.parametrize(
    ("value", "why"),
    [
        ('{"shards":[', "truncated"),
        ("[]", "JSON object"),
        ('{"shards": []}', "at least one shard"),
        ('{"shards": [{"primary": "ftp://x"}]}', "'ftp://x'"),
        ('{"shards": [{"primary": "http://a:1", "backups": ["http://a:1"]}]}', "twice"),
        ('{"shards": [{"primary": "http://a:1"}], "extra": 1}', "unknown field"),
        ('{"version": 0, "shards": []}', "version"),
    ],
)
def test_a_hostile_cluster_init_is_refused_in_one_clear_line(value: str, why: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(_env_file=None, cluster_init=value)
    message = str(caught.value)
    assert message.startswith("invalid setting CLUSTER_INIT: CLUSTER_INIT is not a topology")
    assert why in message and "\n" not in message and "Value error" not in message


@pytest.mark.parametrize("value", ["bad\r\nX-Evil: 1", "two words", "tab\there", "nœud"])
def test_a_node_id_that_cannot_go_in_a_header_is_refused(value: str) -> None:
    # NODE_ID names the node in every message answer (X-LionMQ-Node): with a CR/LF every
    # enqueue failed with "Invalid HTTP header value" and no answer.
    with pytest.raises(ConfigError, match="NODE_ID"):
        load_settings(_env_file=None, node_id=value)
    assert load_settings(_env_file=None, node_id="mq-a:8000").node_id == "mq-a:8000"


async def test_the_watcher_drops_a_frame_that_is_not_utf8() -> None:
    """The sibling in the watcher: a snapshot whose strings are not UTF-8 is malformed, counted,
    and the connection lives on (UnicodeDecodeError escaped the decoder and ended it)."""
    token = "w" * 16
    app = create_watcher(WatcherSettings(_env_file=None, token=token))  # type: ignore[call-arg]
    bad = b'{"type": "snapshot", "node_id": "\xff"}'
    incoming: list[dict[str, object]] = [
        {"type": "websocket.connect"},
        {"type": "websocket.receive", "bytes": bad},
        {"type": "websocket.receive", "bytes": bad},
        {"type": "websocket.disconnect", "code": 1000},
    ]
    sent: list[dict[str, object]] = []

    async def receive() -> dict[str, object]:
        return incoming.pop(0)

    async def send(message: dict[str, object]) -> None:
        sent.append(message)

    scope = {
        "type": "websocket",
        "path": "/ingest",
        "raw_path": b"/ingest",
        "query_string": b"",
        "headers": [(b"authorization", f"Bearer {token}".encode())],
        "scheme": "ws",
        "server": ("127.0.0.1", 8080),
        "client": ("127.0.0.1", 5000),
        "subprotocols": [],
        "app": app,
    }
    async with app.router.lifespan_context(app):
        await app(scope, receive, send)  # type: ignore[arg-type]
        assert app.state.hub.state.counters.malformed == 2
    assert sent == [{"type": "websocket.accept", "subprotocol": None, "headers": []}]


async def test_two_content_types_are_refused(app_client: httpx.AsyncClient) -> None:
    """The guard would judge one and the app read another: refused, as two Hosts are."""
    headers = [("content-type", "text/plain"), ("content-type", "application/json")]
    r = await app_client.post("/channels/x/enqueue", content=b'{"messages": []}', headers=headers)
    assert_problem(r, 400, "Content-Type")
