"""What is checked by reading: the compose file, .env.example, and start-up errors."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import yaml

from app.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
NODE_SETTINGS = {name.upper() for name in Settings.model_fields}


def watcher_settings() -> set[str]:
    from watcher.settings import WatcherSettings

    prefix = WatcherSettings.model_config.get("env_prefix", "")
    return {(prefix + name).upper() for name in WatcherSettings.model_fields}


def compose() -> dict[str, dict[str, object]]:
    data = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services: dict[str, dict[str, object]] = data["services"]
    return services


def test_compose_sets_only_real_settings() -> None:
    services = compose()
    known = {"node": NODE_SETTINGS, "watcher": watcher_settings()}
    for name, service in services.items():
        build = service.get("build")
        if not isinstance(build, dict):
            continue  # a stock image, such as mongo
        target = build["target"]
        env = service.get("environment", {})
        assert isinstance(env, dict)
        unknown = set(env) - known[target]
        assert not unknown, f"service {name} sets {unknown}, which are not {target} settings"


def test_compose_node_uses_mongodb_with_a_named_volume() -> None:
    services = compose()
    env = services["node"]["environment"]
    assert isinstance(env, dict)
    assert str(env["STORE_URL"]).startswith("mongodb://mongo:27017/")
    volumes = services["mongo"]["volumes"]
    assert isinstance(volumes, list)
    assert any(str(v).startswith("mongo-data:") for v in volumes)


def test_env_example_lists_every_setting_with_a_comment() -> None:
    text = (ROOT / ".env.example").read_text()
    listed = set(re.findall(r"^#?\s*([A-Z][A-Z0-9_]+)=", text, re.MULTILINE))
    assert NODE_SETTINGS | watcher_settings() <= listed, (
        NODE_SETTINGS | watcher_settings()
    ) - listed
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
