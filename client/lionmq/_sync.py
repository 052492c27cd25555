"""The blocking client."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from types import TracebackType
from typing import Any, TypeVar, Unpack

import httpx

from lionmq import options as opt
from lionmq._base import DEFAULT_URL, ClientBase, Seeds
from lionmq._senders import SyncHttpxSender
from lionmq.consume import ConsumeConfig
from lionmq.errors import ConnectionFailed
from lionmq.message import Message
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


class Client(ClientBase):
    """A LionMQ client for threaded code; safe to share between threads.

    `base_url` is one node's URL, or several (seeds of a cluster). In a cluster each channel's
    calls go straight to the node serving its shard, and a failover shows only as a delay
    (see `lionmq.protocol.Router` for the rules); a single standalone node gets exactly the
    requests it got before clusters.

    Connection errors and 5xx are retried per `retry`; every other failure raises a
    `LionMQError` subclass. Use it as a context manager, or call `close()`.
    """

    def __init__(
        self,
        base_url: Seeds = DEFAULT_URL,
        *,
        transport: httpx.BaseTransport | None = None,
        **options: Unpack[opt.ClientOptions],
    ) -> None:
        super().__init__(base_url, options)
        self._sender = SyncHttpxSender(
            self._default_headers, self._timeout, self._max_connections, transport
        )

    def close(self) -> None:
        self._sender.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _call(self, call: Call[T]) -> T:
        """Drives the router's exchange (routing, refreshes, retries) over blocking I/O."""
        router, send = self._router, self._sender.send
        got: Got = None
        url = router.first(call)
        if url is not None:  # the fast path: one try that succeeds needs no more
            try:
                reply = send(url, call)
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
                        got = send(step.url, step.call)
                    except ConnectionFailed as error:
                        got = error
                else:
                    self._retry.sleep(step.seconds)
                    got = None
        except StopIteration as done:
            result: T = done.value
            return result

    # -- messages --------------------------------------------------------------------------

    def enqueue(self, channel: str, body: Any, **options: Unpack[opt.OneMessageOptions]) -> str:
        """Enqueues one message (any JSON value) and returns its id."""
        return self.enqueue_many(channel, [NewMessage(body, **options)])[0]

    def enqueue_many(
        self, channel: str, bodies: Iterable[Any], **options: Unpack[opt.MessageOptions]
    ) -> list[str]:
        """Enqueues many messages, in order, and returns their ids. Items that are `NewMessage`
        keep their own options; plain bodies get `options`."""
        ids: list[str] = []
        for call in self._enqueue_calls(channel, bodies, options):
            ids += self._call(call)
        return ids

    def dequeue(
        self, channel: str, max: int = 1, *, wait_ms: int = 0, visibility_ms: int | None = None
    ) -> list[Message]:
        """Leases up to `max` messages, waiting up to `wait_ms` for the first to arrive."""
        call = self._wire.dequeue(channel, max, wait_ms, visibility_ms)
        return [Message(self, channel, delivery) for delivery in self._call(call)]

    def ack(self, channel: str, receipts: Sequence[str]) -> AckResult:
        return self._call(self._wire.ack(channel, receipts))

    def nack(
        self, channel: str, receipts: Sequence[str], *, delay_ms: int = 0, dead_letter: bool = False
    ) -> NackResult:
        return self._call(self._wire.nack(channel, receipts, delay_ms, dead_letter))

    def extend(self, channel: str, receipts: Sequence[str], visibility_ms: int) -> ExtendResult:
        return self._call(self._wire.extend(channel, receipts, visibility_ms))

    # -- channels and node -----------------------------------------------------------------

    def put_channel(self, channel: str, **settings: Unpack[opt.ChannelOptions]) -> ChannelInfo:
        """Creates the channel or changes the given settings."""
        return self._call(self._wire.put_channel(channel, settings))

    def get_channel(self, channel: str) -> ChannelInfo:
        return self._call(self._wire.get_channel(channel))

    def list_channels(self) -> list[ChannelInfo]:
        return self._call(self._wire.list_channels())

    def purge(self, channel: str) -> int:
        """Drops every message of the channel; returns how many went."""
        return self._call(self._wire.purge(channel))

    def delete_channel(self, channel: str) -> None:
        self._call(self._wire.delete(channel))

    # -- browsing and redriving ------------------------------------------------------------

    def peek(
        self,
        channel: str,
        *,
        state: MessageState | None = None,
        after: str | None = None,
        limit: int = 100,
    ) -> MessagePage:
        """Up to `limit` (1..1000) messages of `channel` in id order, past the id `after`, in
        one state or all: nothing is leased or changed. Pass the page's `next` as `after` for
        the next page. Raises ChannelNotFound for a channel that does not exist."""
        return self._call(self._wire.messages(channel, state, after, limit))

    def get_message(self, channel: str, id: str) -> MessageDetail:
        """One message, with its history when the channel traces (`put_channel(trace=True)`)."""
        return self._call(self._wire.message(channel, id))

    def redrive(
        self, channel: str, *, to: str | None = None, max: int = 1000, rate: float | None = None
    ) -> RedriveResult:
        """Moves up to `max` (1..10000) ready messages of `channel` (normally a dead-letter
        channel), oldest first, to `to`, or with `to=None` each back to the channel its
        `x-dead-letter-channel` header names; `rate` paces it (messages per second). Each
        batch moves atomically: call it again until `remaining` is 0 (the `lionmq redrive`
        command does)."""
        return self._call(self._wire.redrive(channel, to, max, rate))

    def health(self) -> dict[str, Any]:
        return self._call(self._wire.health())

    def ready(self) -> bool:
        return self._call(self._wire.ready())

    # -- the cluster -----------------------------------------------------------------------

    def cluster(self) -> ClusterInfo:
        """The cluster as the current seed sees it: shards, their nodes and acting owners,
        every node's role and status. Also refreshes this client's routes."""
        info = self._call(self._wire.cluster())
        self._router.learn(info)
        return info

    def set_nodes(
        self,
        shards: Sequence[Mapping[str, Any] | ShardSpec] | None = None,
        *,
        primaries: Sequence[str] | None = None,
        backups: Mapping[str, Sequence[str]] | None = None,
    ) -> Topology:
        """Reshapes the cluster: `set_nodes([{"primary": url, "backups": [url, ...]}, ...])`, or
        `set_nodes(primaries=[url, ...], backups={primary: [url, ...]})`. Needs the client's
        `admin_token`. Checked here first (InvalidTopology, nothing sent); returns the topology
        stored. Shards keep their ids; channels that move are handed off by the nodes."""
        topology = self._call(self._set_nodes_call(shards, primaries, backups))
        self._router.invalidate()
        return topology

    def handoff(self, shard: str, *, to: str | None = None) -> HandoffResult:
        """Hands `shard` from its owner to an up-to-date backup (or to the node `to`), as a
        rolling restart does. Needs the client's `admin_token`. Sent once, never retried: a
        failure is raised as it came (409: no backup up to date, or not the owner)."""
        call = self._handoff_call(self.cluster(), shard, to)
        result = self._call(call)
        self._router.invalidate()
        return result

    # -- consuming -------------------------------------------------------------------------

    def consume(
        self,
        channel: str,
        handler: Callable[[Message], object],
        *,
        concurrency: int = 1,
        batch: int | None = None,
        stop: threading.Event | None = None,
        **options: Unpack[opt.ConsumeOptions],
    ) -> None:
        """Runs `handler` on every message of `channel`, on `concurrency` threads, until `stop`
        is set or Ctrl-C. A handler that returns gets its message acked (in batches); one that
        raises gets it nacked. Leases of slow handlers are extended. On stop, messages not yet
        started are nacked and running handlers finish (see `drain_timeout`). In the main
        thread a first Ctrl-C logs one line and stops as `stop` does; a second one raises
        KeyboardInterrupt at once (what is still held is nacked)."""
        from lionmq._consume_sync import consume

        consume(self, channel, handler, ConsumeConfig.build(concurrency, batch, options), stop)
