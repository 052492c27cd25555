"""`python -m watcher` as an operator runs it, and the real pusher reconnecting to it."""

from __future__ import annotations

import signal
import subprocess
import sys

from watcher_harness import Processes, child_env, free_port, open_feed


def test_a_bad_setting_is_one_clear_line(procs: Processes) -> None:
    for env, name in [
        ({}, "WATCHER_TOKEN"),
        ({"WATCHER_TOKEN": "x" * 20, "WATCHER_PORT": "x"}, "WATCHER_PORT"),
    ]:
        done = subprocess.run(
            [sys.executable, "-m", "watcher"],
            cwd=procs.tmp,
            env=child_env(env),
            capture_output=True,
            text=True,
            timeout=20,
        )
        assert done.returncode == 2
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and name in lines[0] and "Traceback" not in done.stderr, done.stderr


async def test_a_node_reconnects_when_the_watcher_comes_and_goes(procs: Processes) -> None:
    port = free_port()
    # The node starts first, and keeps trying with backoff until a watcher listens.
    fake = procs.fake_node(f"http://127.0.0.1:{port}", "phoenix")
    watcher = procs.watcher(port=port)
    feed = await open_feed(watcher.base_url)
    await feed.until(lambda f: f.nodes.get("phoenix", {}).get("status") == "up", 10, "phoenix")

    watcher.stop(signal.SIGKILL)
    again = procs.watcher(name="watcher-again", port=port)
    feed = await open_feed(again.base_url)
    await feed.until(lambda f: f.nodes.get("phoenix", {}).get("status") == "up", 15, "reconnect")
    assert fake.alive()
    await feed.ws.close()
