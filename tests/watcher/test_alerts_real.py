"""Alerts with real processes: a watcher and a node on loopback, real faults (a channel nobody
consumes, a node frozen with SIGSTOP), read from GET /alerts as a script or probe would."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from watcher_harness import Proc, Processes, node_available, wait_until

pytestmark = pytest.mark.skipif(not node_available(), reason="the node (app/main.py) is missing")

VIEW_TOKEN = "viewer-secret-0123"
AUTH = {"Authorization": f"Bearer {VIEW_TOKEN}"}


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Proc, Proc]]:
    processes = Processes(tmp_path_factory.mktemp("alerts"))
    try:
        watcher = processes.watcher(view_token=VIEW_TOKEN, alert_oldest_ready_s="1")
        yield watcher, processes.node(watcher, "alerting-node", interval_ms=200)
    finally:
        processes.close()


def alerts(watcher: Proc) -> dict[str, Any]:
    r = httpx.get(watcher.base_url + "/alerts", headers=AUTH, timeout=5)
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


def active(watcher: Proc) -> dict[str, dict[str, Any]]:
    return {a["id"]: a for a in alerts(watcher)["alerts"]}


def test_alerts_ask_for_the_viewer_token(pair: tuple[Proc, Proc]) -> None:
    watcher, _ = pair
    for headers in ({}, {"Authorization": "Bearer wrong-token-0123"}):
        r = httpx.get(watcher.base_url + "/alerts", headers=headers, timeout=5)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert r.headers["content-type"] == "application/problem+json"
    assert set(alerts(watcher)) == {"now_ms", "alerts", "cleared"}


def test_a_channel_nobody_consumes_raises_an_alert_that_clears_once_consumed(
    pair: tuple[Proc, Proc],
) -> None:
    watcher, node = pair
    key = "oldest_ready:stuck"
    with httpx.Client(base_url=node.base_url, timeout=5) as http:
        assert http.post("/channels/stuck/enqueue", json={"messages": [{"body": 1}]}).is_success
        wait_until(lambda: key in active(watcher), 10, "the oldest-ready alert")
        alert = active(watcher)[key]
        assert alert["severity"] == "warning" and alert["node"] == "alerting-node"
        assert alert["threshold"] == 1000 and alert["value"] > 1000
        # The consumer comes back: the message is taken and acked.
        (msg,) = http.post("/channels/stuck/dequeue", json={"max": 1}).json()["messages"]
        assert http.post("/channels/stuck/ack", json={"receipts": [msg["receipt"]]}).is_success
    wait_until(lambda: key not in active(watcher), 10, "the alert to clear")
    (cleared,) = [a for a in alerts(watcher)["cleared"] if a["id"] == key]
    assert cleared["ended_ms"] > cleared["started_ms"] == alert["started_ms"]


def test_a_frozen_node_raises_an_alert_that_clears_when_it_thaws(
    pair: tuple[Proc, Proc], tmp_path: Path
) -> None:
    watcher, node = pair
    key = "node_down:alerting-node"
    wait_until(lambda: not active(watcher), 10, "no alert before the fault")
    node.popen.send_signal(signal.SIGSTOP)
    try:
        wait_until(lambda: key in active(watcher), 10, "the node-down alert")
        assert active(watcher)[key]["severity"] == "critical"
    finally:
        node.popen.send_signal(signal.SIGCONT)
    wait_until(lambda: not active(watcher), 10, "every alert to clear")
    assert any(a["id"] == key and a["ended_ms"] for a in alerts(watcher)["cleared"])
