"""The router: any node answers any channel, forwarding one hop to the owner of its shard.

An ASGI layer in front of the hot path and the channel routes (`/channels/{channel}` and
everything under it). For each such request it asks the runtime where the channel is served:

- `Local`: passed on, untouched (the cost is a path split, a name check and the runtime's answer);
- `Remote`: forwarded once to the owner with the shared `aiohttp.ClientSession`, the method, path,
  query and body as they came, the client's headers too (Authorization included: the owner checks
  the token again), but hop-by-hop ones, marked with `X-LionMQ-Forwarded: <this node>`; the
  owner's status, headers and body come back as they are (its problem+json errors included),
  with `X-LionMQ-Forwarded-By: <this node>` so that a client refreshes its topology;
- `NoOwner`: 503 with Retry-After.

A request that carries the mark is never forwarded again: two nodes that disagree for a moment
about the owner (a hand-off, a failover) answer 503 + Retry-After: 1 rather than bounce it.

Where it sits: inside Guard and BearerAuth (`Guard(BearerAuth(Forwarder(HotPath(...))))`). The
edge refuses pages, rebinding and a wrong token before it spends a connection to the owner on
them, and refuses a body past MAX_REQUEST_BYTES before sending it on; the owner checks the token
and the JSON again, as it would a direct request (node-to-node trust is not needed for this).

The layer is given its parts by `install(app, router, session)` in the lifespan, once the runtime
and the session are open; without them (a standalone node) every request passes on.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Sequence
from typing import Protocol, TypeVar

import aiohttp
import msgspec
from multidict import CIMultiDict
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Receive, Scope, Send
from yarl import URL

from app.api.consumer import CLIENT_HEADER, forwarded_client
from app.api.hotpath import _read_body
from app.api.messages import MAX_WAIT_MS, DequeueResponse, _disconnected
from app.api.problems import problem_for
from app.cluster.route import Local, NoOwner, Remote, Route
from app.errors import ConfigError, LionMQError, OwnerUnreachable, ShardUnavailable
from app.models import valid_channel_name
from app.settings import CLUSTER_SECRET_HEADER

FORWARDED = "x-lionmq-forwarded"
FORWARDED_BY = "x-lionmq-forwarded-by"
_FORWARDED = FORWARDED.encode()
_FORWARDED_BY = FORWARDED_BY.encode()
_PREFIX = "/channels/"
_AFTER_PREFIX = len(_PREFIX)

# Hop-by-hop headers (RFC 9110 7.6.1) belong to one connection, never passed on. Host is the
# owner's; the length is recomputed; `Expect` was answered here. `Origin` and `Sec-Fetch-*` were
# judged by this node's Guard against its own origin: the owner would judge them against its own
# and refuse a page of this node's /docs.
_HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"trailers",
        b"transfer-encoding",
        b"upgrade",
    }
)
# X-LionMQ-Client is this node's to set (app/api/consumer.py): a client's own is dropped.
_CLIENT = CLIENT_HEADER.encode()
_NOT_FORWARDED = _HOP_BY_HOP | {
    b"host",
    b"content-length",
    b"expect",
    b"origin",
    _FORWARDED,
    _CLIENT,
}
# This node's server adds its own Date and Server; the owner's would be doubled.
_NOT_RETURNED_HEAD = _HOP_BY_HOP | {b"date", b"server"}
_NOT_RETURNED = _NOT_RETURNED_HEAD | {b"content-length"}
_NO_BODY = frozenset({204, 304})  # answers that carry no body, nor its length (RFC 9110 8.6)

# A long poll holds its forwarded request open for up to MAX_WAIT_MS before the owner answers;
# the owner then still commits the leases. Reading waits past that, with room for a slow commit.
READ_TIMEOUT_S = MAX_WAIT_MS / 1000 + 10
# Every other answer (and a peer's part of GET /channels) comes at once: an owner that holds
# one longer is stuck (frozen, overloaded), and the client gets 503 after this, not after a
# long poll's wait.
ANSWER_TIMEOUT_S = 10.0
_LONG_POLL = "/dequeue"


class Router(Protocol):
    """What the layer asks of the runtime (app/cluster/route.py has the answers)."""

    @property
    def node_id(self) -> str: ...

    def route(self, channel: str) -> Route: ...


class Forwarding:
    """The layer's parts, opened in the lifespan: the runtime's router and the shared session."""

    __slots__ = ("closing", "mark", "node_id", "router", "secret", "session")

    def __init__(self, router: Router, session: aiohttp.ClientSession, secret: str = "") -> None:
        self.router = router
        self.session = session
        self.node_id = router.node_id
        self.mark = router.node_id.encode()
        self.secret = secret  # CLUSTER_SECRET: tags the client address of a forwarded dequeue
        # Set when the node stops (`end_long_polls`): forwarded long polls end at once.
        self.closing = asyncio.Event()


def install(
    app: Starlette, router: Router, session: aiohttp.ClientSession, secret: str = ""
) -> None:
    """Turn forwarding on in `app`'s Forwarder layer (call it in the lifespan, once the runtime
    and the session are open). The layer holds its parts itself: a request pays no lookup."""
    _forwarder(app).forwarding = Forwarding(router, session, secret)


def uninstall(app: Starlette) -> None:
    """Turn forwarding off again (in the lifespan, before the session closes)."""
    _forwarder(app).forwarding = None


def end_long_polls(app: Starlette) -> None:
    """The node is stopping: the long polls it forwards end now, answered as an empty dequeue
    (their wait over), the owner's poll cancelled (it gives back what it leased). The server
    drains the requests under way before it exits, and a forwarded poll would hold that for
    up to MAX_WAIT_MS. Local polls end by `QueueEngine.end_waits`."""
    fwd = _forwarder(app).forwarding
    if fwd is not None:
        fwd.closing.set()


def forwarding_of(app: Starlette) -> Forwarding | None:
    """The parts forwarding runs with in `app`, or None where it is off."""
    return _forwarder(app).forwarding


def _forwarder(app: Starlette) -> Forwarder:
    """The Forwarder in the app's middleware stack."""
    if app.middleware_stack is None:  # a lifespan entered by hand (tests) before any request
        app.middleware_stack = app.build_middleware_stack()  # what Starlette does on one
    layer: object = app.middleware_stack
    for _ in range(16):  # the stack is a handful of layers deep
        if isinstance(layer, Forwarder):
            return layer
        layer = getattr(layer, "app", None)
    raise ConfigError("the app's middleware stack has no Forwarder layer (see app/main.py)")


def forward_session(
    *,
    connect_s: float = 2.0,
    read_s: float = READ_TIMEOUT_S,
    pool_s: float = 5.0,
    max_connections: int = 1024,
) -> aiohttp.ClientSession:
    """The one session a node forwards with (open it in the lifespan, inside the event loop;
    close it there).

    aiohttp rather than httpx: measured with two node processes (1,000 sequential enqueues), the
    forwarding node spent 380-480 µs of CPU per forwarded request with aiohttp against
    1,720-1,860 µs with httpx's AsyncClient, and the hop added about 470 µs to the median latency
    against 2,000-2,300 µs.
    Every long poll in flight holds a connection, so the pool is wide; kept-alive connections
    spare a handshake per request. A connect that takes seconds means the owner is gone (503
    at once beats a client's own timeout); a pool that stays full past `pool_s` answers 503 too.
    Nothing is added to or decoded from what passes: no default headers, no decompression. The
    environment's proxies are not for node-to-node calls (trust_env is off)."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=max_connections, keepalive_timeout=30),
        timeout=aiohttp.ClientTimeout(
            total=None, connect=pool_s + connect_s, sock_connect=connect_s, sock_read=read_s
        ),
        auto_decompress=False,
        skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
        trust_env=False,
    )


class Forwarder:
    def __init__(self, app: ASGIApp, max_request_bytes: int) -> None:
        self.app = app
        self.max_request_bytes = max_request_bytes
        self.forwarding: Forwarding | None = None  # None: standalone, every request passes on

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        fwd = self.forwarding
        if fwd is None or scope["type"] != "http":  # a standalone node pays this test only
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        channel = path[_AFTER_PREFIX:].partition("/")[0] if path.startswith(_PREFIX) else ""
        # A name that is no channel's is refused by the route here, as on a standalone node.
        if not channel or not valid_channel_name(channel):
            await self.app(scope, receive, send)
            return
        route = fwd.router.route(channel)
        if isinstance(route, Local):
            await self.app(scope, receive, send)
        elif isinstance(route, Remote):
            await self._forward(fwd, route, scope, receive, send)
        else:
            await _refuse(_no_owner(route), scope, receive, send)

    async def _forward(
        self, fwd: Forwarding, route: Remote, scope: Scope, receive: Receive, send: Send
    ) -> None:
        headers: list[tuple[bytes, bytes]] = []
        drop = _NOT_FORWARDED
        for name, value in scope["headers"]:
            if name == _FORWARDED:
                detail = (
                    f"the shard of this channel is moving: {value.decode('latin-1')[:128]} sent"
                    f" it here, and this node ({fwd.node_id}) sees {route.node_id} as its owner;"
                    " a request is forwarded once only, retry"
                )
                await _refuse(ShardUnavailable(detail), scope, receive, send)
                return
            if name == b"connection":  # and the headers it names (RFC 9110 7.6.1)
                drop = drop | {n.strip().lower() for n in value.split(b",")}
            headers.append((name, value))
        headers = [(n, v) for n, v in headers if n not in drop and not n.startswith(b"sec-fetch-")]
        headers.append((_FORWARDED, fwd.mark))
        long_poll = scope["path"].endswith(_LONG_POLL)
        if long_poll and fwd.secret:
            # The owner records who dequeued when the channel traces: the client, not this node.
            headers.append((_CLIENT, forwarded_client(scope, fwd.secret)))
        try:
            body = await _read_body(scope, receive, self.max_request_bytes)
        except LionMQError as exc:  # too large: refused here, never sent on
            await problem_for(exc)(scope, receive, send)
            return
        except ClientDisconnect:
            return  # gone before its body was whole: nothing to send on, no one to answer
        raw_path: bytes = scope.get("raw_path") or scope["path"].encode()
        target = route.url.rstrip("/") + raw_path.decode("latin-1")
        if scope["query_string"]:
            target += "?" + scope["query_string"].decode("latin-1")
        read_s = READ_TIMEOUT_S if long_poll else ANSWER_TIMEOUT_S
        timeout = patience(fwd.session, read_s)
        request = (scope["method"], URL(target, encoded=True), headers, body, timeout)
        closing = fwd.closing if long_poll else None
        answer = await _exchange_unless_gone(fwd.session, request, receive, closing)
        if answer is None:
            return  # the client hung up: the upstream request was cancelled, nobody to answer
        if isinstance(answer, ClosedPoll):
            await send({"type": "http.response.start", "status": 200, "headers": _JSON})
            await send({"type": "http.response.body", "body": _NOTHING})
            return
        if isinstance(answer, BaseException):
            detail = (
                f"the owner of this channel's shard {route.shard}, {route.node_id} at"
                f" {route.url}, did not answer ({_describe(answer)}); retry"
            )
            await _refuse(OwnerUnreachable(detail), scope, receive, send)
            return
        status, upstream, payload = answer
        if scope["method"] == "HEAD":  # the owner's length is that of the GET's body
            out = [(n, v) for n, v in upstream if n.lower() not in _NOT_RETURNED_HEAD]
        else:
            out = [(n, v) for n, v in upstream if n.lower() not in _NOT_RETURNED]
            if status not in _NO_BODY:
                out.append((b"content-length", str(len(payload)).encode()))
        out.append((_FORWARDED_BY, fwd.mark))
        await send({"type": "http.response.start", "status": status, "headers": out})
        await send({"type": "http.response.body", "body": payload})


class ClosedPoll:
    """The mark of a forwarded long poll the node's stop ended."""


Upstream = tuple[str, URL, list[tuple[bytes, bytes]], bytes, aiohttp.ClientTimeout]
Exchanged = tuple[int, Sequence[tuple[bytes, bytes]], bytes]
# What "the owner did not answer" is: refused, reset, closed half-way, or timed out.
_UNREACHABLE = (aiohttp.ClientError, TimeoutError)


async def _exchange(session: aiohttp.ClientSession, request: Upstream) -> Exchanged:
    """The owner's whole answer, as sent (raw: not decoded). Read whole before any of it goes
    back, so a failure half-way still answers one clean 503; the owner built the body whole."""
    method, url, headers, body, timeout = request
    sent = CIMultiDict((n.decode("latin-1"), v.decode("latin-1")) for n, v in headers)
    async with session.request(method, url, headers=sent, data=body, timeout=timeout) as response:
        return response.status, response.raw_headers, await response.read()


# A forwarded long poll ended by the node's stop: answered as a dequeue whose wait ran out.
_CLOSED = ClosedPoll()
_NOTHING = msgspec.json.encode(DequeueResponse(messages=[]))
_JSON = [(b"content-type", b"application/json"), (b"content-length", str(len(_NOTHING)).encode())]


async def _exchange_unless_gone(
    session: aiohttp.ClientSession,
    request: Upstream,
    receive: Receive,
    closing: asyncio.Event | None = None,
) -> Exchanged | BaseException | ClosedPoll | None:
    """The owner's answer, why it gave none (one of _UNREACHABLE), or None when the client hung
    up first: then the request to the owner is cancelled, which closes its connection, so the
    owner sees the hang-up too (a long-poll dequeue there stops and gives back what it leased).
    `_CLOSED` when `closing` was set first (the node stops): the owner's request is cancelled
    the same way."""
    exchange = asyncio.ensure_future(_exchange(session, request))
    gone = asyncio.ensure_future(_disconnected(receive))
    ended = asyncio.ensure_future(closing.wait()) if closing is not None else None
    waits = (exchange, gone) if ended is None else (exchange, gone, ended)
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if ended is not None:
            ended.cancel()
        exchange.cancel()  # a no-op once it is done; else this request was cancelled itself
    if not exchange.done() or exchange.cancelled():
        await asyncio.wait((exchange,))  # the connection is closed before this returns
        return None if ended is None or not ended.done() or ended.cancelled() else _CLOSED
    error = exchange.exception()
    if isinstance(error, _UNREACHABLE):
        return error
    return exchange.result()  # raises anything else: a bug, logged by the server


def patience(session: aiohttp.ClientSession, read_s: float) -> aiohttp.ClientTimeout:
    """The session's timeouts with reading cut to `read_s` (never lengthened)."""
    t = session.timeout
    sock_read = read_s if t.sock_read is None else min(read_s, t.sock_read)
    return aiohttp.ClientTimeout(
        total=t.total, connect=t.connect, sock_connect=t.sock_connect, sock_read=sock_read
    )


def _describe(error: BaseException) -> str:
    if isinstance(error, TimeoutError):
        return f"timed out: {type(error).__name__}"
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__


def _no_owner(route: NoOwner) -> ShardUnavailable:
    detail = f"no node serves this channel's shard {route.shard} right now ({route.reason}); retry"
    return ShardUnavailable(detail, route.retry_after_s)


async def _refuse(exc: LionMQError, scope: Scope, receive: Receive, send: Send) -> None:
    await problem_for(exc)(scope, receive, send)


# -- GET /channels across the cluster --------------------------------------------------------

T = TypeVar("T")


class Named(Protocol):
    @property
    def name(self) -> str: ...


N = TypeVar("N", bound=Named)


def owners_to_ask(routes: Iterable[Route]) -> list[Remote]:
    """The other owners a fan-out asks, from the runtime's route of every shard. A shard with
    no owner makes the answer 503 at once: without it, the answer would lack its part."""
    remote: list[Remote] = []
    for route in routes:
        if isinstance(route, NoOwner):
            raise _no_owner(route)
        if isinstance(route, Remote):
            remote.append(route)
    return remote


async def fan_out(
    session: aiohttp.ClientSession,
    owners: Iterable[Remote],
    path: str,
    decoder: msgspec.json.Decoder[T],
    *,
    node_id: str,
    secret: str,
    authorization: str | None,
    read_s: float = ANSWER_TIMEOUT_S,
) -> list[T]:
    """Every other owner's answer to `GET path`, decoded: for `GET /channels` on a node of a
    cluster (path "/channels", a decoder of ChannelList).

    Each owner is asked once (whatever number of shards it holds) with the forwarded mark and
    the cluster secret, so it answers for itself only; the client's Authorization goes along,
    the owner checks it. An owner that does not answer 200 within `read_s` makes the whole call
    fail with 503 naming it: a list that silently lacks a shard's channels would read as those
    channels being gone."""
    peers = {owner.url: owner for owner in owners}
    headers = {FORWARDED: node_id, CLUSTER_SECRET_HEADER: secret}
    if authorization is not None:
        headers["authorization"] = authorization

    timeout = patience(session, read_s)

    async def ask(url: str) -> tuple[int, bytes]:
        target = f"{url.rstrip('/')}{path}"
        async with session.get(target, headers=headers, timeout=timeout) as response:
            return response.status, await response.read()

    answers = await asyncio.gather(*(ask(url) for url in peers), return_exceptions=True)
    decoded: list[T] = []
    failed: list[str] = []
    for peer, answer in zip(peers.values(), answers, strict=True):
        if isinstance(answer, _UNREACHABLE):
            failed.append(f"{peer.node_id} at {peer.url} ({_describe(answer)})")
        elif isinstance(answer, BaseException):
            raise answer
        elif answer[0] != 200:
            failed.append(f"{peer.node_id} at {peer.url} (answered {answer[0]})")
        else:
            decoded.append(decoder.decode(answer[1]))
    if failed:
        raise OwnerUnreachable(
            f"cannot answer for the whole cluster: no answer to GET {path} from "
            + "; ".join(failed)
            + "; retry"
        )
    return decoded


def merge_by_name(*lists: Iterable[N]) -> list[N]:
    """One list sorted by name; an item listed twice (a channel whose hand-off is in flight)
    keeps its first entry: pass this node's own list first."""
    merged: dict[str, N] = {}
    for items in lists:
        for item in items:
            merged.setdefault(item.name, item)
    return [merged[name] for name in sorted(merged)]


__all__ = [
    "ANSWER_TIMEOUT_S",
    "FORWARDED",
    "FORWARDED_BY",
    "READ_TIMEOUT_S",
    "Forwarder",
    "Forwarding",
    "Router",
    "end_long_polls",
    "fan_out",
    "forward_session",
    "install",
    "merge_by_name",
    "owners_to_ask",
    "uninstall",
]
