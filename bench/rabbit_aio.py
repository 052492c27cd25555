"""RabbitMQ driven with aio-pika (asyncio): one connection and channel per producer or
consumer (single enqueue: 32 channels on one connection), running the shared scenario bodies
of `bench.shape`.

A batch is 100 publishes followed by waiting for their publisher confirms; consumers use
basic.qos prefetch and ack with multiple=true every 100 deliveries.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import aio_pika
from aio_pika.abc import (
    AbstractChannel,
    AbstractConnection,
    AbstractIncomingMessage,
    AbstractQueue,
)

from bench.rabbit_server import RabbitServer
from bench.shape import AsyncBroker, Consumer, Publisher, Pull, Runner, queue_name, runners
from bench.stats import Budget, Record, body

ACK_EVERY = 100
# How often a consumer looks at the count and the deadline.
IDLE_S = 0.005


def persistent(data: bytes) -> aio_pika.Message:
    return aio_pika.Message(data, delivery_mode=aio_pika.DeliveryMode.PERSISTENT)


class AmqpPublisher:
    """Publishes on a confirm-mode channel: each publish returns once confirmed."""

    def __init__(self, channel: AbstractChannel) -> None:
        self.channel = channel

    async def publish_batch(self, queue: str, size: int, n: int) -> None:
        exchange = self.channel.default_exchange
        await asyncio.gather(
            *(
                exchange.publish(persistent(body(size).encode()), routing_key=queue)
                for _ in range(n)
            )
        )

    async def publish(self, queue: str, data: bytes) -> None:
        await self.channel.default_exchange.publish(persistent(data), routing_key=queue)


class AmqpConsumer:
    def __init__(self, channel: AbstractChannel, queue: str) -> None:
        self.channel = channel
        self.queue = queue

    async def consume(self, counter: Budget, pull: Pull, record: Record | None = None) -> None:
        """Consumes (basic.qos `pull.prefetch`) until every consumer together has received
        `counter.total`, or its deadline; acks with multiple=true every ACK_EVERY deliveries
        and once more at the end. A delivery past the total is left unacked: the broker
        requeues it when the channel closes, at the end."""
        channel = self.channel
        await channel.set_qos(prefetch_count=pull.prefetch)
        q: AbstractQueue = await channel.get_queue(self.queue, ensure=False)
        last: AbstractIncomingMessage | None = None
        unacked = 0
        reached = asyncio.Event()  # this consumer saw the total reached

        async def on_message(message: AbstractIncomingMessage) -> None:
            nonlocal last, unacked
            if counter.complete:
                reached.set()
                return
            if record is not None:
                record(time.time(), [message.body])
            counter.add(1)
            last, unacked = message, unacked + 1
            if unacked >= ACK_EVERY:
                await message.ack(multiple=True)
                unacked = 0
            if counter.complete:
                reached.set()

        tag = await q.consume(on_message)
        try:
            # Another consumer may reach the total: look at the count every IDLE_S too.
            while not counter.complete and not counter.expired():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(reached.wait(), IDLE_S)
            await q.cancel(tag)
            if last is not None and unacked:
                await last.ack(multiple=True)
        finally:
            await channel.close()


class Amqp(AsyncBroker[AbstractConnection]):
    """Connections to one server; each producer or consumer gets its own channel."""

    hold_back_s = 0.005
    subscribe_s = 0.5  # the consumer is subscribed before the first publish

    def __init__(self, server: RabbitServer) -> None:
        super().__init__(server)
        self.url = server.url

    async def connection(self) -> AbstractConnection:
        connection = await aio_pika.connect(self.url)
        self.connections.append(connection)
        return connection

    async def channel(self, connection: AbstractConnection | None = None) -> AbstractChannel:
        connection = connection or await self.connection()
        return await connection.channel(publisher_confirms=True)

    async def channels(self, n: int) -> list[AbstractChannel]:
        """n channels, each on a connection of its own, opened before a run's clock starts."""
        return [await self.channel() for _ in range(n)]

    async def publishers(self, n: int) -> list[Publisher]:
        return [AmqpPublisher(c) for c in await self.channels(n)]

    async def single_publishers(self, n: int) -> list[Publisher]:
        """n channels on one connection."""
        connection = await self.connection()
        return [AmqpPublisher(await self.channel(connection)) for _ in range(n)]

    async def consumers(self, queue: str, n: int) -> list[Consumer]:
        return [AmqpConsumer(c, queue) for c in await self.channels(n)]

    async def queue(self, tag: str, max_unacked: int) -> str:
        name = queue_name(tag)
        channel = await self.channel(self.connections[0] if self.connections else None)
        await channel.declare_queue(name, durable=True)
        await channel.close()
        return name

    async def delete(self, name: str) -> None:
        with contextlib.suppress(Exception):
            channel = await self.channel(self.connections[0])
            await channel.queue_delete(name)
            await channel.close()


RUNNERS: dict[int, Runner[RabbitServer]] = runners(Amqp)
