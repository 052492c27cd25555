"""The watcher's settings, read from `WATCHER_*` environment variables (and `.env`)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class WatcherSettings(BaseSettings):
    # An empty value means "not set", as in a copied .env.example.
    model_config = SettingsConfigDict(
        env_prefix="WATCHER_", env_file=".env", env_ignore_empty=True, extra="ignore", frozen=True
    )

    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)] = 8080
    # The secret every node presents on /ingest (the nodes' WATCHER_TOKEN).
    token: Annotated[str, Field(min_length=8)]
    # The secret a browser needs to watch (the page asks for it, or reads #token=... from its
    # URL). Empty: anyone who can reach the watcher sees the nodes and channels.
    view_token: str = ""
    # How much history is kept per node, and at what resolution.
    history_s: Annotated[int, Field(ge=10, le=24 * 3600)] = 15 * 60
    history_step_ms: Annotated[int, Field(ge=100, le=60_000)] = 1000
    # A node is suspect, then down, after this many of its own report intervals without a report.
    suspect_after_intervals: Annotated[float, Field(gt=1.0, le=100.0)] = 2.0
    down_after_intervals: Annotated[float, Field(gt=1.0, le=100.0)] = 3.0
    # A node that has been down this long is forgotten (0: never).
    forget_after_s: Annotated[int, Field(ge=0)] = 15 * 60
    # Ingest limits: frame size, per-connection rate, how many nodes and channels are tracked.
    max_frame_bytes: Annotated[int, Field(ge=1024, le=16 * 1024 * 1024)] = 512 * 1024
    max_frames_per_s: Annotated[float, Field(gt=0.0, le=10_000.0)] = 20.0
    flood_close_after: Annotated[int, Field(ge=1)] = 200
    max_nodes: Annotated[int, Field(ge=1, le=100_000)] = 256
    # Channels one snapshot may list (a node with more lists its deepest and busiest, and counts
    # the rest in its totals).
    max_channels: Annotated[int, Field(ge=1, le=100_000)] = 1000
    # Browser feed: how many browsers at once, and which page origins may open it
    # (empty: only the watcher's own page).
    max_browsers: Annotated[int, Field(ge=1, le=10_000)] = 64
    allowed_origins: str = ""
    # Ownership changes (failovers, hand-offs) the cluster timeline keeps, newest first.
    timeline_events: Annotated[int, Field(ge=1, le=10_000)] = 100
    send_timeout_ms: Annotated[int, Field(ge=100, le=60_000)] = 5000
    # Alerts (see watcher/alerts.py). A node down or suspect and a shard without an owner need
    # no threshold: they follow the statuses above and the nodes' cluster views. The
    # descriptions are also `python -m watcher --help`'s.
    alert_backup_lag_beats: Annotated[
        int,
        Field(ge=1, le=1_000_000, description="a backup more than this many heartbeats behind"),
    ] = 5
    alert_dead_letter_growth: Annotated[
        int,
        Field(
            ge=1,
            description="a dead-letter channel (<name>.dlq) that gained at least this many ready "
            "messages within the window",
        ),
    ] = 1
    alert_dead_letter_window_s: Annotated[
        int,
        Field(
            ge=1,
            le=24 * 3600,
            description="the window, in seconds (at most WATCHER_HISTORY_S: the watcher compares "
            "with the history it keeps)",
        ),
    ] = 600
    alert_oldest_ready_s: Annotated[
        float,
        Field(
            ge=0.0,
            le=30 * 24 * 3600.0,
            description="a channel whose oldest ready message waits longer than this many "
            "seconds: consumers stuck or gone (0: off)",
        ),
    ] = 300.0
    alert_memory_bytes: Annotated[
        int,
        Field(ge=0, description="a node whose resident memory (RSS) is above this (0: off)"),
    ] = 1024**3
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    @field_validator("token")
    @classmethod
    def _no_blank_token(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be blank")
        return value

    @field_validator("view_token")
    @classmethod
    def _long_view_token(cls, value: str) -> str:
        if value and len(value.strip()) < 8:
            raise ValueError("must be 8 characters or more (or empty: no viewer token)")
        return value

    @model_validator(mode="after")
    def _suspect_before_down(self) -> WatcherSettings:
        if self.suspect_after_intervals >= self.down_after_intervals:
            raise ValueError(
                "WATCHER_SUSPECT_AFTER_INTERVALS must be below WATCHER_DOWN_AFTER_INTERVALS"
            )
        return self

    @property
    def origins(self) -> frozenset[str]:
        return frozenset(
            o.strip().rstrip("/") for o in self.allowed_origins.split(",") if o.strip()
        )


class WatcherConfigError(Exception):
    """A setting is wrong; the message names it in one line."""


def load_settings(**overrides: object) -> WatcherSettings:
    try:
        return WatcherSettings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            loc = "_".join(str(part) for part in err["loc"]).upper()
            name = f"WATCHER_{loc}" if loc else "settings"
            problems.append(f"{name}: {err['msg']}")
        raise WatcherConfigError("invalid setting " + "; ".join(problems)) from None
