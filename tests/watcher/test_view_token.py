"""WATCHER_VIEW_TOKEN: without it a browser sees nothing of the nodes; the token travels as a
WebSocket subprotocol (a header browsers can set, kept out of URLs and logs)."""

from __future__ import annotations

import base64
import json
import shutil
from collections.abc import Iterator
from typing import Any

import pytest
from watcher_harness import Proc, Processes
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from watcher.settings import WatcherConfigError, load_settings

VIEW_TOKEN = "viewer-secret-0123"


def token_protocol(token: str) -> str:
    return "lionmq.token." + base64.urlsafe_b64encode(token.encode()).decode().rstrip("=")


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proc]:
    processes = Processes(tmp_path_factory.mktemp("guarded"))
    try:
        yield processes.watcher(view_token=VIEW_TOKEN)
    finally:
        processes.close()


def feed_url(w: Proc) -> str:
    return w.base_url.replace("http://", "ws://") + "/feed"


@pytest.mark.parametrize(
    "protocols",
    [None, ["lionmq.view"], ["lionmq.view", token_protocol("wrong-token-0123")]],
    ids=["none", "no-token", "wrong-token"],
)
async def test_without_the_viewer_token_the_feed_sends_nothing(
    guarded: Proc, protocols: list[str] | None
) -> None:
    ws = await connect(feed_url(guarded), subprotocols=protocols, proxy=None)  # type: ignore[arg-type]
    with pytest.raises(ConnectionClosed) as closed:
        await ws.recv()  # not one snapshot: the close comes first
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 4401


async def test_with_the_viewer_token_the_feed_streams(guarded: Proc) -> None:
    protocols = ["lionmq.view", token_protocol(VIEW_TOKEN)]
    ws = await connect(feed_url(guarded), subprotocols=protocols, proxy=None)  # type: ignore[arg-type]
    assert ws.subprotocol == "lionmq.view"  # the token is never echoed back
    snapshot = json.loads(await ws.recv())
    assert isinstance(snapshot, dict)
    await ws.close()


async def test_without_a_viewer_token_set_the_page_still_connects(procs: Processes) -> None:
    open_watcher = procs.watcher()
    ws = await connect(feed_url(open_watcher), subprotocols=["lionmq.view"], proxy=None)  # type: ignore[list-item]
    assert ws.subprotocol == "lionmq.view"
    assert isinstance(json.loads(await ws.recv()), dict)
    await ws.close()


def test_a_short_viewer_token_is_refused() -> None:
    with pytest.raises(WatcherConfigError, match="WATCHER_VIEW_TOKEN"):
        load_settings(_env_file=None, token="t" * 8, view_token="short")


@pytest.mark.browser
@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian's chromium is missing")
def test_the_page_takes_the_token_from_its_fragment_or_asks(guarded: Proc) -> None:
    sync_api = pytest.importorskip("playwright.sync_api")
    asked: list[str] = []

    def answer(dialog: Any) -> None:
        asked.append(dialog.message)
        dialog.accept(VIEW_TOKEN)

    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=shutil.which("chromium"), args=["--no-sandbox"]
        )
        try:
            page = browser.new_page()
            page.goto(guarded.base_url + "/#token=" + VIEW_TOKEN)
            sync_api.expect(page.locator("#conn")).to_have_text("Live", timeout=10_000)
            assert "token" not in page.url and not asked  # the fragment is wiped from the bar
            page = browser.new_context().new_page()  # a fresh tab: no token kept
            page.on("dialog", answer)
            page.goto(guarded.base_url + "/")
            sync_api.expect(page.locator("#conn")).to_have_text("Live", timeout=10_000)
            assert len(asked) == 1 and "WATCHER_VIEW_TOKEN" in asked[0]
        finally:
            browser.close()
