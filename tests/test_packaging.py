"""What is checked by reading: the compose file, .env.example, and start-up errors."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml

from app.settings import Settings
from tests.conftest import free_port, wait_until

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


def test_compose_requires_the_api_token_and_publishes_on_loopback() -> None:
    services = compose()
    node_env = services["node"]["environment"]
    assert isinstance(node_env, dict)
    assert str(node_env["API_TOKEN"]).startswith("${API_TOKEN:?")
    for name in ("node", "watcher"):
        ports = services[name]["ports"]
        assert isinstance(ports, list)
        assert all(str(p).startswith("${BIND_ADDRESS:-127.0.0.1}:") for p in ports), ports


def docker_compose_config(tmp_path: Path, **variables: str) -> subprocess.CompletedProcess[str]:
    """`docker-compose config` on a sample env file (never the developer's .env)."""
    env_file = tmp_path / "sample.env"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in variables.items()))
    return subprocess.run(
        ["docker-compose", "--env-file", str(env_file), "-f", "docker-compose.yml", "config"],
        cwd=ROOT,
        env={"PATH": os.environ["PATH"], "HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose not installed")
def test_docker_compose_validates_the_file(tmp_path: Path) -> None:
    tokens = {"API_TOKEN": "api-token-0123", "WATCHER_TOKEN": "watcher-token-0123"}
    run = docker_compose_config(tmp_path, **tokens)
    assert run.returncode == 0, run.stderr
    config = yaml.safe_load(run.stdout)
    published = [p for s in config["services"].values() for p in s.get("ports", [])]
    assert published and all(str(p).startswith("127.0.0.1:") for p in published), published
    assert config["services"]["node"]["environment"]["API_TOKEN"] == "api-token-0123"
    opened = docker_compose_config(tmp_path, BIND_ADDRESS="0.0.0.0", **tokens)
    assert opened.returncode == 0 and "0.0.0.0:8000:8000" in opened.stdout
    no_token = docker_compose_config(tmp_path, WATCHER_TOKEN="watcher-token-0123")
    assert no_token.returncode != 0 and "set API_TOKEN" in no_token.stderr
