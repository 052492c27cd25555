"""Request building and response parsing for the node's HTTP API, free of any I/O.

Both clients turn each operation into a `Call`, send it their own way (blocking or awaited) and
hand the `Reply` back to `Call.result`; nothing here knows how bytes travel.
"""

from __future__ import annotations

import itertools
import math
import os
import secrets
from collections.abc import Callable, Generator, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, Literal, NamedTuple, TypeVar
from urllib.parse import quote, urlencode

import msgspec

from lionmq.errors import ConnectionFailed, Unauthorized, UnexpectedResponse, error_for
from lionmq.models import (
    AckResult,
    ChannelInfo,
    ChannelList,
    ClusterInfo,
    Delivery,
    DequeueBody,
    DequeueReply,
    EnqueueBody,
    EnqueueReply,
    ExtendResult,
    HandoffBody,
    HandoffResult,
    MessageDetail,
    MessagePage,
    NackResult,
    NewMessage,
    PurgeReply,
    ReceiptsBody,
    RedriveBody,
    RedriveResult,
)
from lionmq.options import ChannelOptions
from lionmq.placement import Ring
from lionmq.topology import SetNodes, Topology

if TYPE_CHECKING:
    from lionmq.retry import Attempts

T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)

MAX_WAIT_MS = 30_000
"""The node's long-poll bound: a dequeue never waits longer than this."""

CLUSTER_PATH = "/cluster"

MessageState = Literal["ready", "delayed", "in_flight"]


@dataclass(frozen=True, slots=True)
class Wait:
    """Try again after `seconds`."""

    seconds: float


class Reply(NamedTuple):
    """A response as any sender hands it over: read whole (the node's replies are small)."""

    status: int
    headers: Mapping[str, str]
    """Case-insensitive (httpx.Headers or aiohttp's CIMultiDictProxy)."""
    content: bytes
    reason: str = ""


OK = frozenset({200})
CREATED = frozenset({200, 201})


@dataclass(slots=True)
class Call(Generic[T_co]):
    """One HTTP exchange: what to send and how to read a reply whose status is `ok`.
    Not frozen only because a frozen dataclass is slower to build; treat it as immutable."""

    method: str
    path: str
    parse: Callable[[Reply], T_co]
    content: bytes | None = None
    long_poll_s: float = 0.0
    """Extra read time for a long poll, added to the client's timeout."""
    ok: frozenset[int] = OK
    channel: str | None = None
    """The channel the call is about: it goes to the owner of the channel's shard. None: to
    the client's current seed."""
    headers: Mapping[str, str] | None = None
    """Headers to add to (or override of) the client's own, for this call only."""
    node: str | None = None
    """The base URL of the one node the call is for (a shard's owner), overriding `channel`."""
    retry: bool = True
    """False for a call that must not be sent twice (a hand-off would hand the shard on again):
    its first failure is raised."""

    def result(self, reply: Reply) -> T_co:
        """The parsed value of a reply whose status is in `ok`."""
        try:
            return self.parse(reply)
        except msgspec.MsgspecError as exc:
            raise UnexpectedResponse(
                "Unexpected response", f"{self.path}: {exc}", status=None
            ) from exc


def _none(_: Reply) -> None:
    return None


def _decoding(decoder: msgspec.json.Decoder[T]) -> Callable[[Reply], T]:
    decode = decoder.decode
    return lambda reply: decode(reply.content)


class Wire:
    """Encoders and typed decoders, built once per client (msgspec compiles them on creation)."""

    def __init__(self) -> None:
        self._encode = msgspec.json.Encoder().encode
        # Parsers are built here, once, rather than as a closure per call.
        ids = _decoding(msgspec.json.Decoder(EnqueueReply))
        self._ids: Callable[[Reply], list[str]] = lambda r: ids(r).ids
        deliveries = _decoding(msgspec.json.Decoder(DequeueReply))
        self._deliveries: Callable[[Reply], list[Delivery]] = lambda r: deliveries(r).messages
        self._ack = _decoding(msgspec.json.Decoder(AckResult))
        self._nack = _decoding(msgspec.json.Decoder(NackResult))
        self._extend = _decoding(msgspec.json.Decoder(ExtendResult))
        self._info = _decoding(msgspec.json.Decoder(ChannelInfo))
        channels = _decoding(msgspec.json.Decoder(ChannelList))
        self._list: Callable[[Reply], list[ChannelInfo]] = lambda r: channels(r).channels
        purged = _decoding(msgspec.json.Decoder(PurgeReply))
        self._purged: Callable[[Reply], int] = lambda r: purged(r).purged
        health = _decoding(msgspec.json.Decoder(dict[str, Any]))
        self._health: Callable[[Reply], dict[str, Any]] = health
        self._cluster = _cluster_info(_decoding(msgspec.json.Decoder(ClusterInfo)))
        self._topology = _decoding(msgspec.json.Decoder(Topology))
        self._page = _decoding(msgspec.json.Decoder(MessagePage))
        self._detail = _decoding(msgspec.json.Decoder(MessageDetail))
        self._redriven = _decoding(msgspec.json.Decoder(RedriveResult))
        self._handed = _decoding(msgspec.json.Decoder(HandoffResult))

    # -- messages --------------------------------------------------------------------------

    def enqueue(self, channel: str, messages: list[NewMessage]) -> Call[list[str]]:
        """Encodes the batch once, dedup ids included, so every retry sends the same bytes."""
        content = self._encode(EnqueueBody(messages))
        path = f"{_channel(channel)}/enqueue"
        return Call("POST", path, self._ids, content, ok=CREATED, channel=channel)

    def dequeue(
        self, channel: str, max: int, wait_ms: int, visibility_ms: int | None
    ) -> Call[list[Delivery]]:
        content = self._encode(DequeueBody(max, wait_ms, visibility_ms))
        return Call(
            "POST",
            f"{_channel(channel)}/dequeue",
            self._deliveries,
            content,
            long_poll_s=min(wait_ms, MAX_WAIT_MS) / 1000,
            channel=channel,
        )

    def ack(self, channel: str, receipts: Sequence[str]) -> Call[AckResult]:
        return self._receipts(channel, "ack", ReceiptsBody(_receipts(receipts)), self._ack)

    def nack(
        self, channel: str, receipts: Sequence[str], delay_ms: int, dead_letter: bool
    ) -> Call[NackResult]:
        body = ReceiptsBody(_receipts(receipts), delay_ms=delay_ms, dead_letter=dead_letter)
        return self._receipts(channel, "nack", body, self._nack)

    def extend(
        self, channel: str, receipts: Sequence[str], visibility_ms: int
    ) -> Call[ExtendResult]:
        body = ReceiptsBody(_receipts(receipts), visibility_ms=visibility_ms)
        return self._receipts(channel, "extend", body, self._extend)

    def _receipts(
        self, channel: str, verb: str, body: ReceiptsBody, parse: Callable[[Reply], T]
    ) -> Call[T]:
        path = f"{_channel(channel)}/{verb}"
        return Call("POST", path, parse, self._encode(body), channel=channel)

    # -- channels and node -----------------------------------------------------------------

    def put_channel(self, channel: str, settings: ChannelOptions) -> Call[ChannelInfo]:
        content = self._encode(settings)
        return Call("PUT", _channel(channel), self._info, content, channel=channel)

    def get_channel(self, channel: str) -> Call[ChannelInfo]:
        return Call("GET", _channel(channel), self._info, channel=channel)

    def list_channels(self) -> Call[list[ChannelInfo]]:
        return Call("GET", "/channels", self._list)

    def purge(self, channel: str) -> Call[int]:
        return Call("POST", f"{_channel(channel)}/purge", self._purged, channel=channel)

    def delete(self, channel: str) -> Call[None]:
        return Call("DELETE", _channel(channel), _none, ok=_DELETED, channel=channel)

    def messages(
        self, channel: str, state: MessageState | None, after: str | None, limit: int
    ) -> Call[MessagePage]:
        query = {"limit": limit, **{k: v for k, v in (("state", state), ("after", after)) if v}}
        path = f"{_channel(channel)}/messages?{urlencode(query)}"
        return Call("GET", path, self._page, channel=channel)

    def message(self, channel: str, id: str) -> Call[MessageDetail]:
        path = f"{_channel(channel)}/messages/{quote(id, safe='')}"
        return Call("GET", path, self._detail, channel=channel)

    def redrive(
        self, channel: str, to: str | None, max: int, rate: float | None
    ) -> Call[RedriveResult]:
        """Safe to send again: each call moves what is left, each batch atomically."""
        content = self._encode(RedriveBody(to, max, rate))
        path = f"{_channel(channel)}/redrive"
        # A paced call lasts about max / rate seconds: read that long, plus the usual timeout.
        slow = max / rate if rate else 0.0
        return Call("POST", path, self._redriven, content, long_poll_s=slow, channel=channel)

    def health(self) -> Call[dict[str, Any]]:
        return Call("GET", "/health", self._health)

    def ready(self) -> Call[bool]:
        # 503 is an answer here ("not ready"), not a failure to retry.
        return Call("GET", "/ready", _is_ready, ok=_READY)

    # -- the cluster -----------------------------------------------------------------------

    def cluster(self) -> Call[ClusterInfo]:
        return Call("GET", CLUSTER_PATH, self._cluster, ok=_CLUSTER_ANSWERS)

    def set_nodes(self, request: SetNodes, admin_token: str | None) -> Call[Topology]:
        """`request` validated already (`lionmq.topology`): a bad one never leaves the client."""
        content = self._encode(request)
        headers = _admin(admin_token, "set_nodes")
        return Call("PUT", "/cluster/nodes", self._topology, content, headers=headers)

    def handoff(
        self, shard: str, to: str | None, owner: str | None, admin_token: str | None
    ) -> Call[HandoffResult]:
        """Sent to `owner` (the shard's acting owner; None: the current seed) and never twice:
        a repeated hand-off would move the shard on again."""
        headers = _admin(admin_token, "handoff")
        path = f"{CLUSTER_PATH}/shards/{quote(shard, safe='')}/handoff"
        content = self._encode(HandoffBody(to))
        return Call("POST", path, self._handed, content, headers=headers, node=owner, retry=False)


def _admin(admin_token: str | None, what: str) -> dict[str, str]:
    """The headers of a cluster change: it takes the admin token, not the API token; without
    one nothing is sent (the API token would only be refused)."""
    if not admin_token:
        raise Unauthorized(
            "No admin token",
            f"{what} needs the cluster's ADMIN_TOKEN: Client(..., admin_token=...)",
            status=None,
        )
    return {"authorization": f"Bearer {admin_token}"}


_DELETED = frozenset({200, 204})
_READY = frozenset({200, 503})


_CLUSTER_ANSWERS = frozenset({200, 404})


def _cluster_info(decode: Callable[[Reply], ClusterInfo]) -> Callable[[Reply], ClusterInfo]:
    def parse(reply: Reply) -> ClusterInfo:
        # Not ChannelNotFound, which a plain 404 would raise: the node predates clusters.
        if reply.status == 404:
            detail = "the node answered 404 to GET /cluster: it predates clusters"
            raise UnexpectedResponse("No cluster API", detail, status=404)
        return decode(reply)

    return parse


def _is_ready(reply: Reply) -> bool:
    return reply.status == 200


def _receipts(receipts: Sequence[str]) -> list[str]:
    # A lone string is a Sequence[str] too: take it as one receipt, not as characters.
    return [receipts] if isinstance(receipts, str) else list(receipts)


def _channel(channel: str) -> str:
    # Names are [A-Za-z0-9._-], but quoting keeps a bad name from reaching another route.
    return "/channels/" + quote(channel, safe="")


class _CallIds:
    """Dedup id prefixes, one per enqueue call: 64 random bits drawn once per process, plus
    a counter. Unique per call within the process, as unlikely to collide across processes as
    one random draw per call, and without a `getrandom` syscall on every enqueue (it showed
    at ~4% of the client's CPU). A forked child draws its own bits."""

    def __init__(self) -> None:
        self.reseed()

    def reseed(self) -> None:
        self._base = secrets.token_hex(8)
        self._count = itertools.count()

    def prefix(self) -> str:
        # next() on itertools.count is atomic under the GIL: safe across client threads.
        return f"{self._base}.{next(self._count):x}-"


_call_ids = _CallIds()
os.register_at_fork(after_in_child=_call_ids.reseed)


def new_messages(
    bodies: Iterable[Any],
    *,
    headers: dict[str, str] | None = None,
    delay_ms: int | None = None,
    ttl_ms: int | None = None,
) -> list[NewMessage]:
    """Wraps plain bodies with the shared options (`NewMessage` items keep their own) and gives
    every message lacking a dedup id one, so that a retried enqueue stores nothing twice: the
    call's prefix plus the message's index. The caller's `NewMessage` objects are copied, never
    changed: reusing one later must not make the node drop it as a duplicate."""
    prefix = _call_ids.prefix()
    out: list[NewMessage] = []
    for index, body in enumerate(bodies):
        if not isinstance(body, NewMessage):
            out.append(NewMessage(body, headers, delay_ms, ttl_ms, f"{prefix}{index}"))
        elif body.dedup_id is None:
            out.append(msgspec.structs.replace(body, dedup_id=f"{prefix}{index}"))
        else:
            out.append(body)
    return out


# -- routing ---------------------------------------------------------------------------------

NODE_HEADER = "x-lionmq-node"
"""On every message response of a node that knows the cluster API (standalone ones too)."""
FORWARDED_BY_HEADER = "x-lionmq-forwarded-by"
"""On a response the node that got the request forwarded to the channel's owner."""

MIN_REFRESH_S = 0.5
"""Topology fetches are at least this far apart (the first excepted), so a hint that keeps
coming (every reply forwarded, a 503 to many requests at once) costs a fetch per interval,
not one per request."""
DOWN_S = 5.0
"""A node that could not be reached is passed over for this long, unless no other is left."""
MAX_ROUTES = 4096
"""Channels whose target is remembered; past that the memo starts over (many channels)."""


class Send(NamedTuple):
    """Send `call` to the node at `url` (a base URL: scheme, host, port and any prefix)."""

    url: str
    call: Call[Any]


Step = Send | Wait
"""What an exchange asks its driver to do next."""
Got = Reply | ConnectionFailed | None
"""What the driver hands back: the reply to a `Send`, or why none came; None after a `Wait`."""


class Router:
    """Where each call goes, and when the client's view of the cluster must be fetched again.

    Both clients drive `exchange` (a generator of `Step`s), so the rules live here once:

    * A call about a channel goes to the node serving the channel's shard
      (`lionmq.placement.shard_for` over the shard ids): the acting owner, else the configured
      primary, else a backup (which forwards, or answers 503 until it has taken over).
      Other calls (health, listing channels, the cluster itself) go to the current seed.
    * With one shard (a standalone node, or one primary and its standbys) every call goes to the
      current seed, as it did before clusters: the URL a node advertises may not be the one this
      client reaches it by.
    * The topology is fetched (`GET /cluster`) before the first channel call when several seeds
      are given; with one seed, only once the node shows it speaks the cluster API (an
      `X-LionMQ-Node` header), so a node from before clusters gets exactly the requests it
      always got. A node that answers 404 to `GET /cluster` has no cluster: nothing is
      fetched again.
    * It is fetched again, at most every `MIN_REFRESH_S`, after a forwarded response
      (`X-LionMQ-Forwarded-By`: the view is out of date), and in a cluster after a 503 (a
      shard changing hands) or a node that could not be reached; that node is passed over for
      `DOWN_S` (the next seed becomes the current one).

    The call itself is never rebuilt when it is sent again elsewhere: an enqueue keeps the
    bytes, dedup ids included, it was built with. Mutations are single assignments under the
    GIL; two threads refreshing at once cost one fetch more, never a wrong route.
    """

    def __init__(self, seeds: Sequence[str], wire: Wire, clock: Callable[[], float]) -> None:
        self._seeds = tuple(dict.fromkeys(seed.rstrip("/") for seed in seeds))
        if not self._seeds:
            raise ValueError("give at least one node URL")
        self._wire = wire
        self._clock = clock
        self.home = self._seeds[0]
        """Where calls without a channel go; the next seed once it cannot be reached."""
        self._nodes: tuple[str, ...] = ()  # the node URLs the last topology named
        self._ring: Ring | None = None  # None: one shard, everything goes to `home`
        self._shard_nodes: dict[str, tuple[str, ...]] = {}
        self._routes: dict[str, str] = {}  # channel -> url, memo of `_pick`
        self._down: dict[str, float] = {}  # url -> when it could not be reached
        # `_down` is replaced, never changed in place: another thread may be iterating it.
        self.cluster = len(self._seeds) > 1
        """Several nodes known: failover signs (503, unreachable) earn the failover allowance
        and a topology refresh."""
        self._learned = False
        self._stale = self.cluster
        self._refreshing = False
        self._refreshed_at = -math.inf

    # -- the one loop ----------------------------------------------------------------------

    def first(self, call: Call[Any]) -> str | None:
        """Where to send `call` straight away, or None when the view must be fetched first.

        The drivers' fast path: a call whose first try succeeds costs this, `observe` and
        the parse, and no `exchange` at all."""
        if call.node is not None:
            return call.node
        if self._stale and call.channel is not None:
            return None
        return self.target(call.channel)

    def exchange(
        self, call: Call[T], attempts: Attempts, url: str | None = None, got: Got = None
    ) -> Generator[Step, Got, T]:
        """Sends `call` until it has a result (the generator's return value) or fails for
        good (the error is raised), refreshing the view of the cluster as its answers ask.
        `url` and `got`: a first try the driver already made (see `first`)."""
        while True:
            if url is None:
                if call.node is not None:
                    url = call.node
                else:
                    if self._stale and call.channel is not None:
                        yield from self._refresh()
                    url = self.target(call.channel)
                got = yield Send(url, call)
            if isinstance(got, Reply):
                self.observe(url, got)
                if not call.retry and got.status not in call.ok:
                    raise error_for(got.status, got.content, got.reason)
                outcome = attempts.outcome(call, got, self.cluster)
            else:
                assert got is not None, "a Send is answered with a Reply or ConnectionFailed"
                self._unreachable(url)
                if not call.retry:
                    raise got
                outcome = attempts.failed(got, self.cluster)
            if not isinstance(outcome, Wait):
                return outcome
            url = None
            yield outcome

    def target(self, channel: str | None) -> str:
        """The base URL `channel`'s calls go to now (the current seed for None)."""
        if channel is None or self._ring is None:
            return self.home
        return self._routes.get(channel) or self._pick(channel)

    def learn(self, info: ClusterInfo | None) -> None:
        """Takes in a topology (None: the node has no cluster API)."""
        self._learned = True
        self._stale = False
        self._nodes = info.urls if info is not None else ()
        self.cluster = len(self._seeds) > 1 or len(self._nodes) > 1
        shards = info.shards if info is not None else ()
        if len(shards) > 1:
            ids = [shard.id for shard in shards]
            if self._ring is None or self._ring.shard_ids != frozenset(ids):
                self._ring = Ring(ids)
            self._shard_nodes = {shard.id: shard.nodes for shard in shards}
        else:
            self._ring, self._shard_nodes = None, {}
        now = self._clock()
        self._down = {url: at for url, at in self._down.items() if now - at < DOWN_S}
        self._routes = {}

    def invalidate(self) -> None:
        """The topology changed (this client changed it): fetch it before the next call."""
        self._stale = True
        self._refreshed_at = -math.inf

    # -- the rules -------------------------------------------------------------------------

    def _pick(self, channel: str) -> str:
        assert self._ring is not None
        nodes = self._shard_nodes.get(self._ring.shard_for(channel), ())
        down = self._down
        url = next((u for u in nodes if u not in down), None)
        if url is None:  # the shard has nobody reachable: any node may forward, or answer 503
            url = next(
                (u for u in self._candidates() if u not in down), nodes[0] if nodes else self.home
            )
        if len(self._routes) >= MAX_ROUTES:
            self._routes = {}
        self._routes[channel] = url
        return url

    def observe(self, url: str, reply: Reply) -> None:
        """Takes in what a reply from `url` says about the cluster."""
        headers = reply.headers
        if self._learned:
            if FORWARDED_BY_HEADER in headers:
                self._stale = True
        elif NODE_HEADER in headers:  # a node with the cluster API: learn its topology
            self._stale = True
        if reply.status == 503 and self.cluster:
            self._stale = True
        if self._down and url in self._down:  # it answers again
            self._down = {u: at for u, at in self._down.items() if u != url}
            self._routes = {}

    def _unreachable(self, url: str) -> None:
        if not self.cluster:
            return  # one node: nowhere else to go, retry it as before clusters
        self._down = {**self._down, url: self._clock()}
        self._routes = {}
        self._stale = True
        if url == self.home:
            self.home = next((u for u in self._candidates() if u not in self._down), url)

    def _candidates(self) -> tuple[str, ...]:
        """The nodes to ask for the topology (or to send a call without a channel), the
        current seed first, then the other seeds, then the nodes the topology names."""
        return tuple(dict.fromkeys((self.home, *self._seeds, *self._nodes)))

    def _refresh(self) -> Generator[Step, Got, None]:
        """Fetches the topology from the first node that answers; leaves the view as it was
        when none does (the call itself then meets the failure, and retries)."""
        if self._refreshing or self._clock() - self._refreshed_at < MIN_REFRESH_S:
            return
        self._refreshing, self._stale = True, False
        self._refreshed_at = self._clock()
        call = self._wire.cluster()
        try:
            candidates = self._candidates()
            up = [u for u in candidates if u not in self._down]
            for url in up or candidates:
                got = yield Send(url, call)
                if not isinstance(got, Reply):
                    self._unreachable(url)
                    continue
                if got.status == 200:
                    self.learn(call.result(got))
                    return
                if got.status == 404:  # a node from before clusters
                    self.learn(None)
                    return
                if got.status < 500:  # a wrong token: the caller has to know
                    raise error_for(got.status, got.content, got.reason)
            self._stale = True
        finally:
            self._refreshing = False
