"""A dequeued message that can settle itself through the client that received it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lionmq.models import AckResult, Delivery, ExtendResult, NackResult

if TYPE_CHECKING:
    from lionmq._async import AsyncClient
    from lionmq._sync import Client


class _Received:
    """The fields of a delivery plus `settled`, which tells `consume` the handler already
    acked or nacked, so it must not settle the message a second time."""

    __slots__ = ("attempt", "body", "channel", "enqueued_at", "headers", "id", "receipt", "settled")

    def __init__(self, channel: str, delivery: Delivery) -> None:
        self.channel = channel
        self.id = delivery.id
        self.body: Any = delivery.body
        self.headers: dict[str, str] = delivery.headers or {}
        self.receipt = delivery.receipt
        self.attempt = delivery.attempt
        self.enqueued_at = delivery.enqueued_at
        self.settled = False

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(channel={self.channel!r}, id={self.id!r}, "
            f"attempt={self.attempt}, body={self.body!r})"
        )


class Message(_Received):
    """A message from `Client.dequeue`; its lease is held until acked, nacked or expired."""

    __slots__ = ("_client",)

    def __init__(self, client: Client, channel: str, delivery: Delivery) -> None:
        super().__init__(channel, delivery)
        self._client = client

    def ack(self) -> AckResult:
        result = self._client.ack(self.channel, [self.receipt])
        self.settled = True
        return result

    def nack(self, *, delay_ms: int = 0, dead_letter: bool = False) -> NackResult:
        result = self._client.nack(
            self.channel, [self.receipt], delay_ms=delay_ms, dead_letter=dead_letter
        )
        self.settled = True
        return result

    def extend(self, visibility_ms: int) -> ExtendResult:
        return self._client.extend(self.channel, [self.receipt], visibility_ms)


class AsyncMessage(_Received):
    """A message from `AsyncClient.dequeue`; the same as `Message`, with awaitable methods."""

    __slots__ = ("_client",)

    def __init__(self, client: AsyncClient, channel: str, delivery: Delivery) -> None:
        super().__init__(channel, delivery)
        self._client = client

    async def ack(self) -> AckResult:
        result = await self._client.ack(self.channel, [self.receipt])
        self.settled = True
        return result

    async def nack(self, *, delay_ms: int = 0, dead_letter: bool = False) -> NackResult:
        result = await self._client.nack(
            self.channel, [self.receipt], delay_ms=delay_ms, dead_letter=dead_letter
        )
        self.settled = True
        return result

    async def extend(self, visibility_ms: int) -> ExtendResult:
        return await self._client.extend(self.channel, [self.receipt], visibility_ms)
