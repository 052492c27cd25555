"""The asyncio client: the same operations as `Client`, awaitable."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from types import TracebackType
from typing import Any, TypeVar, Unpack

import httpx

from lionmq import options as opt
from lionmq._base import DEFAULT_URL, ClientBase, Seeds
from lionmq._senders import AiohttpSender, AsyncSender, HttpxSender
from lionmq.consume import ConsumeConfig
from lionmq.errors import ConnectionFailed
from lionmq.message import AsyncMessage
from lionmq.models import (
    AckResult,
    ChannelInfo,
    ClusterInfo,
    ExtendResult,
    HandoffResult,
    MessageDetail,
    MessagePage,
    NackResult,
    NewMessage,
    RedriveResult,
)
from lionmq.protocol import Call, Got, MessageState, Send
from lionmq.topology import ShardSpec, Topology

T = TypeVar("T")


class AsyncClient(ClientBase):
    """A LionMQ client for asyncio; each method mirrors `Client`'s, and so do the URLs it
    takes (one node, or seeds of a cluster) and how it routes in a cluster.

    By default requests travel straight over one aiohttp session, which holds its throughput
    under concurrent requests where httpx's own pool does not, at a fraction of the CPU per
    request. Pass an httpx `transport=` to send through httpx instead (`httpx.ASGITransport`,
    `httpx.MockTransport` in tests). Bound to the event loop of its first request; use it as an
    async context manager, or await `aclose()`.
    """

    def __init__(
        self,
        base_url: Seeds = DEFAULT_URL,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        **options: Unpack[opt.ClientOptions],
    ) -> None:
        super().__init__(base_url, options)
        headers, timeout = self._default_headers, self._timeout
        self._sender: AsyncSender = (
            AiohttpSender(headers, timeout, self._max_connections)
            if transport is None
            else HttpxSender(headers, timeout, transport)
        )

    async def aclose(self) -> None:
        """Closes the transport too (the aiohttp session, for the default one)."""
        await self._sender.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def _call(self, call: Call[T]) -> T:
        """Drives the router's exchange (routing, refreshes, retries) over asyncio."""
        router, send = self._router, self._sender.send
        got: Got = None
        url = router.first(call)
        if url is not None:  # the fast path: one try that succeeds needs no more
            try:
                reply = await send(url, call)
            except ConnectionFailed as error:
                got = error
            else:
                if reply.status in call.ok:
                    router.observe(url, reply)
                    return call.result(reply)
                got = reply
        steps = router.exchange(call, self._retry.begin(), url, got)
        got = None
        try:
            while True:
                step = steps.send(got)
                if isinstance(step, Send):
                    try:
                        got = await send(step.url, step.call)
                    except ConnectionFailed as error:  # no response came
                        got = error
                else:
                    await self._retry.async_sleep(step.seconds)
                    got = None
        except StopIteration as done:
            result: T = done.value
            return result

    # -- messages --------------------------------------------------------------------------

    async def enqueue(
        self, channel: str, body: Any, **options: Unpack[opt.OneMessageOptions]
    ) -> str:
        ids = await self.enqueue_many(channel, [NewMessage(body, **options)])
        return ids[0]

    async def enqueue_many(
        self, channel: str, bodies: Iterable[Any], **options: Unpack[opt.MessageOptions]
    ) -> list[str]:
        calls = self._enqueue_calls(channel, bodies, options)
        # Chunks of one call go out one after the other, so the ids come back in order.
        return [id for call in calls for id in await self._call(call)]

    async def dequeue(
        self, channel: str, max: int = 1, *, wait_ms: int = 0, visibility_ms: int | None = None
    ) -> list[AsyncMessage]:
        call = self._wire.dequeue(channel, max, wait_ms, visibility_ms)
        deliveries = await self._call(call)
        return [AsyncMessage(self, channel, delivery) for delivery in deliveries]

    async def ack(self, channel: str, receipts: Sequence[str]) -> AckResult:
        return await self._call(self._wire.ack(channel, receipts))

    async def nack(
        self, channel: str, receipts: Sequence[str], *, delay_ms: int = 0, dead_letter: bool = False
    ) -> NackResult:
        return await self._call(self._wire.nack(channel, receipts, delay_ms, dead_letter))

    async def extend(
        self, channel: str, receipts: Sequence[str], visibility_ms: int
    ) -> ExtendResult:
        return await self._call(self._wire.extend(channel, receipts, visibility_ms))

    # -- channels and node -----------------------------------------------------------------

    async def put_channel(
        self, channel: str, **settings: Unpack[opt.ChannelOptions]
    ) -> ChannelInfo:
        return await self._call(self._wire.put_channel(channel, settings))

    async def get_channel(self, channel: str) -> ChannelInfo:
        return await self._call(self._wire.get_channel(channel))

    async def list_channels(self) -> list[ChannelInfo]:
        return await self._call(self._wire.list_channels())

    async def purge(self, channel: str) -> int:
        return await self._call(self._wire.purge(channel))

    async def delete_channel(self, channel: str) -> None:
        await self._call(self._wire.delete(channel))

    # -- browsing and redriving ------------------------------------------------------------

    async def peek(
        self,
        channel: str,
        *,
        state: MessageState | None = None,
        after: str | None = None,
        limit: int = 100,
    ) -> MessagePage:
        """Like `Client.peek`."""
        return await self._call(self._wire.messages(channel, state, after, limit))

    async def get_message(self, channel: str, id: str) -> MessageDetail:
        """Like `Client.get_message`."""
        return await self._call(self._wire.message(channel, id))

    async def redrive(
        self, channel: str, *, to: str | None = None, max: int = 1000, rate: float | None = None
    ) -> RedriveResult:
        """Like `Client.redrive`."""
        return await self._call(self._wire.redrive(channel, to, max, rate))

    async def health(self) -> dict[str, Any]:
        return await self._call(self._wire.health())

    async def ready(self) -> bool:
        return await self._call(self._wire.ready())

    # -- the cluster -----------------------------------------------------------------------

    async def cluster(self) -> ClusterInfo:
        """Like `Client.cluster`."""
        info = await self._call(self._wire.cluster())
        self._router.learn(info)
        return info

    async def set_nodes(
        self,
        shards: Sequence[Mapping[str, Any] | ShardSpec] | None = None,
        *,
        primaries: Sequence[str] | None = None,
        backups: Mapping[str, Sequence[str]] | None = None,
    ) -> Topology:
        """Like `Client.set_nodes`."""
        topology = await self._call(self._set_nodes_call(shards, primaries, backups))
        self._router.invalidate()
        return topology

    async def handoff(self, shard: str, *, to: str | None = None) -> HandoffResult:
        """Like `Client.handoff`."""
        call = self._handoff_call(await self.cluster(), shard, to)
        result = await self._call(call)
        self._router.invalidate()
        return result

    # -- consuming -------------------------------------------------------------------------

    async def consume(
        self,
        channel: str,
        handler: Callable[[AsyncMessage], Awaitable[object]],
        *,
        concurrency: int = 1,
        batch: int | None = None,
        stop: asyncio.Event | None = None,
        **options: Unpack[opt.ConsumeOptions],
    ) -> None:
        """Like `Client.consume`, with an async handler run as up to `concurrency` tasks.
        Setting `stop`, or a first Ctrl-C in the main thread, lets running handlers finish;
        cancelling it (a second Ctrl-C under `asyncio.run`) cancels them and nacks their
        messages."""
        from lionmq._consume_async import consume

        config = ConsumeConfig.build(concurrency, batch, options)
        await consume(self, channel, handler, config, stop)
