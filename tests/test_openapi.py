"""The OpenAPI schema tells the truth: walked path by path, each documented status is provoked
with a real request and answers with the documented content type, and whatever a route answers
to bad input is documented."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from app.main import create_app
from tests.conftest import make_settings
from tests.test_store_failure import FlakyStore

TOKEN = "s3cret"
MAX_REQUEST = 2048  # small, so a 413 costs little


@dataclass
class Node:
    http: httpx.AsyncClient
    store: FlakyStore
    token: bool

    async def call(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        *,
        authorized: bool = True,
        **headers: str,
    ) -> httpx.Response:
        if self.token and authorized:
            headers.setdefault("authorization", f"Bearer {TOKEN}")
        if body is not None:
            headers.setdefault("content-type", "application/json")
        return await self.http.request(method, path, content=body, headers=headers)

    async def enqueue(self, channel: str, count: int = 1) -> None:
        body = b'{"messages": [' + b",".join([b'{"body": 1}'] * count) + b"]}"
        assert (await self.call("POST", f"/channels/{channel}/enqueue", body)).status_code == 201

    async def lease(self, channel: str) -> bytes:
        """The receipt of a fresh lease of `channel`."""
        await self.enqueue(channel)
        got = await self.call("POST", f"/channels/{channel}/dequeue", b'{"max": 1}')
        receipt: str = got.json()["messages"][0]["receipt"]
        return receipt.encode()

    async def down(self, request: Awaitable[httpx.Response]) -> httpx.Response:
        self.store.down = True
        try:
            return await request
        finally:
            self.store.down = False


async def running_node(tmp_path: Path, token: bool) -> AsyncIterator[Node]:
    store = FlakyStore(str(tmp_path / f"openapi-{token}.db"))
    settings = make_settings(
        tmp_path, api_token=TOKEN if token else "", max_request_bytes=MAX_REQUEST
    )
    app: FastAPI = create_app(settings, store=store)  # type: ignore[arg-type]
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://localhost") as http,
    ):
        yield Node(http, store, token)


@pytest.fixture(params=[False, True], ids=["open", "token"])
async def node(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[Node]:
    async for n in running_node(tmp_path, request.param):
        yield n


Provoke = Callable[[Node, str], Awaitable[httpx.Response]]
"""Given the node and a concrete path, make the request that must answer the status."""

BIG = b'{"messages": [{"body": "' + b"x" * MAX_REQUEST + b'"}]}'
STALE = b"1a1fcd7a2b400000-1"  # stands for a receipt (unsigned: refused with 400)
RECEIPT = b'{"receipts": ["%s"]}' % STALE


def hot(op_body: bytes) -> dict[str, Provoke]:
    """The provocations of a message operation, given a body it accepts (where a receipt is
    needed, RECEIPT stands for it: a stale one, or a held one to reach the store)."""

    async def ok(n: Node, path: str) -> httpx.Response:
        # Receipts are signed: only one the node issued is answered 200.
        body = await held(n) if STALE in op_body else op_body
        await n.enqueue("c")
        return await n.call("POST", path, body)

    async def held(n: Node) -> bytes:
        return op_body.replace(STALE, await n.lease("c"))

    async def store_down(n: Node, path: str) -> httpx.Response:
        verb = path.rsplit("/", 1)[1]
        body = op_body if verb in ("enqueue", "dequeue") else await held(n)
        await n.enqueue("c")  # something to lease, for dequeue
        return await n.down(n.call("POST", path, body))

    return {
        "ok": ok,
        "400": lambda n, path: n.call("POST", path, b"{,"),
        "413": lambda n, path: n.call("POST", path, BIG),
        "422": lambda n, path: n.call("POST", path.replace("/c/", "/no%20spaces/"), op_body),
        "503": store_down,
    }


async def full_channel(n: Node, path: str) -> httpx.Response:
    await n.call("PUT", "/channels/small", b'{"max_length": 1}')
    await n.enqueue("small")
    return await n.call("POST", "/channels/small/enqueue", b'{"messages": [{"body": 2}]}')


async def existing(n: Node, method: str, path: str, body: bytes | None = None) -> httpx.Response:
    await n.enqueue("c")
    return await n.call(method, path, body)


def channel_route(
    method: str, body: bytes | None = None, problems: tuple[str, ...] = ("404", "422", "503")
) -> dict[str, Provoke]:
    async def store_down(n: Node, path: str) -> httpx.Response:
        await n.enqueue("c")
        return await n.down(n.call(method, path, body))

    def renamed(name: str) -> Provoke:
        return lambda n, path: n.call(method, path.replace("/channels/c", name, 1), body)

    provoke: dict[str, Provoke] = {
        "ok": lambda n, path: existing(n, method, path, body),
        "404": renamed("/channels/missing"),
        "422": renamed("/channels/-bad"),
        "503": store_down,
    }
    return {k: v for k, v in provoke.items() if k == "ok" or k in problems}


async def first_message(n: Node, down: bool = False) -> httpx.Response:
    """GET the first message of channel c (enqueued first), with the store down if asked."""
    await n.enqueue("c")
    page = await n.call("GET", "/channels/c/messages?limit=1")
    get = n.call("GET", f"/channels/c/messages/{page.json()['messages'][0]['id']}")
    return await (n.down(get) if down else get)


async def not_ready(n: Node, path: str) -> httpx.Response:
    return await n.down(n.call("GET", path))


# Every documented (method, path) and how to provoke each of its statuses; "ok" is the success.
PROVOKE: dict[tuple[str, str], dict[str, Provoke]] = {
    ("post", "/channels/{channel}/enqueue"): {
        **hot(b'{"messages": [{"body": 1}]}'),
        "429": full_channel,
    },
    ("post", "/channels/{channel}/dequeue"): hot(b'{"max": 1}'),
    ("post", "/channels/{channel}/ack"): hot(RECEIPT),
    ("post", "/channels/{channel}/nack"): hot(RECEIPT),
    ("post", "/channels/{channel}/extend"): hot(
        b'{"receipts": ["%s"], "visibility_ms": 5000}' % STALE
    ),
    ("get", "/channels"): {"ok": lambda n, path: n.call("GET", path)},
    ("get", "/channels/{channel}"): channel_route("GET", problems=("404", "422")),
    ("put", "/channels/{channel}"): {  # PUT creates the channel: no 404
        **channel_route("PUT", b'{"max_attempts": 3}', problems=("422", "503")),
        "400": lambda n, path: n.call("PUT", path, b"{oops"),
        "413": lambda n, path: n.call("PUT", path, b" " * 5000 + b"{}"),
    },
    ("post", "/channels/{channel}/purge"): channel_route("POST"),
    ("delete", "/channels/{channel}"): channel_route("DELETE"),
    ("get", "/channels/{channel}/messages"): {
        **channel_route("GET"),
        "422": lambda n, path: n.call("GET", path + "?limit=0"),
    },
    ("get", "/channels/{channel}/messages/{msg_id}"): {
        "ok": lambda n, path: first_message(n),
        "404": lambda n, path: n.call("GET", "/channels/c/messages/1"),
        "422": lambda n, path: n.call("GET", "/channels/c/messages/x"),
        "503": lambda n, path: first_message(n, down=True),
    },
    ("post", "/channels/{channel}/redrive"): {
        **channel_route("POST", b'{"to": "d"}'),
        "400": lambda n, path: n.call("POST", path, b"{oops"),
        "413": lambda n, path: n.call("POST", path, b" " * 5000 + b"{}"),
    },
    ("get", "/health"): {"ok": lambda n, path: n.call("GET", path)},
    ("get", "/ready"): {"ok": lambda n, path: n.call("GET", path), "503": not_ready},
    ("get", "/metrics"): {"ok": lambda n, path: n.call("GET", path)},
    ("get", "/cluster"): {"ok": lambda n, path: n.call("GET", path), "503": not_ready},
    ("get", "/cluster/route/{channel}"): {
        "ok": lambda n, path: n.call("GET", path),
        "422": lambda n, path: n.call("GET", "/cluster/route/-bad"),
    },
}


def media(response: httpx.Response) -> str:
    return response.headers.get("content-type", "").split(";")[0].strip()


def documented_media(spec: dict[str, Any]) -> str | None:
    content = spec.get("content", {})
    assert len(content) <= 1, content
    return next(iter(content), None)


def also_documented(operation: dict[str, Any]) -> set[int]:
    """Statuses the `default` response names in its description."""
    default = operation["responses"].get("default", {})
    return {int(s) for s in re.findall(r"\b([45]\d\d)\b", default.get("description", ""))}


async def test_every_documented_status_is_what_the_route_answers(node: Node) -> None:
    schema = (await node.call("GET", "/openapi.json", authorized=False)).json()
    seen: set[tuple[str, str]] = set()
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            seen.add((method, path))
            provocations = PROVOKE[(method, path)]
            concrete = path.replace("{channel}", "c")
            statuses = {k for k in operation["responses"] if k != "default"}
            successes = {s for s in statuses if s.startswith("2")}
            assert len(successes) == 1, (method, path, statuses)
            expected = {"ok", *(statuses - successes)} - {"401"}
            assert set(provocations) == expected, (method, path)
            for status, spec in operation["responses"].items():
                if status == "default":
                    continue
                if status == "401":
                    got = await node.call(method.upper(), concrete, b"{}", authorized=False)
                else:
                    key = "ok" if status in successes else status
                    got = await provocations[key](node, concrete)
                assert got.status_code == int(status), (method, path, status, got.text)
                assert media(got) == (documented_media(spec) or ""), (method, path, status)
                if got.status_code >= 400:
                    assert got.json()["status"] == got.status_code
    assert seen == set(PROVOKE)


async def test_auth_is_documented_only_where_it_is_required(node: Node) -> None:
    schema = (await node.call("GET", "/openapi.json", authorized=False)).json()
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            without = await node.call(
                method.upper(), path.replace("{channel}", "c"), b"{}", authorized=False
            )
            needs_token = without.status_code == 401
            assert ("401" in operation["responses"]) == needs_token, (method, path)
            security = operation.get("security", schema.get("security", []))
            assert (security == [{"bearer": []}]) == needs_token, (method, path, security)
    assert ("bearer" in schema.get("components", {}).get("securitySchemes", {})) == node.token
    for page in ("/docs", "/openapi.json"):
        assert (await node.call("GET", page, authorized=False)).status_code == 200


# Bad input of every kind, sent to every route: whatever comes back is documented.
BAD_INPUT: list[tuple[str, bytes | None, dict[str, str]]] = [
    ("/channels/{channel}", b"{not json", {}),
    ("/channels/{channel}", b"[]", {}),
    ("/channels/{channel}", b'{"max": "many", "receipts": 7, "messages": {}}', {}),
    ("/channels/{channel}", b'{"unknown_field": 1}', {}),
    ("/channels/{channel}", b"\xff\xfe", {}),
    ("/channels/{channel}", b"x" * (MAX_REQUEST + 1), {}),
    ("/channels/{channel}", b"{}", {"content-type": "text/plain"}),
    (
        "/channels/{channel}",
        b"{}",
        {"origin": "http://evil.example", "sec-fetch-site": "cross-site"},
    ),
    ("/channels/{channel}", b"{}", {"host": "attacker.example"}),
    ("/channels/{channel}", b"{}", {"authorization": "Bearer wrong"}),
    ("/channels/no such channel", b"{}", {}),
    ("/channels/" + "x" * 200, b"{}", {}),
    ("/channels/missing", b"{}", {}),
]


async def test_whatever_a_route_answers_to_bad_input_is_documented(node: Node) -> None:
    schema = (await node.call("GET", "/openapi.json", authorized=False)).json()
    await node.enqueue("c")
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            documented = {int(s) for s in operation["responses"] if s != "default"}
            for template, body, headers in BAD_INPUT:
                if "{channel}" not in path:
                    concrete = path
                elif template == "/channels/{channel}":
                    concrete = path.replace("{channel}", "c")
                else:
                    concrete = path.replace("/channels/{channel}", template)
                got = await node.call(method.upper(), concrete, body, **headers)
                if got.status_code < 400:
                    continue
                where = (method, path, template, body and body[:20], headers, got.status_code)
                assert got.status_code in documented | also_documented(operation), where
                assert media(got) == "application/problem+json", where
