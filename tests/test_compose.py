"""The compose files, checked without a Docker engine: `docker-compose config` (Debian's 1.29,
installed by `make test-deps`) resolves every file with every env example as README tells an
operator to run it, and the resolved services are read back: each variable a service sets is a
setting its program reads (and a valid value of it), every secret is required, ports are
published on loopback unless BIND_ADDRESS says otherwise, and the hosts of each multi-host
layout agree with each other (one topology, one replica set, every URL it names served).

The `config` runs are started together once per module (about a second each on 2 cores)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from app.cluster.init import parse_cluster_init
from app.settings import Settings
from tests.conftest import ROOT
from watcher.settings import WatcherSettings

SECRETS = ("API_TOKEN", "CLUSTER_SECRET", "ADMIN_TOKEN", "WATCHER_TOKEN")
# Test values for the secrets the examples leave empty (an operator generates their own).
FILLED = {name: f"{name.lower().replace('_', '-')}-0123456789" for name in SECRETS} | {
    "WATCHER_VIEW_TOKEN": "watcher-view-token-0123"
}
NODE_SETTINGS = {name.upper() for name in Settings.model_fields}
WATCHER_PREFIX = WatcherSettings.model_config.get("env_prefix", "")
WATCHER_SETTINGS = {(WATCHER_PREFIX + name).upper() for name in WatcherSettings.model_fields}
REPLICA_SET_JS = ROOT / "deploy" / "mongo" / "replica-set.js"
# Variables of the compose files that are no setting: where ports are published, the second
# node of a host (its NODE_ID and SERVER_HOST), and the MongoDB member's replica-set script's.
COMPOSE_ONLY = {"BIND_ADDRESS", "NODE_ID_B", "SERVER_HOST_B", "MONGO_MEMBERS", "MONGO_INITIATE"}
EXAMPLES = sorted((ROOT / "deploy" / "hosts").rglob("*.env.example"))
ROOT_COMPOSE = ["docker-compose.yml"]
ALL_ROLES = ["deploy/compose/mongo.yml", "deploy/compose/node.yml", "deploy/compose/watcher.yml"]


@dataclass(frozen=True)
class Run:
    files: tuple[str, ...]
    env_file: Path | None
    environ: tuple[tuple[str, str], ...]


def compose_files(example: Path) -> list[str]:
    """The compose files the example's own `docker-compose ... up -d` line names."""
    (line,) = [ln for ln in example.read_text().splitlines() if "docker-compose" in ln]
    files = re.findall(r"-f (\S+)", line)
    assert files, f"{example.name}: no -f in {line!r}"
    return files


def example_values(example: Path) -> dict[str, str]:
    pairs = re.findall(r"^([A-Z][A-Z0-9_]*)=(.*)$", example.read_text(), re.MULTILINE)
    return dict(pairs)


def docker_compose_config(run: Run, home: Path) -> subprocess.CompletedProcess[str]:
    """`docker-compose config` from the repository's root, never with the developer's .env
    (a scratch project name and HOME; the env file given, or an empty one)."""
    env_file = run.env_file or home / "empty.env"
    env_file.touch()
    return subprocess.run(
        ["docker-compose", "--env-file", str(env_file)]
        + [arg for f in run.files for arg in ("-f", f)]
        + ["config"],
        cwd=ROOT,
        env={"PATH": os.environ["PATH"], "HOME": str(home), **dict(run.environ)},
        capture_output=True,
        text=True,
        timeout=60,
    )


def without(name: str) -> tuple[tuple[str, str], ...]:
    return tuple((k, v) for k, v in FILLED.items() if k != name)


ROOT_RUN = Run(tuple(ROOT_COMPOSE), None, tuple(FILLED.items()))
OPEN_RUN = Run(tuple(ROOT_COMPOSE), None, (*FILLED.items(), ("BIND_ADDRESS", "0.0.0.0")))
EXAMPLE_RUNS = {
    example: Run(tuple(compose_files(example)), example, tuple(FILLED.items()))
    for example in EXAMPLES
}
# One secret missing: on the one-host file, and on every role of a multi-host one (that each
# secret is required wherever it is used is read from the files, below).
MISSING_RUNS = {
    (tuple(ROOT_COMPOSE), "API_TOKEN"): Run(tuple(ROOT_COMPOSE), None, without("API_TOKEN")),
    (tuple(ALL_ROLES), "CLUSTER_SECRET"): Run(
        tuple(ALL_ROLES), EXAMPLES[0], without("CLUSTER_SECRET")
    ),
}


@pytest.fixture(scope="module")
def configs(
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[Run, subprocess.CompletedProcess[str]]:
    if shutil.which("docker-compose") is None:
        pytest.fail("docker-compose is missing: `make test-deps` installs Debian's")
    runs = [ROOT_RUN, OPEN_RUN, *EXAMPLE_RUNS.values(), *MISSING_RUNS.values()]
    homes = [tmp_path_factory.mktemp("compose") for _ in runs]
    with ThreadPoolExecutor(4) as pool:
        done = list(pool.map(docker_compose_config, runs, homes))
    return dict(zip(runs, done, strict=True))


def resolved(configs: dict[Run, subprocess.CompletedProcess[str]], run: Run) -> dict[str, Any]:
    result = configs[run]
    assert result.returncode == 0, f"docker-compose config {run.files}: {result.stderr}"
    services: dict[str, Any] = yaml.safe_load(result.stdout)["services"]
    return services


def target(service: dict[str, Any]) -> str:
    build = service.get("build")
    if isinstance(build, dict):
        return str(build["target"])
    image = str(service["image"])
    assert image.startswith("mongo:"), f"unexpected image {image}"
    return "mongo"


def published(service: dict[str, Any]) -> list[tuple[str, int, int]]:
    """(address, host port, container port) of each published port."""
    out = []
    for spec in service.get("ports", []):
        address, host_port, container = str(spec).rsplit(":", 2)
        out.append((address, int(host_port), int(container.split("/")[0])))
    return out


def check_service(name: str, service: dict[str, Any]) -> None:
    """The one set of rules every service of every compose file keeps."""
    env: dict[str, str] = {k: str(v) for k, v in service.get("environment", {}).items()}
    kind = target(service)
    if kind == "node":
        unknown = set(env) - NODE_SETTINGS
        assert not unknown, f"{name} sets {unknown}: no node setting"
        settings = Settings(_env_file=None, **{k.lower(): v for k, v in env.items()})  # type: ignore[call-arg]
        assert settings.store_url.startswith("mongodb://")
        assert "replicaSet=rs0" in settings.store_url and settings.mongo_write_concern == "majority"
        assert settings.cluster_secret and settings.admin_token and settings.api_token
        assert settings.watcher_url and settings.host == "0.0.0.0"
        # The advertised URL's port is the one the node listens on and is published on.
        assert urlsplit(settings.server_host).port == settings.port, name
        assert {c for _, _, c in published(service)} == {settings.port}, name
        assert all(h == c for _, h, c in published(service)), name
        assert "/ready" in " ".join(service["healthcheck"]["test"]), name
    elif kind == "watcher":
        unknown = set(env) - WATCHER_SETTINGS
        assert not unknown, f"{name} sets {unknown}: no watcher setting"
        n = len(WATCHER_PREFIX)
        WatcherSettings(_env_file=None, **{k[n:].lower(): v for k, v in env.items()})  # type: ignore[call-arg]
        assert "/health" in " ".join(service["healthcheck"]["test"]), name
    else:
        script = REPLICA_SET_JS.read_text()
        assert set(env) <= set(re.findall(r"process\.env\.([A-Z_]+)", script)), env
        assert service["command"][:2] == ["--replSet", "rs0"] and '"rs0"' in script
        assert "replica-set.js" in " ".join(service["healthcheck"]["test"])
        mounts = [str(v) for v in service["volumes"]]
        sources = [Path(m.split(":")[0]) for m in mounts if m.startswith("/")]
        assert sources == [REPLICA_SET_JS], mounts


def node_env(services: dict[str, Any]) -> Iterator[tuple[str, dict[str, str]]]:
    for name, service in services.items():
        if target(service) == "node":
            yield name, {k: str(v) for k, v in service["environment"].items()}


def test_one_host_compose_is_a_two_shard_cluster_on_a_replica_set(
    configs: dict[Run, subprocess.CompletedProcess[str]],
) -> None:
    services = resolved(configs, ROOT_RUN)
    for name, service in services.items():
        check_service(name, service)
    assert sorted(target(s) for s in services.values()) == ["mongo"] + ["node"] * 4 + ["watcher"]
    nodes = dict(node_env(services))
    (init,) = {env["CLUSTER_INIT"] for env in nodes.values()}
    topology = parse_cluster_init(init)
    assert [len(s.backups) for s in topology.shards] == [1, 1]
    # Every URL of the topology is one node's SERVER_HOST, named by its service (the compose
    # network's name for it), and each node is in it once.
    urls = sorted(u for s in topology.shards for u in (s.primary, *s.backups))
    assert urls == sorted(env["SERVER_HOST"] for env in nodes.values())
    for name, env in nodes.items():
        assert urlsplit(env["SERVER_HOST"]).hostname == name
        assert env["STORE_URL"] == "mongodb://mongo:27017/lionmq?replicaSet=rs0"
        assert services[name]["depends_on"]["mongo"]["condition"] == "service_healthy"
        assert env["WATCHER_URL"] == "ws://watcher:8080/ingest"
    assert len({env["NODE_ID"] for env in nodes.values()}) == 4
    mongo = services["mongo"]["environment"]
    assert mongo == {"MONGO_INITIATE": "true", "MONGO_MEMBERS": "mongo:27017"}
    ports = [p for s in services.values() for p in published(s)]
    assert ports and all(address == "127.0.0.1" for address, _, _ in ports), ports
    assert not published(services["mongo"]), "MongoDB is reached inside the compose network"


def test_bind_address_publishes_on_another_interface(
    configs: dict[Run, subprocess.CompletedProcess[str]],
) -> None:
    services = resolved(configs, OPEN_RUN)
    ports = [p for s in services.values() for p in published(s)]
    assert len(ports) == 5 and all(address == "0.0.0.0" for address, _, _ in ports), ports


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_env_example_resolves_to_real_settings(
    configs: dict[Run, subprocess.CompletedProcess[str]], example: Path
) -> None:
    services = resolved(configs, EXAMPLE_RUNS[example])
    values = example_values(example)
    for name, service in services.items():
        check_service(name, service)
        assert all(address == values["BIND_ADDRESS"] for address, _, _ in published(service))
    # Each variable of the example is a setting (or the second node's, or a compose-only
    # one) and is used by the compose files it is run with.
    texts = "\n".join((ROOT / f).read_text() for f in compose_files(example))
    for name in values:
        kind = name.removesuffix("_B")
        assert name in COMPOSE_ONLY or kind in NODE_SETTINGS | WATCHER_SETTINGS, name
        assert "${" + name + ":" in texts, f"{example.name}: {name} is used by no compose file"
    # The examples leave the secrets empty: the operator fills them in.
    assert all(values.get(secret) == "" for secret in SECRETS if secret in values)


@pytest.mark.parametrize("layout", sorted({e.parent for e in EXAMPLES}), ids=lambda p: p.name)
def test_the_hosts_of_a_layout_make_one_cluster(
    configs: dict[Run, subprocess.CompletedProcess[str]], layout: Path
) -> None:
    hosts = {e.name: resolved(configs, EXAMPLE_RUNS[e]) for e in EXAMPLES if e.parent == layout}
    nodes = {
        (host, name): env for host, services in hosts.items() for name, env in node_env(services)
    }
    for shared in ("STORE_URL", "CLUSTER_INIT", "WATCHER_URL"):
        assert len({env[shared] for env in nodes.values()}) == 1, f"{shared} differs"
    assert len({env["NODE_ID"] for env in nodes.values()}) == len(nodes)
    host_of = {env["SERVER_HOST"]: host for (host, _), env in nodes.items()}
    assert len(host_of) == len(nodes), "two nodes advertise one URL"
    topology = parse_cluster_init(next(iter(nodes.values()))["CLUSTER_INIT"])
    for shard in topology.shards:
        members = [shard.primary, *shard.backups]
        assert all(url in host_of for url in members), f"{members}: a URL no node serves"
        assert len({host_of[u] for u in members}) == len(members), f"{shard.id} on one host"
    # One replica set: every member listed in the URL, each on a host that runs one, exactly
    # one member initiating it.
    mongos = [s["mongo"]["environment"] for s in hosts.values() if "mongo" in s]
    assert mongos, "no host runs MongoDB"
    (members,) = {m["MONGO_MEMBERS"] for m in mongos}
    store = next(iter(nodes.values()))["STORE_URL"]
    assert store == f"mongodb://{members}/lionmq?replicaSet=rs0"
    assert len(mongos) == len(members.split(","))
    assert [m["MONGO_INITIATE"] for m in mongos].count("true") == 1
    watchers = [s["watcher"] for s in hosts.values() if "watcher" in s]
    assert len(watchers) == 1
    ingest = urlsplit(next(iter(nodes.values()))["WATCHER_URL"])
    assert [(a, h) for a, h, _ in published(watchers[0])] == [(ingest.hostname, ingest.port)]


@pytest.mark.parametrize(
    "run", list(MISSING_RUNS.values()), ids=[f"{f[0]}-without-{n}" for f, n in MISSING_RUNS]
)
def test_a_missing_secret_fails_config(
    configs: dict[Run, subprocess.CompletedProcess[str]], run: Run
) -> None:
    (missing,) = set(SECRETS) - dict(run.environ).keys()
    result = configs[run]
    assert result.returncode != 0 and f"set {missing}" in result.stderr, result.stderr


def test_every_secret_is_required_wherever_it_is_used() -> None:
    for path in [ROOT / "docker-compose.yml", *(ROOT / "deploy" / "compose").glob("*.yml")]:
        text = path.read_text()
        for secret in SECRETS:
            uses = re.findall(r"\$\{" + secret + r"(:?.)", text)
            assert all(use == ":?" for use in uses), f"{path.name}: {secret} is optional"
