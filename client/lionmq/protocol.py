"""Request building and response parsing for the node's HTTP API, free of any I/O.

Both clients turn each operation into a `Call`, send it their own way (blocking or awaited) and
hand the response back to `Call.parse`; nothing here knows how bytes travel.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar
from urllib.parse import quote

import httpx
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


@dataclass(frozen=True, slots=True)
class Call(Generic[T_co]):
    """One HTTP exchange: what to send and how to read a response whose status is `ok`."""

    method: str
    path: str
    parse: Callable[[httpx.Response], T_co]
    content: bytes | None = None
    long_poll_s: float = 0.0
    """Extra read time for a long poll, added to the client's timeout."""
    ok: frozenset[int] = frozenset({200})


def _none(_: httpx.Response) -> None:
    return None


class Wire:
    """Encoders and typed decoders, built once per client (msgspec compiles them on creation)."""

    def __init__(self) -> None:
        self._encoder = msgspec.json.Encoder()
        self._ids = msgspec.json.Decoder(EnqueueReply)
        self._deliveries = msgspec.json.Decoder(DequeueReply)
        self._ack = msgspec.json.Decoder(AckResult)
        self._nack = msgspec.json.Decoder(NackResult)
        self._extend = msgspec.json.Decoder(ExtendResult)
        self._info = msgspec.json.Decoder(ChannelInfo)
        self._list = msgspec.json.Decoder(ChannelList)
        self._purge = msgspec.json.Decoder(PurgeReply)
        self._any = msgspec.json.Decoder()

    def _decode(self, decoder: msgspec.json.Decoder[T], response: httpx.Response) -> T:
        try:
            return decoder.decode(response.content)
        except msgspec.MsgspecError as exc:
            raise UnexpectedResponse(
                "Unexpected response", f"{response.request.url.path}: {exc}", status=None
            ) from exc

    # -- messages --------------------------------------------------------------------------

    def enqueue(self, channel: str, messages: list[NewMessage]) -> Call[list[str]]:
        """Encodes the batch once, dedup ids included, so every retry sends the same bytes."""
        content = self._encoder.encode(EnqueueBody(messages))
        return Call(
            "POST",
            f"{_channel(channel)}/enqueue",
            lambda r: self._decode(self._ids, r).ids,
            content,
            ok=frozenset({200, 201}),
        )

    def dequeue(
        self, channel: str, max: int, wait_ms: int, visibility_ms: int | None
    ) -> Call[list[Delivery]]:
        content = self._encoder.encode(DequeueBody(max, wait_ms, visibility_ms))
        return Call(
            "POST",
            f"{_channel(channel)}/dequeue",
            lambda r: self._decode(self._deliveries, r).messages,
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
        self, channel: str, verb: str, body: ReceiptsBody, decoder: msgspec.json.Decoder[T]
    ) -> Call[T]:
        return Call(
            "POST",
            f"{_channel(channel)}/{verb}",
            lambda r: self._decode(decoder, r),
            self._encoder.encode(body),
        )

    # -- channels and node -----------------------------------------------------------------

    def put_channel(self, channel: str, settings: ChannelOptions) -> Call[ChannelInfo]:
        content = self._encoder.encode(settings)
        return Call("PUT", _channel(channel), lambda r: self._decode(self._info, r), content)

    def get_channel(self, channel: str) -> Call[ChannelInfo]:
        return Call("GET", _channel(channel), lambda r: self._decode(self._info, r))

    def list_channels(self) -> Call[list[ChannelInfo]]:
        return Call("GET", "/channels", lambda r: self._decode(self._list, r).channels)

    def purge(self, channel: str) -> Call[int]:
        path = f"{_channel(channel)}/purge"
        return Call("POST", path, lambda r: self._decode(self._purge, r).purged)

    def delete(self, channel: str) -> Call[None]:
        return Call("DELETE", _channel(channel), _none, ok=frozenset({200, 204}))

    def health(self) -> Call[dict[str, Any]]:
        return Call("GET", "/health", lambda r: dict(self._decode(self._any, r)))

    def ready(self) -> Call[bool]:
        # 503 is an answer here ("not ready"), not a failure to retry.
        return Call("GET", "/ready", lambda r: r.status_code == 200, ok=frozenset({200, 503}))


def _receipts(receipts: Sequence[str]) -> list[str]:
    # A lone string is a Sequence[str] too: take it as one receipt, not as characters.
    return [receipts] if isinstance(receipts, str) else list(receipts)


def _channel(channel: str) -> str:
    # Names are [A-Za-z0-9._-], but quoting keeps a bad name from reaching another route.
    return "/channels/" + quote(channel, safe="")


def new_messages(
    bodies: Iterable[Any],
    *,
    headers: dict[str, str] | None = None,
    delay_ms: int | None = None,
    ttl_ms: int | None = None,
) -> list[NewMessage]:
    """Wraps plain bodies with the shared options (`NewMessage` items keep their own) and gives
    every message lacking a dedup id one, so that a retried enqueue stores nothing twice.

    One random prefix per call plus the index is unique enough (64 random bits) and costs one
    `secrets` call per batch rather than one per message. The caller's `NewMessage` objects are
    copied, never changed: reusing one later must not make the node drop it as a duplicate."""
    prefix = secrets.token_hex(8)
    out: list[NewMessage] = []
    for index, body in enumerate(bodies):
        dedup_id = f"{prefix}-{index}"
        if not isinstance(body, NewMessage):
            out.append(NewMessage(body, headers, delay_ms, ttl_ms, dedup_id))
        elif body.dedup_id is None:
            out.append(msgspec.structs.replace(body, dedup_id=dedup_id))
        else:
            out.append(body)
    return out
