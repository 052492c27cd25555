"""What `Client` and `AsyncClient` share: settings, headers and turning arguments into calls."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from lionmq.models import NewMessage
from lionmq.options import ClientOptions, MessageOptions
from lionmq.protocol import Call, Wire, new_messages
from lionmq.retry import RetryPolicy

DEFAULT_URL = "http://127.0.0.1:8000"
USER_AGENT = "lionmq-python/0.1"


class ClientBase:
    def __init__(self, base_url: str, options: ClientOptions) -> None:
        self._wire = Wire()
        self._base_url = base_url
        self._retry = options.get("retry") or RetryPolicy()
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
