"""Hostile requests from outside, on the wire: a real node process, raw sockets.

Each test is one promise of the node's HTTP surface that an attack run found broken: every
error is problem details, ambiguous requests are refused, and nothing bad is stored.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import NodeProcess

TOKEN = "attack-token"
AUTH = f"Authorization: Bearer {TOKEN}\r\n".encode()


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    n = NodeProcess(Path(tmp_path_factory.mktemp("attacks")), API_TOKEN=TOKEN)
    n.start()
    yield n
    n.kill9()


def exchange(node: NodeProcess, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send raw bytes on a new connection; (status, headers, body) of the answer."""
    with socket.create_connection(("127.0.0.1", node.port), timeout=5) as s:
        s.sendall(request)
        data = b""
        while b"\r\n\r\n" not in data or len(data.partition(b"\r\n\r\n")[2]) < _length(data):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in lines)}
    return int(status_line.split()[1]), headers, body


def _length(data: bytes) -> int:
    for line in data.partition(b"\r\n\r\n")[0].split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 1 << 30  # no length: read until the node closes


def assert_problem(answer: tuple[int, dict[str, str], bytes], status: int) -> dict[str, object]:
    got, headers, body = answer
    assert got == status, (got, body)
    assert headers.get("content-type") == "application/problem+json", headers
    problem: dict[str, object] = json.loads(body)
    assert problem["status"] == status and problem["detail"], problem
    return problem


ENQUEUE = b'{"messages":[{"body":1}]}'


@pytest.mark.parametrize(
    "request_bytes",
    [
        # Two lengths, or a length and chunking: the classic request-smuggling shapes.
        b"POST /channels/a/enqueue HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json"
        b"\r\nContent-Length: 25\r\nContent-Length: 3\r\n\r\n" + ENQUEUE,
        b"POST /channels/a/enqueue HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json"
        b"\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n19\r\n"
        + ENQUEUE
        + b"\r\n0\r\n\r\n",
        b"POST /channels/a/enqueue HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: +25\r\n\r\n",
        b"GET /channels/\xff HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
        b"GET /channels HTTP/1.1\r\nHost: 127.0.0.1\r\nBad Name: x\r\n\r\n",
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    ],
    ids=["two-lengths", "length-and-chunked", "signed-length", "raw-byte-path", "bad-header", "h2"],
)
def test_requests_the_parser_refuses_get_problem_details(
    node: NodeProcess, request_bytes: bytes
) -> None:
    assert_problem(
        exchange(node, request_bytes.replace(b"\r\n\r\n", b"\r\n" + AUTH + b"\r\n", 1)), 400
    )


@pytest.mark.parametrize("hosts", [(b"evil.example", b"127.0.0.1"), (b"127.0.0.1", b"127.0.0.1")])
def test_a_request_with_two_hosts_is_refused(node: NodeProcess, hosts: tuple[bytes, bytes]) -> None:
    """The guard read the last Host and Starlette the first (the 307 of a trailing slash sent
    clients to http://evil.example/...): a request with two must not be served at all."""
    request = b"POST /channels/a/ HTTP/1.1\r\nHost: %s\r\nHost: %s\r\n%sContent-Length: 0\r\n\r\n"
    assert_problem(exchange(node, request % (*hosts, AUTH)), 400)


def post(node: NodeProcess, path: str, body: bytes) -> tuple[int, dict[str, str], bytes]:
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n"
    )
    return exchange(node, head.encode() + AUTH + b"\r\n" + body)


@pytest.mark.parametrize(
    "number",
    [b"1e400", b"-1E+309", b"0.5e309", b"1" * 310 + b".0", b"1" * 211 + b"e99", b"7" * 5000],
)
def test_a_body_with_a_number_no_consumer_can_parse_is_refused(
    node: NodeProcess, number: bytes
) -> None:
    """Stored, such a body failed every later dequeue batch holding it in the bundled client
    (msgspec: 'Number out of range'), leaving the batch's good messages leased to no one."""
    channel = "/channels/numbers-" + str(len(number) + sum(number))
    body = b'{"messages":[{"body":{"ok":1}},{"body":[2, %s]}]}' % number
    problem = assert_problem(post(node, channel + "/enqueue", body), 422)
    assert "string" in str(problem["detail"])
    status, _, answer = post(node, channel + "/dequeue", b'{"max":10}')
    assert (status, json.loads(answer)) == (200, {"messages": []})


def test_numbers_any_consumer_can_parse_are_stored_as_sent(node: NodeProcess) -> None:
    numbers = [b"1e308", b"-0", b"1e-400", b"18446744073709551616", b"1" * 199, b'"9e999"']
    body = b'{"messages":[%s]}' % b",".join(b'{"body":%s}' % n for n in numbers)
    assert post(node, "/channels/fine-numbers/enqueue", body)[0] == 201
    status, _, answer = post(node, "/channels/fine-numbers/dequeue", b'{"max":10}')
    assert status == 200, answer
    bodies = [m["body"] for m in json.loads(answer)["messages"]]
    assert bodies == [json.loads(n) for n in numbers]


def test_a_pipelined_request_after_a_large_body_is_not_taken_for_huge_headers(
    node: NodeProcess,
) -> None:
    """The bytes of a read that began a request were all counted as its headers: a 70 KB
    enqueue followed in the same read by the start of the next request got 431 and a closed
    connection, though the enqueue was stored (a producer would retry it: a duplicate)."""
    body = json.dumps({"messages": [{"body": "x" * 70_000}]}).encode()
    first = (
        b"POST /channels/pipelined/enqueue HTTP/1.1\r\nHost: 127.0.0.1\r\n%s"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
    ) % (AUTH, len(body), body)
    second = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    with socket.create_connection(("127.0.0.1", node.port), timeout=5) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.sendall(first + second[:10])
        # The first answer comes before the rest of the second request is sent.
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = s.recv(65536)
            assert chunk, data
            data += chunk
        assert data.startswith(b"HTTP/1.1 201 "), data[:200]
        s.sendall(second[10:])
        while data.count(b"HTTP/1.1 ") < 2:
            chunk = s.recv(65536)
            assert chunk, data
            data += chunk
    assert b"HTTP/1.1 200 " in data.partition(b"\r\n\r\n")[2], data[-300:]


def upgrade(path: str, *extra: bytes) -> bytes:
    head = (
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
    ).encode()
    return head + b"".join(extra) + b"\r\n"


def test_a_websocket_handshake_is_refused_with_problem_details(node: NodeProcess) -> None:
    """The node serves no WebSocket; the router's refusal was an empty text/plain 403."""
    assert_problem(exchange(node, upgrade("/channels", AUTH)), 404)
    assert_problem(exchange(node, upgrade("/channels/a/enqueue", AUTH)), 404)
    page = b"Origin: http://evil.example\r\n"
    assert "evil.example" in str(assert_problem(exchange(node, upgrade("/x", AUTH, page)), 403))
    assert_problem(exchange(node, upgrade("/channels")), 401)


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("POST", "/metrics", "GET"),
        ("DELETE", "/channels", "GET"),
        ("PATCH", "/channels/a", "GET, PUT, DELETE"),
        ("GET", "/channels/a/purge", "POST"),
        ("GET", "/channels/a/ack", "POST"),
        ("POST", "/openapi.json", "GET, HEAD"),
    ],
)
def test_a_method_not_allowed_names_the_allowed_ones(
    node: NodeProcess, method: str, path: str, allowed: str
) -> None:
    """RFC 9110: a 405 carries Allow. The hot path's did; the router's was lost on its way to
    problem details (and would have named only the first route's methods: GET for PATCH
    /channels/a, which also takes PUT and DELETE)."""
    request = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
    answer = exchange(node, request.encode() + AUTH + b"\r\n")
    assert_problem(answer, 405)
    assert answer[1].get("allow") == allowed, answer[1]
