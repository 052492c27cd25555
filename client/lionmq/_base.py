"""What `Client` and `AsyncClient` share: settings, headers and turning arguments into calls."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import msgspec

from lionmq.models import ClusterInfo, HandoffResult, NewMessage
from lionmq.options import ClientOptions, MessageOptions
from lionmq.protocol import Call, Router, Wire, new_messages
from lionmq.retry import RetryPolicy
from lionmq.topology import (
    InvalidTopology,
    SetNodes,
    ShardSpec,
    Topology,
    set_nodes_request,
    validate_set_nodes,
)

DEFAULT_URL = "http://127.0.0.1:8000"
USER_AGENT = "lionmq-python/0.1"


Seeds = str | Sequence[str]
"""One node URL, or several (seeds of a cluster: any of them will do to find the others)."""


class ClientBase:
    def __init__(self, seeds: Seeds, options: ClientOptions) -> None:
        self._wire = Wire()
        self._retry = options.get("retry") or RetryPolicy()
        self._router = Router(
            [seeds] if isinstance(seeds, str) else seeds, self._wire, self._retry.clock
        )
        self._admin_token = options.get("admin_token")
        self._timeout = options.get("timeout", 10.0)
        self._max_batch = options.get("max_batch", 1000)
        self._max_connections = options.get("max_connections", 100)
        if self._max_batch < 1 or self._max_connections < 1:
            raise ValueError("max_batch and max_connections must be at least 1")
        self._default_headers = {"content-type": "application/json", "user-agent": USER_AGENT}
        if token := options.get("token"):
            self._default_headers["authorization"] = f"Bearer {token}"
        self._default_headers.update(options.get("headers") or {})

    def _enqueue_calls(
        self, channel: str, bodies: Iterable[Any], options: MessageOptions
    ) -> list[Call[list[str]]]:
        """One call per `max_batch` messages; dedup ids are assigned across the whole set."""
        messages: list[NewMessage] = new_messages(bodies, **options)
        size = self._max_batch
        return [
            self._wire.enqueue(channel, messages[i : i + size])
            for i in range(0, len(messages), size)
        ]

    def _set_nodes_call(
        self,
        shards: Sequence[Mapping[str, Any] | ShardSpec] | None,
        primaries: Sequence[str] | None,
        backups: Mapping[str, Sequence[str]] | None,
    ) -> Call[Topology]:
        """The set_nodes request, checked here first: a bad one raises InvalidTopology and
        never reaches the node."""
        if (shards is None) == (primaries is None):
            raise TypeError("give either shards, or primaries (and backups)")
        if primaries is not None:
            return self._wire.set_nodes(set_nodes_request(primaries, backups), self._admin_token)
        if backups is not None:
            raise TypeError("backups go with primaries; in shards, give each shard's own")
        assert shards is not None
        try:
            request = msgspec.convert({"shards": shards}, SetNodes, from_attributes=True)
        except msgspec.ValidationError as exc:
            raise InvalidTopology("Invalid set_nodes request", str(exc)) from None
        return self._wire.set_nodes(validate_set_nodes(request), self._admin_token)

    def _handoff_call(self, info: ClusterInfo, shard: str, to: str | None) -> Call[HandoffResult]:
        """Hand-offs go to the shard's acting owner as `info` names it (any other node would
        have to send it there); to the current seed when it names none (the node says why)."""
        owner = next((s.owner for s in info.shards if s.id == shard and s.owner), None)
        return self._wire.handoff(shard, to, owner, self._admin_token)
