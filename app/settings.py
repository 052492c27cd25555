"""Typed settings, read from the environment and `.env`; `.env.example` explains each one."""

from __future__ import annotations

import os
import socket
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from app.errors import ConfigError

# Deadlines for a request's headers and body (the watcher serves with the same).
HEADER_TIMEOUT_MS = 10_000
BODY_TIMEOUT_MS = 30_000
# The header node-to-node calls carry CLUSTER_SECRET in (app.api.auth.check_cluster_secret).
CLUSTER_SECRET_HEADER = "X-LionMQ-Cluster-Secret"


class Settings(BaseSettings):
    # An empty value (`DEFAULT_TTL_MS=` in a copied .env.example) means "not set": the default.
    model_config = SettingsConfigDict(
        env_file=".env", env_ignore_empty=True, extra="ignore", frozen=True
    )

    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)] = 8000
    # Empty: "<host name>-<port>", so that two processes on one host differ (a lease's owner).
    node_id: Annotated[str, Field(max_length=128)] = ""
    server_host: str = ""
    store_url: str = "sqlite:///./data/lionmq.db"
    # SQLite only: keep every other process out of the file (see app/store/sqlite.py).
    sqlite_exclusive: bool = False
    mongo_write_concern: str = "majority"
    mongo_journal: bool = True
    mongo_timeout_ms: Annotated[int, Field(ge=100, le=120_000)] = 5_000
    api_token: str = ""
    # More names clients reach the node by, comma-separated ("*": any); see allowed_host_names.
    allowed_hosts: str = ""
    max_message_bytes: Annotated[int, Field(ge=1, le=64 * 1024 * 1024)] = 256 * 1024
    max_batch: Annotated[int, Field(ge=1, le=100_000)] = 1000
    max_request_bytes: Annotated[int, Field(ge=1024, le=1024 * 1024 * 1024)] = 16 * 1024 * 1024
    dedup_window_ms: Annotated[int, Field(ge=0, le=7 * 24 * 3600 * 1000)] = 5 * 60 * 1000
    default_visibility_ms: Annotated[int, Field(ge=1000, le=43_200_000)] = 30_000
    default_max_attempts: Annotated[int, Field(ge=1, le=1000)] = 5
    default_max_length: Annotated[int | None, Field(ge=1, le=10**12)] = None
    default_ttl_ms: Annotated[int | None, Field(ge=1, le=365 * 24 * 3600 * 1000)] = None
    window_size: Annotated[int, Field(ge=100, le=1_000_000)] = 10_000
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    # Connections: how long a request's headers, then its body, may take to arrive, and how many
    # may be open at once (unset: the open-file limit less a reserve for the store and the node).
    header_timeout_ms: Annotated[int, Field(ge=100, le=600_000)] = HEADER_TIMEOUT_MS
    body_timeout_ms: Annotated[int, Field(ge=100, le=3_600_000)] = BODY_TIMEOUT_MS
    max_connections: Annotated[int | None, Field(ge=1, le=10_000_000)] = None
    watcher_url: str = ""
    watcher_token: str = ""
    metrics_interval_ms: Annotated[int, Field(ge=100, le=60_000)] = 1000
    # Channels /metrics labels by name (the deepest); the rest count only in the node totals.
    metrics_max_channels: Annotated[int, Field(ge=0, le=100_000)] = 100
    # The cluster (app/cluster): node-to-node secret, cluster-control token, a topology to seed
    # the store with, how often an owner renews its shard leases and how long one lasts.
    cluster_secret: str = ""
    admin_token: str = ""
    cluster_init: str = ""
    heartbeat_ms: Annotated[int, Field(ge=10, le=60_000)] = 500
    lease_ms: Annotated[int, Field(ge=40, le=600_000)] = 2000

    @field_validator("node_id")
    @classmethod
    def _header_safe(cls, value: str) -> str:
        # Sent in every message answer's X-LionMQ-Node header and in forwarded requests: a
        # space or a control character there fails each answer (or splits the header).
        if value and not all("!" <= ch <= "~" for ch in value):
            raise ValueError(
                f"{value[:40]!r} must be printable ASCII without spaces, as in node-1 or mq-a:8000"
            )
        return value

    @field_validator("store_url")
    @classmethod
    def _known_store(cls, value: str) -> str:
        if not value.startswith(("sqlite:///", "mongodb://", "mongodb+srv://")):
            raise ValueError("must start with sqlite:/// or mongodb:// (or mongodb+srv://)")
        if value.startswith("mongodb") and not mongo_database(value):
            raise ValueError(
                "a MongoDB URL must name its database, as in mongodb://host:27017/lionmq"
            )
        return value

    @field_validator("watcher_url")
    @classmethod
    def _ws_url(cls, value: str) -> str:
        if value and not value.startswith(("ws://", "wss://")):
            raise ValueError("must be a ws:// or wss:// URL, as in ws://watcher:8080/ingest")
        return value

    @field_validator("allowed_hosts")
    @classmethod
    def _host_names(cls, value: str) -> str:
        for name in value.split(","):
            name = name.strip()
            wildcard = "*" in name and name != "*"
            if wildcard or "/" in name or " " in name or ":" in name.rpartition("]")[2]:
                raise ValueError(
                    f"{name!r} is not a host name: list names such as mq.example.com or"
                    " 10.0.0.5 ([::1] for IPv6), without scheme, path, port or wildcard"
                    " (a lone * allows any host)"
                )
        return value

    @field_validator("cluster_init")
    @classmethod
    def _topology(cls, value: str) -> str:
        if value:
            from app.cluster.init import parse_cluster_init

            parse_cluster_init(value)  # raises ValueError naming what is wrong
        return value

    @model_validator(mode="after")
    def _derived(self) -> Settings:
        if not self.server_host:
            object.__setattr__(self, "server_host", f"http://{self.host}:{self.port}")
        if not self.node_id:
            object.__setattr__(self, "node_id", f"{socket.gethostname()}-{self.port}")
        if self.heartbeat_ms * 2 > self.lease_ms:
            raise ValueError(
                f"HEARTBEAT_MS ({self.heartbeat_ms}) must be at most half of LEASE_MS"
                f" ({self.lease_ms}): a lease must survive a missed renewal"
            )
        if self.watcher_url and not self.watcher_token:
            raise ValueError("WATCHER_TOKEN must be set when WATCHER_URL is")
        return self

    @property
    def allowed_host_names(self) -> frozenset[str]:
        """The hosts the node answers to, any port: the loopback names, SERVER_HOST's host and
        ALLOWED_HOSTS (names, not addresses: a DNS rebinding attack keeps its own name in the
        Host header, so only the names clients use are let through)."""
        given = (name.strip().lower().rstrip(".") for name in self.allowed_hosts.split(","))
        server = urlsplit(self.server_host).netloc.rpartition("@")[2]
        return frozenset(
            {"127.0.0.1", "localhost", "[::1]", host_name(server)} | {n for n in given if n}
        ) - {"*", ""}

    @property
    def any_host(self) -> bool:
        return "*" in (name.strip() for name in self.allowed_hosts.split(","))

    @property
    def sqlite_path(self) -> str:
        return self.store_url.removeprefix("sqlite:///")

    @property
    def store_label(self) -> str:
        """Where the store is, for logs: the file's absolute path, or MongoDB's hosts and database
        without the credentials."""
        if self.store_url.startswith("sqlite:///"):
            return f"sqlite {os.path.abspath(self.sqlite_path)}"
        scheme, rest = self.store_url.split("://", 1)
        hosts = rest.split("/", 1)[0].rpartition("@")[2]
        return f"{scheme}://{hosts}/{mongo_database(self.store_url)}"


def host_name(authority: str) -> str:
    """The host of `host[:port]` (or `[v6]:port`), lower case."""
    authority = authority.strip().lower()
    if authority.startswith("["):
        return authority.partition("]")[0] + "]"
    return authority.partition(":")[0].rstrip(".")


def mongo_database(url: str) -> str:
    path = url.split("://", 1)[1].split("/", 1)
    return path[1].split("?", 1)[0] if len(path) == 2 else ""


def load_settings(**overrides: object) -> Settings:
    """Read settings; a bad one becomes a `ConfigError` naming the setting in one line."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            name = "_".join(str(part) for part in err["loc"]).upper() or "settings"
            # pydantic prefixes a validator's own message with "Value error, ": not for people.
            problems.append(f"{name}: {err['msg'].removeprefix('Value error, ')}")
        raise ConfigError("invalid setting " + "; ".join(problems)) from None
