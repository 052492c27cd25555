"""`/feed`: the browsers' WebSocket. The full picture at once, then every update.

Browsers only listen: whatever they send is read and thrown away. A page from another origin is
refused (unless listed in WATCHER_ALLOWED_ORIGINS; the watcher's own page counts as its own only
under a loopback name or WATCHER_HOST), and so is a page beyond WATCHER_MAX_BROWSERS.
With WATCHER_VIEW_TOKEN set, a browser must also offer it, base64url-encoded, as the WebSocket
subprotocol `lionmq.token.<token>` next to `lionmq.view` (the one the watcher selects): a header
browsers can set and servers do not log, unlike a query string. Without it the feed closes at
once with UNAUTHORIZED, before anything is sent, and the page asks for the token.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hmac
import logging
from urllib.parse import urlsplit

from fastapi import APIRouter, WebSocket

from app.settings import host_name
from watcher.hub import Browser, Hub

log = logging.getLogger("watcher.feed")
router = APIRouter()

POLICY_VIOLATION = 1008
TRY_AGAIN_LATER = 1013
UNAUTHORIZED = 4401  # the viewer token is missing or wrong

VIEW_PROTOCOL = "lionmq.view"
TOKEN_PROTOCOL = "lionmq.token."


# The names the watcher's own page is reached by without WATCHER_ALLOWED_ORIGINS.
LOOPBACK_NAMES = frozenset({"127.0.0.1", "localhost", "[::1]"})


def origin_ok(
    origin: str | None, host: str | None, allowed: frozenset[str], own_names: frozenset[str]
) -> bool:
    """Non-browser clients send no Origin; a browser page must be allowed, or be the watcher's
    own page under one of `own_names`. A page that merely matches the Host is not enough: after
    DNS rebinding, an attacker's page at evil.example (re-resolved to this machine) asks with
    `Host: evil.example` and reads the feed."""
    if origin is None:
        return True
    origin = origin.rstrip("/")
    if origin in allowed:
        return True
    return host is not None and urlsplit(origin).netloc == host and host_name(host) in own_names


def view_token_ok(subprotocols: list[str], expected: str) -> bool:
    """Constant-time check of the token offered as a subprotocol (always true without one)."""
    if not expected:
        return True
    for offered in subprotocols:
        if offered.startswith(TOKEN_PROTOCOL):
            encoded = offered[len(TOKEN_PROTOCOL) :]
            try:
                given = base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4))
            except (binascii.Error, ValueError):
                return False
            return hmac.compare_digest(given, expected.encode())
    return False


@router.websocket("/feed")
async def feed(ws: WebSocket) -> None:
    hub: Hub = ws.app.state.hub
    settings = hub.settings
    own_names = LOOPBACK_NAMES | {host_name(settings.host)}
    if not origin_ok(ws.headers.get("origin"), ws.headers.get("host"), settings.origins, own_names):
        await ws.close(code=POLICY_VIOLATION)
        return
    offered: list[str] = ws.scope.get("subprotocols", [])
    subprotocol = VIEW_PROTOCOL if VIEW_PROTOCOL in offered else None
    if not view_token_ok(offered, settings.view_token):
        # Accepted only to close with a code the page can read (a refused handshake is 1006).
        await ws.accept(subprotocol)
        await ws.close(code=UNAUTHORIZED, reason="viewer token required")
        return
    if len(hub.browsers) >= settings.max_browsers:
        await ws.close(code=TRY_AGAIN_LATER)
        return
    await ws.accept(subprotocol)
    browser = hub.add_browser()
    sender = asyncio.create_task(_send(ws, browser, settings.send_timeout_ms / 1000))
    try:
        while not sender.done():
            receiving = asyncio.ensure_future(ws.receive())
            await asyncio.wait({receiving, sender}, return_when=asyncio.FIRST_COMPLETED)
            if not receiving.done():
                receiving.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await receiving
                break
            if receiving.result()["type"] == "websocket.disconnect":
                break
            # Anything else a browser sends is ignored.
    finally:
        hub.remove_browser(browser)
        sender.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await sender


async def _send(ws: WebSocket, browser: Browser, timeout_s: float) -> None:
    """Drain this browser's outbox; a browser that stops reading is closed."""
    try:
        while True:
            await browser.ready.wait()
            while browser.outbox:
                data = browser.outbox.popleft()
                await asyncio.wait_for(ws.send_text(data), timeout_s)
            browser.ready.clear()
    except Exception as exc:
        log.info("dropping a browser: %s", exc.__class__.__name__)
        with contextlib.suppress(Exception):
            await ws.close()
