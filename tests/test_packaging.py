"""What is checked by reading: .env.example and start-up errors (compose files: test_compose.py)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from app.settings import Settings
from tests.conftest import free_port, wait_until

ROOT = Path(__file__).resolve().parent.parent
NODE_SETTINGS = {name.upper() for name in Settings.model_fields}


def watcher_settings() -> set[str]:
    from watcher.settings import WatcherSettings

    prefix = WatcherSettings.model_config.get("env_prefix", "")
    return {(prefix + name).upper() for name in WatcherSettings.model_fields}


def test_env_example_lists_every_setting_with_a_comment() -> None:
    text = (ROOT / ".env.example").read_text()
    listed = set(re.findall(r"^#?\s*([A-Z][A-Z0-9_]+)=", text, re.MULTILINE))
    known = NODE_SETTINGS | watcher_settings()
    assert known <= listed, f"missing from .env.example: {known - listed}"
    assert listed <= known, f".env.example lists what no program reads: {listed - known}"
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if re.match(r"^#?\s*[A-Z][A-Z0-9_]+=", line):
            assert i > 0 and lines[i - 1].startswith("#"), f"no comment above {line!r}"


def test_bad_setting_stops_the_node_with_one_clear_line(tmp_path: Path) -> None:
    env = {**os.environ, "PORT": "eighty", "STORE_URL": f"sqlite:///{tmp_path}/x.db"}
    run = subprocess.run(
        [sys.executable, "-m", "app"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert run.returncode == 2
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and "PORT" in lines[0] and "Traceback" not in run.stderr


def test_unknown_store_url_is_refused(tmp_path: Path) -> None:
    env = {**os.environ, "STORE_URL": "postgres://x/y"}
    run = subprocess.run(
        [sys.executable, "-m", "app"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert run.returncode == 2 and "STORE_URL" in run.stderr


def blank_env_file(tmp_path: Path) -> Path:
    """.env.example with every value emptied, as a user who clears what they do not need."""
    text = (ROOT / ".env.example").read_text()
    path = tmp_path / ".env"
    path.write_text(re.sub(r"^([A-Z][A-Z0-9_]+)=.*$", r"\1=", text, flags=re.MULTILINE))
    return path


def test_an_empty_value_means_the_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from watcher.settings import WatcherSettings

    for name in NODE_SETTINGS | watcher_settings():
        monkeypatch.delenv(name, raising=False)
    env_file = blank_env_file(tmp_path)
    node = Settings(_env_file=env_file)  # type: ignore[call-arg]
    assert node == Settings(_env_file=None, node_id=node.node_id)  # type: ignore[call-arg]
    watcher = WatcherSettings(_env_file=env_file, token="t" * 8)  # type: ignore[call-arg]
    assert watcher == WatcherSettings(_env_file=None, token="t" * 8)  # type: ignore[call-arg]


def test_a_copied_env_example_starts_the_node(tmp_path: Path) -> None:
    shutil.copy(ROOT / ".env.example", tmp_path / ".env")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in NODE_SETTINGS}
    env |= {"PORT": str(port), "PYTHONPATH": str(ROOT)}
    log = tmp_path / "node.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "app"], cwd=tmp_path, env=env, stdout=out, stderr=out
        )

    def ready() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"the node exited with {proc.returncode}: {log.read_text()}")
        try:
            return httpx.get(f"http://127.0.0.1:{port}/ready", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_until(ready, 20, "a node started on a copy of .env.example")
        assert (tmp_path / "data" / "lionmq.db").exists()  # .env's STORE_URL, relative to cwd
    finally:
        proc.kill()
        proc.wait(timeout=10)
