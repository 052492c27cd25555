"""Typed settings, read from the environment and `.env`; `.env.example` explains each one."""

from __future__ import annotations

import socket
from typing import Annotated, Literal

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from app.errors import ConfigError


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", extra="ignore", frozen=True)

    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)] = 8000
    node_id: Annotated[str, Field(min_length=1, max_length=128)] = Field(
        default_factory=socket.gethostname
    )
    server_host: str = ""
    store_url: str = "sqlite:///./data/lionmq.db"
    mongo_write_concern: str = "majority"
    mongo_journal: bool = True
    mongo_timeout_ms: Annotated[int, Field(ge=100, le=120_000)] = 5_000
    api_token: str = ""
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
    watcher_url: str = ""
    watcher_token: str = ""
    metrics_interval_ms: Annotated[int, Field(ge=100, le=60_000)] = 1000
    # Channels /metrics labels by name (the deepest); the rest count only in the node totals.
    metrics_max_channels: Annotated[int, Field(ge=0, le=100_000)] = 100

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

    @model_validator(mode="after")
    def _derived(self) -> Settings:
        if not self.server_host:
            object.__setattr__(self, "server_host", f"http://{self.host}:{self.port}")
        if self.watcher_url and not self.watcher_token:
            raise ValueError("WATCHER_TOKEN must be set when WATCHER_URL is")
        return self

    @property
    def sqlite_path(self) -> str:
        return self.store_url.removeprefix("sqlite:///")


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
            problems.append(f"{name}: {err['msg']}")
        raise ConfigError("invalid setting " + "; ".join(problems)) from None
