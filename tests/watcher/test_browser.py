"""The page in a real headless Chromium, against a live watcher fed by a live node."""

from __future__ import annotations

import json
import shutil
import signal
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from cluster_views import IDS, LEASE, A, B, C, cluster_doc, write_view
from watcher_harness import TOKEN, Processes, node_available
from websockets.sync.client import connect

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not node_available(), reason="the node (app/main.py) is missing"),
    pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian's chromium is missing"),
]

CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    # A container's /dev/shm is often 64 MiB: too small for a full-page screenshot.
    "--disable-dev-shm-usage",
]
LAUNCH_TIMEOUT_MS = 90_000  # a cold Chromium on a loaded 2-core machine
# The page must see the node "up" while the machine is loaded: a report may come late by a few
# of its 250 ms intervals without the node counting as suspect (2 s) or down (3 s).
LENIENT_STATUS = {"suspect_after_intervals": "8", "down_after_intervals": "12"}
# Leases the page must still show as in flight however slowly the browser starts (the default
# of 30 s ran out before the last check on a loaded machine): 12 hours.
LONG_LEASE_MS = 43_200_000
HOSTILE_NODE = "<img/src=x/onerror=alert(1)>"  # a NODE_ID a node accepts (no spaces)
HOSTILE_CHANNEL = "<script>alert(2)</script>"


def test_the_page_shows_the_node_its_channels_and_charts(procs: Processes, tmp_path: Path) -> None:
    sync_api = pytest.importorskip("playwright.sync_api")
    watcher = procs.watcher(**LENIENT_STATUS)
    node = procs.node(watcher, HOSTILE_NODE, interval_ms=250)
    with httpx.Client(base_url=node.base_url, timeout=5) as http:
        orders = {"messages": [{"body": {"n": i}} for i in range(5)]}
        bulk = {"messages": [{"body": {"n": i}} for i in range(20)]}
        assert http.post("/channels/orders/enqueue", json=orders).status_code == 201
        assert http.post("/channels/bulk/enqueue", json=bulk).status_code == 201
        lease = {"max": 2, "visibility_ms": LONG_LEASE_MS}
        taken = http.post("/channels/orders/dequeue", json=lease).json()["messages"]
        assert len(taken) == 2
    # A second reporter whose channel name is hostile too (a node would refuse such a channel,
    # but the page must not trust what arrives).
    ingest_url = watcher.base_url.replace("http://", "ws://") + "/ingest"
    with connect(
        ingest_url, additional_headers={"Authorization": f"Bearer {TOKEN}"}, proxy=None
    ) as hostile:
        hostile.send(
            json.dumps(
                {
                    "type": "snapshot",
                    "node_id": "side-node",
                    "interval_ms": 60_000,
                    "channels": [
                        {"name": HOSTILE_CHANNEL, "ready": 1, "delayed": 0, "in_flight": 0}
                    ],
                }
            )
        )

    dialogs: list[str] = []
    problems: list[str] = []

    def on_dialog(dialog: Any) -> None:
        dialogs.append(dialog.message)
        dialog.dismiss()

    def on_console(message: Any) -> None:
        if message.type == "error":
            problems.append(f"console: {message.text}")

    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=shutil.which("chromium"), args=CHROMIUM_ARGS, timeout=LAUNCH_TIMEOUT_MS
        )
        try:
            page = browser.new_page(viewport={"width": 1440, "height": 1150})
            page.on("dialog", on_dialog)
            page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
            page.on("console", on_console)
            page.goto(watcher.base_url + "/")
            expect = sync_api.expect

            # The nodes table: the hostile id shows as text, with the node's facts.
            row = page.locator("#nodes tbody tr", has_text=HOSTILE_NODE)
            expect(row).to_have_count(1, timeout=10_000)
            expect(row.locator("td").nth(0)).to_have_text(HOSTILE_NODE)
            expect(row).to_contain_text(node.base_url)
            expect(row).to_contain_text("standalone")
            expect(row.locator(".badge")).to_have_text("up")
            expect(row).to_contain_text("sqlite")
            expect(row).to_contain_text("MiB")

            # The channels table, sorted by depth: bulk (20) above orders (3 ready + 2 in flight).
            rows = page.locator("#channels tbody tr")
            expect(rows.nth(0)).to_contain_text("bulk", timeout=5_000)
            orders_row = page.locator("#channels tbody tr", has_text="orders")
            expect(orders_row.locator("td").nth(2)).to_have_text("3")  # ready
            expect(orders_row.locator("td").nth(4)).to_have_text("2")  # in flight
            expect(orders_row.locator("td").nth(5)).to_have_text("5")  # total
            hostile_row = page.locator("#channels tbody tr", has_text=HOSTILE_CHANNEL)
            expect(hostile_row.locator("td").nth(0)).to_have_text(HOSTILE_CHANNEL)
            page.locator("#channels th[data-sort=depth]").click()  # ascending now
            expect(rows.nth(0)).to_contain_text(HOSTILE_CHANNEL)
            page.locator("#channels th[data-sort=depth]").click()

            # Focus the charts on the node, then on its channel `orders`.
            row.click()
            expect(page.locator("#focus-label")).to_contain_text(HOSTILE_NODE)
            depth = page.locator("#chart-depth")
            expect(depth.locator(".legend-item[data-series=Ready] .legend-value")).to_have_text(
                "23", timeout=5_000
            )
            orders_row.click()
            expect(page.locator("#focus-label")).to_contain_text("orders")
            expect(depth.locator(".legend-item[data-series=Ready] .legend-value")).to_have_text("3")
            expect(
                depth.locator(".legend-item[data-series='In flight'] .legend-value")
            ).to_have_text("2")
            page.wait_for_function(
                "document.querySelector('#chart-depth canvas').dataset.points >= 6", timeout=5_000
            )
            blue = page.evaluate(
                """() => {
                    const c = document.querySelector('#chart-depth canvas');
                    const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
                    let n = 0;
                    for (let i = 0; i < d.length; i += 4)
                        if (d[i] < 80 && d[i + 1] > 80 && d[i + 1] < 130 && d[i + 2] > 200) n++;
                    return n;
                }"""
            )
            assert blue > 20, "the Ready line is drawn"
            for chart in ("rates", "delay", "cpu", "mem"):
                points = page.locator(f"#chart-{chart} canvas").get_attribute("data-points")
                assert points is not None and int(points) > 0, chart
            expect(page.locator("#chart-mem .legend-value").first).to_contain_text("MiB")

            page.locator("#focus-all").click()
            expect(page.locator("#focus-label")).to_contain_text("all nodes")
            page.locator("[data-range='60000']").click()
            page.screenshot(path=str(tmp_path / "watcher.png"), full_page=True)

            # Kill the node: the page shows it down, without a reload.
            node.stop(signal.SIGKILL)
            expect(row.locator(".badge")).to_have_text("down", timeout=10_000)
            page.screenshot(path=str(tmp_path / "watcher-down.png"), full_page=True)

            assert page.locator("img").count() == 0
            assert page.locator("#nodes script, #channels script").count() == 0
        finally:
            browser.close()
    assert dialogs == [], "no script from a node ran"
    assert problems == []
    assert (tmp_path / "watcher.png").stat().st_size > 10_000


def test_the_page_shows_the_cluster_and_a_failover(procs: Processes, tmp_path: Path) -> None:
    """Three real pushers report a 2-shard cluster; the primary of s1 is killed and its backup
    takes s1 over: the page shows the primary failed and the failover in the timeline."""
    sync_api = pytest.importorskip("playwright.sync_api")
    watcher = procs.watcher(**LENIENT_STATUS)
    healthy = {"s1": (A, 1, LEASE), "s2": (C, 1, LEASE)}
    views = {}
    nodes = {}
    for url in (A, B, C):
        views[url] = tmp_path / f"{IDS[url]}.json"
        write_view(views[url], cluster_doc(url, healthy, lag={B: {"s1": 3}}))
        nodes[url] = procs.fake_node(watcher.base_url, IDS[url], 200, url, views[url])
    problems: list[str] = []
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=shutil.which("chromium"), args=CHROMIUM_ARGS, timeout=LAUNCH_TIMEOUT_MS
        )
        try:
            page = browser.new_page(viewport={"width": 1440, "height": 1150})
            page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
            page.on(
                "console",
                lambda m: problems.append(f"console: {m.text}") if m.type == "error" else None,
            )
            page.goto(watcher.base_url + "/")
            expect = sync_api.expect
            # Every pusher reports (its row in the nodes table), the cluster panel shows them.
            expect(page.locator("#nodes tbody tr")).to_have_count(3, timeout=20_000)
            expect(page.locator("#cluster")).to_be_visible()
            card_a = page.locator(f".ncard[data-url='{A}']")
            card_b = page.locator(f".ncard[data-url='{B}']")
            expect(card_a.locator(".badge")).to_have_text("up")
            expect(card_a).to_contain_text("primary")
            expect(card_a.locator(".owns")).to_have_text("s1 (epoch 1)")
            expect(card_b).to_contain_text("backup")
            expect(card_b.locator(".lag")).to_have_text("s1: 3 beats")
            s1 = page.locator("#shards tbody tr[data-shard=s1]")
            expect(s1).to_contain_text("node-a")
            expect(page.locator("#shards tbody tr[data-shard=s2] td").nth(5)).to_have_text("20")
            expect(page.locator("#timeline tbody")).to_contain_text("No owner change seen yet.")

            nodes[A].stop(signal.SIGKILL)
            taken = {"s1": (B, 2, LEASE), "s2": (C, 1, LEASE)}
            for url in (B, C):
                write_view(views[url], cluster_doc(url, taken, down=frozenset({A})))
            event = page.locator("#timeline tbody tr[data-shard=s1]")
            expect(event).to_have_count(1, timeout=15_000)
            expect(event.locator("td").nth(2)).to_have_text("failover")
            expect(event.locator("td").nth(3)).to_contain_text("node-a")
            expect(event.locator("td").nth(4)).to_contain_text("node-b")
            expect(event.locator("td").nth(5)).to_have_text("2")
            expect(event.locator(".gap")).to_contain_text("s")  # a duration, "850 ms" or "2.10 s"
            expect(card_a.locator(".badge")).to_have_text("failed", timeout=15_000)
            expect(card_a.locator(".owns")).to_have_text("\u2013")  # a dash: owns nothing
            expect(s1).to_contain_text("node-b")
            expect(s1.locator("td").nth(2)).to_have_text("2")
            expect(card_b.locator(".owns")).to_have_text("s1 (epoch 2)")
            page.screenshot(path=str(tmp_path / "watcher-failover.png"), full_page=True)
        finally:
            browser.close()
    assert problems == []


def test_the_api_docs_render_with_nothing_from_another_host(procs: Processes) -> None:
    """`/docs` on a machine without internet: every request of the page goes to the node."""
    sync_api = pytest.importorskip("playwright.sync_api")
    node = procs.node(None, "docs-node")
    origin = urlsplit(node.base_url).netloc
    elsewhere: list[str] = []
    problems: list[str] = []

    def only_the_node(route: Any) -> None:
        if urlsplit(route.request.url).netloc == origin:
            route.continue_()
        else:  # as offline: nothing else answers
            elsewhere.append(route.request.url)
            route.abort()

    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=shutil.which("chromium"), args=CHROMIUM_ARGS, timeout=LAUNCH_TIMEOUT_MS
        )
        try:
            page = browser.new_page()
            page.route("**/*", only_the_node)
            page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
            page.on(
                "console",
                lambda m: problems.append(f"console: {m.text}") if m.type == "error" else None,
            )
            page.goto(node.base_url + "/docs")
            expect = sync_api.expect
            expect(page.locator(".swagger-ui .info .title")).to_contain_text(
                "LionMQ node", timeout=20_000
            )
            expect(page.locator(".opblock-summary-path", has_text="/enqueue")).to_have_count(1)
            assert page.locator(".opblock").count() >= 12
        finally:
            browser.close()
    assert elsewhere == []
    assert problems == []
