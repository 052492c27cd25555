"""`/ingest`: the WebSocket nodes push snapshots to.

The token is checked before the handshake is accepted (a refused client gets HTTP 403). Each frame
is size-checked, rate-limited, decoded and validated before it touches the state; a bad frame is
dropped and counted, and a connection that keeps sending bad frames is closed. A connection
reports for one node only (the first it names), so it cannot overwrite another node's data.
Nothing received here is ever sent to anyone.
"""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import Mapping
from typing import Any

import msgspec
from fastapi import APIRouter, WebSocket

from watcher.hub import Hub
from watcher.schema import ClusterView, cluster_decoder, decoder

log = logging.getLogger("watcher.ingest")
router = APIRouter()

POLICY_VIOLATION = 1008


def token_ok(authorization: str | None, expected: str) -> bool:
    """Constant-time check of an `Authorization: Bearer <token>` header."""
    scheme, _, provided = (authorization or "").partition(" ")
    if scheme.lower() != "bearer":
        provided = ""
    return hmac.compare_digest(provided.strip().encode(), expected.encode())


class TokenBucket:
    """Allows `rate` frames a second on average, bursts up to `burst`."""

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.at = now

    def take(self, now: float) -> bool:
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


@router.websocket("/ingest")
async def ingest(ws: WebSocket) -> None:
    hub: Hub = ws.app.state.hub
    settings = hub.settings
    counters = hub.state.counters
    if not token_ok(ws.headers.get("authorization"), settings.token):
        counters.refused += 1
        log.warning("refused an ingest connection from %s: bad token", ws.client)
        await ws.close(code=POLICY_VIOLATION)
        return
    await ws.accept()
    counters.connections += 1
    connection = next(hub.connection_ids)
    bucket = TokenBucket(settings.max_frames_per_s, 2 * settings.max_frames_per_s, time.monotonic())
    node_id: str | None = None
    dropped = 0
    try:
        while True:
            message = await ws.receive()
            if message["type"] == "websocket.disconnect":
                break
            kept: str | None = None
            if bucket.take(time.monotonic()):
                kept = _take(hub, message, connection, node_id)
            else:
                counters.rate_limited += 1
            if kept is not None:
                node_id = node_id or kept
                continue
            dropped += 1
            if dropped >= settings.flood_close_after:
                counters.closed_for_flood += 1
                log.warning("closed ingest connection from %s: too many bad frames", ws.client)
                await ws.close(code=POLICY_VIOLATION, reason="too many bad frames")
                break
    finally:
        if node_id is not None:
            hub.node_disconnected(node_id, connection)


def _take(hub: Hub, message: Mapping[str, Any], connection: int, bound: str | None) -> str | None:
    """Apply one frame; returns the frame's node id when kept, None when dropped."""
    counters = hub.state.counters
    raw = message.get("bytes")
    if raw is None:
        text = message.get("text")
        raw = text.encode() if isinstance(text, str) else b""
    if not isinstance(raw, bytes):  # pragma: no cover - ASGI always gives bytes or str
        counters.malformed += 1
        return None
    if len(raw) > hub.settings.max_frame_bytes:
        counters.oversized += 1
        return None
    try:
        snap = decoder.decode(raw)
    except msgspec.ValidationError:
        counters.invalid += 1
        return None
    # msgspec raises UnicodeDecodeError for bad UTF-8, and RecursionError for JSON nested
    # past Python's recursion limit (in a field the schema does not know, skipped but walked).
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
        counters.malformed += 1
        return None
    names = {ch.name for ch in snap.channels}
    listed = len(snap.channels)
    if (
        len(names) != listed
        or listed > hub.settings.max_channels
        or (snap.v >= 2 and snap.channels_total < listed)
    ):
        counters.invalid += 1
        return None
    if bound is not None and snap.node_id != bound:
        counters.wrong_node += 1
        return None
    view: ClusterView | None = None
    try:
        view = cluster_decoder.decode(snap.cluster)
    except (msgspec.ValidationError, msgspec.DecodeError, RecursionError):
        counters.invalid_cluster += 1
    kept = hub.state.accept(snap, hub.clock(), connection)
    if kept is None:
        return None
    hub.node_updated(*kept, view)
    return snap.node_id
