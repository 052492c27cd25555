"""The page shows an alert as a banner and in the list, with its start time, while a real node is
frozen (SIGSTOP), and clears it when the node thaws: headless Chromium, a live watcher and node."""

from __future__ import annotations

import os
import shutil
import signal
from typing import Any

import pytest
from test_browser import CHROMIUM_ARGS, LAUNCH_TIMEOUT_MS, LENIENT_STATUS
from watcher_harness import Processes, node_available

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not node_available(), reason="the node (app/main.py) is missing"),
    pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian's chromium is missing"),
]


def test_the_page_shows_an_alert_appear_and_clear(procs: Processes) -> None:
    sync_api = pytest.importorskip("playwright.sync_api")
    # Lenient statuses: a report late under load must not raise an alert of its own.
    watcher = procs.watcher(**LENIENT_STATUS)
    node = procs.node(watcher, "frozen-node", interval_ms=200)
    problems: list[str] = []

    def on_console(message: Any) -> None:
        if message.type == "error":
            problems.append(f"console: {message.text}")

    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=shutil.which("chromium"), args=CHROMIUM_ARGS, timeout=LAUNCH_TIMEOUT_MS
        )
        try:
            page = browser.new_page()
            page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
            page.on("console", on_console)
            page.goto(watcher.base_url + "/")
            shot = os.environ.get("ALERTS_SCREENSHOT")
            expect = sync_api.expect
            banner = page.locator("#alert-banner")
            expect(page.locator("#nodes tbody tr", has_text="frozen-node")).to_have_count(
                1, timeout=10_000
            )
            expect(banner).to_be_hidden()

            node.popen.send_signal(signal.SIGSTOP)
            try:
                row = page.locator("#alert-list tr[data-alert='node_down:frozen-node']")
                expect(row).to_have_count(1, timeout=10_000)
                expect(banner).to_be_visible()
                # The node, and the shard it owned alone, now without owner: critical both.
                expect(banner).to_contain_text("2 alerts: ")
                expect(page.locator("#alert-list tr[data-kind=shard_unowned]")).to_have_count(1)
                expect(banner).to_have_class("alert-banner sev-critical")
                expect(row.locator(".badge")).to_have_text("critical")
                expect(row).to_contain_text("Node down")
                if shot:  # for a look by eye: ALERTS_SCREENSHOT=/tmp/alerts.png
                    page.screenshot(path=shot)
                started = row.locator("td[data-started]")
                assert int(started.get_attribute("data-started") or 0) > 0
                expect(started).to_have_text(
                    page.evaluate(
                        "t => new Date(t).toLocaleTimeString('en-GB', {hour12: false})",
                        int(started.get_attribute("data-started") or 0),
                    )
                )
            finally:
                node.popen.send_signal(signal.SIGCONT)

            expect(banner).to_be_hidden(timeout=10_000)
            expect(page.locator("#alert-list")).to_contain_text("No alert now.")
            cleared = page.locator("#alert-cleared tr[data-alert='node_down:frozen-node']")
            expect(cleared).to_have_count(1)
        finally:
            browser.close()
    assert problems == []
