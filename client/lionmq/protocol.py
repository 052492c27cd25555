"""Request building and response parsing for the node's HTTP API, free of any I/O.

Both clients turn each operation into a `Call`, send it their own way (blocking or awaited) and
hand the `Reply` back to `Call.result`; nothing here knows how bytes travel.
"""

from __future__ import annotations

import itertools
import os
import secrets
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, NamedTuple, TypeVar
from urllib.parse import quote

import msgspec

from lionmq.errors import UnexpectedResponse
from lionmq.models import (
    AckResult,
    ChannelInfo,
    ChannelList,
    Delivery,
    DequeueBody,
    DequeueReply,
    EnqueueBody,
    EnqueueReply,
    ExtendResult,
    NackResult,
    NewMessage,
    PurgeReply,
    ReceiptsBody,
)
from lionmq.options import ChannelOptions

T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)

MAX_WAIT_MS = 30_000
"""The node's long-poll bound: a dequeue never waits longer than this."""


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

    # -- messages --------------------------------------------------------------------------

    def enqueue(self, channel: str, messages: list[NewMessage]) -> Call[list[str]]:
        """Encodes the batch once, dedup ids included, so every retry sends the same bytes."""
        content = self._encode(EnqueueBody(messages))
        return Call("POST", f"{_channel(channel)}/enqueue", self._ids, content, ok=CREATED)

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
        return Call("POST", f"{_channel(channel)}/{verb}", parse, self._encode(body))

    # -- channels and node -----------------------------------------------------------------

    def put_channel(self, channel: str, settings: ChannelOptions) -> Call[ChannelInfo]:
        content = self._encode(settings)
        return Call("PUT", _channel(channel), self._info, content)

    def get_channel(self, channel: str) -> Call[ChannelInfo]:
        return Call("GET", _channel(channel), self._info)

    def list_channels(self) -> Call[list[ChannelInfo]]:
        return Call("GET", "/channels", self._list)

    def purge(self, channel: str) -> Call[int]:
        return Call("POST", f"{_channel(channel)}/purge", self._purged)

    def delete(self, channel: str) -> Call[None]:
        return Call("DELETE", _channel(channel), _none, ok=_DELETED)

    def health(self) -> Call[dict[str, Any]]:
        return Call("GET", "/health", self._health)

    def ready(self) -> Call[bool]:
        # 503 is an answer here ("not ready"), not a failure to retry.
        return Call("GET", "/ready", _is_ready, ok=_READY)


_DELETED = frozenset({200, 204})
_READY = frozenset({200, 503})


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
