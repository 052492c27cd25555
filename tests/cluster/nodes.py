"""A cluster of `python -m app` processes on loopback ports sharing one SQLite file.

`Cluster.build(data_dir, [[0, 1], [2, 3]], spare=1)` lays out shards (each a list of node
indices, the primary first) and spare nodes that no shard names; `start()` launches every node
at once with the same CLUSTER_INIT, secrets and timings, and waits until each shard is owned by
its configured primary. Nodes can be killed (`kill9`), frozen (`pause`/`resume`) and restarted on
the same port, id and environment (`restart`). A node may sit behind a `TcpProxy`: then its
SERVER_HOST (the URL in the topology, the one peers use) is the proxy's, and the test still talks
to the node's own port (`node.url`).

The helpers at the bottom read the cluster's HTTP contract (GET /cluster, GET
/cluster/route/{channel}, PUT /cluster/nodes) and nothing else of the node's inside.
"""

from __future__ import annotations

import json
import signal
import sqlite3
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from lionmq.placement import shard_for

from tests.cluster.proxy import TcpProxy
from tests.conftest import NodeProcess, free_port, wait_until

SECRET = "cluster-secret-for-tests"
ADMIN_TOKEN = "admin-token-for-tests"
API_TOKEN = "api-token-for-tests"
# The defaults of the issue: takeover within 3 s is promised for these.
DEFAULT_HEARTBEAT_MS = 500
DEFAULT_LEASE_MS = 2000
# For tests that are not about the defaults: faster, still well above a loaded machine's jitter.
FAST_HEARTBEAT_MS = 200
FAST_LEASE_MS = 1000
START_TIMEOUT_S = 30.0
HTTP_TIMEOUT = httpx.Timeout(5.0, connect=1.0)

Json = dict[str, Any]


class ClusterNode(NodeProcess):
    """A node of a cluster: up once /health answers (a backup may not be ready to serve)."""

    def __init__(self, data_dir: Path, index: int, port: int, server_host: str, **env: str) -> None:
        self.index = index
        self.node_id = f"node{index}"
        self.server_host = server_host
        self.paused = False
        super().__init__(data_dir, port, NODE_ID=self.node_id, SERVER_HOST=server_host, **env)

    def _healthy(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"node exited with {self.proc.returncode}: {self.log.read_text()}")
        try:
            return httpx.get(self.url + "/health", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def serving(self) -> bool:
        """Running and not frozen: a client's request can get an answer."""
        return self.running and not self.paused

    def pause(self) -> None:
        assert self.proc is not None and self.running
        self.proc.send_signal(signal.SIGSTOP)
        self.paused = True

    def freeze_outside_store_lock(self, tries: int = 50) -> int:
        """SIGSTOP this node at a moment it holds no write lock on the shared SQLite file; the
        number of freezes it took.

        A process frozen inside a write transaction keeps the lock of the file every node of
        a local cluster writes to: no one can write, a takeover included, until it wakes (or
        dies: the kernel drops the locks of a killed process). That is the embedded store's
        limit, documented in README and docs/architecture.md; MongoDB has no such lock. So the
        freeze is retried (SIGCONT, SIGSTOP) until the lock is seen free."""
        db = self.data_dir / "lionmq.db"
        for n in range(1, tries + 1):
            self.pause()
            if _write_lock_free(db):
                return n
            self.resume()
            time.sleep(0.01 * n)
        raise AssertionError(f"{self.node_id} held the store's write lock at all {tries} freezes")

    def resume(self) -> None:
        assert self.proc is not None and self.running
        self.proc.send_signal(signal.SIGCONT)
        self.paused = False

    def kill9(self) -> None:
        super().kill9()
        self.paused = False

    def stop(self) -> None:
        if self.paused:
            self.resume()  # a frozen process never sees SIGTERM
        super().stop()

    def restart(self, timeout: float = START_TIMEOUT_S) -> ClusterNode:
        """Start again on the same port, id and environment (after kill9 or stop)."""
        assert not self.running, "restart a node that is down"
        self.start(timeout)
        return self


@dataclass
class Cluster:
    data_dir: Path
    nodes: list[ClusterNode]
    layout: list[list[int]]  # CLUSTER_INIT's shards as node indices, the primary first
    heartbeat_ms: int
    lease_ms: int
    proxies: dict[int, TcpProxy] = field(default_factory=dict)

    @classmethod
    def build(
        cls,
        data_dir: Path,
        layout: Sequence[Sequence[int]],
        *,
        spare: int = 0,
        heartbeat_ms: int = FAST_HEARTBEAT_MS,
        lease_ms: int = FAST_LEASE_MS,
        proxied: Iterable[int] = (),
        secret: str = SECRET,
        admin_token: str = ADMIN_TOKEN,
        api_token: str = API_TOKEN,
        **env: str,
    ) -> Cluster:
        count = len({i for shard in layout for i in shard}) + spare
        ports = [free_port() for _ in range(count)]
        proxies = {i: TcpProxy(ports[i]) for i in proxied}
        hosts = [
            proxies[i].url if i in proxies else f"http://127.0.0.1:{port}"
            for i, port in enumerate(ports)
        ]
        init = {
            "shards": [
                {"primary": hosts[shard[0]], "backups": [hosts[i] for i in shard[1:]]}
                for shard in layout
            ]
        }
        common = {
            "CLUSTER_INIT": json.dumps(init),
            "CLUSTER_SECRET": secret,
            "ADMIN_TOKEN": admin_token,
            "API_TOKEN": api_token,
            "HEARTBEAT_MS": str(heartbeat_ms),
            "LEASE_MS": str(lease_ms),
            "WATCHER_URL": "",
            **env,
        }
        nodes = [ClusterNode(data_dir, i, port, hosts[i], **common) for i, port in enumerate(ports)]
        return cls(data_dir, nodes, [list(s) for s in layout], heartbeat_ms, lease_ms, proxies)

    # processes

    def start(self, timeout: float = START_TIMEOUT_S, settle: bool = True) -> Cluster:
        for proxy in self.proxies.values():
            proxy.start()
        if not settle:
            with ThreadPoolExecutor(len(self.nodes)) as pool:
                list(pool.map(lambda n: n.start(timeout), self.nodes))
            return self
        # Primaries first, owning their shards, then the rest: started all at once on a loaded
        # machine, a backup up LEASE_MS before its primary rightly takes the shard itself, and
        # the tests expect the layout as configured.
        first = {shard[0] for shard in self.layout}
        for group in (
            [n for i, n in enumerate(self.nodes) if i in first],
            [n for i, n in enumerate(self.nodes) if i not in first],
        ):
            if group:
                with ThreadPoolExecutor(len(group)) as pool:
                    list(pool.map(lambda n: n.start(timeout), group))
            self.wait_settled(timeout)
        return self

    def stop(self) -> None:
        """Kill every node and close the proxies (the fixture's teardown)."""
        for node in self.nodes:
            if node.paused:
                node.resume()
            node.kill9()
        for proxy in self.proxies.values():
            proxy.close()

    def __enter__(self) -> Cluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log_tails(self, lines: int = 40) -> str:
        """The end of every node's log, for a failed test's report."""
        parts = []
        for n in self.nodes:
            text = n.log.read_text(errors="replace") if n.log.exists() else "(no log)"
            tail = "\n".join(text.splitlines()[-lines:])
            parts.append(f"--- {n.node_id} {n.url} (SERVER_HOST {n.server_host}) ---\n{tail}")
        return "\n".join(parts)

    def serving(self) -> list[ClusterNode]:
        return [n for n in self.nodes if n.serving]

    def urls(self) -> list[str]:
        """The nodes a client can reach now (their own ports, never a proxy)."""
        return [n.url for n in self.serving()]

    def node_at(self, url: str) -> ClusterNode:
        """The node whose topology URL or own URL is `url`."""
        for n in self.nodes:
            if url in (n.server_host, n.url):
                return n
        raise KeyError(url)

    def by_id(self, node_id: str) -> ClusterNode:
        for n in self.nodes:
            if n.node_id == node_id:
                return n
        raise KeyError(node_id)

    # the HTTP contract

    def http(self, timeout: httpx.Timeout = HTTP_TIMEOUT) -> httpx.Client:
        return httpx.Client(headers={"Authorization": f"Bearer {API_TOKEN}"}, timeout=timeout)

    def view(self, via: ClusterNode | None = None) -> Json:
        """GET /cluster from `via` (else the first serving node)."""
        node = via or self.serving()[0]
        r = httpx.get(node.url + "/cluster", headers=api_auth(), timeout=HTTP_TIMEOUT)
        r.raise_for_status()
        doc: Json = r.json()
        return doc

    def route(self, channel: str, via: ClusterNode | None = None) -> Json:
        node = via or self.serving()[0]
        r = httpx.get(
            f"{node.url}/cluster/route/{channel}", headers=api_auth(), timeout=HTTP_TIMEOUT
        )
        r.raise_for_status()
        doc: Json = r.json()
        return doc

    def shard_ids(self, via: ClusterNode | None = None) -> list[str]:
        return [s["id"] for s in self.view(via)["shards"]]

    def owner(self, shard_id: str, via: ClusterNode | None = None) -> str | None:
        """The acting owner's URL of `shard_id` as `via` sees it."""
        for s in self.view(via)["shards"]:
            if s["id"] == shard_id:
                owner: str | None = s["owner"]
                return owner
        raise KeyError(shard_id)

    def shard_of_node(self, index: int, via: ClusterNode | None = None) -> str:
        """The id of the shard whose members include node `index`."""
        host = self.nodes[index].server_host
        for s in self.view(via)["shards"]:
            if host in (s["primary"], *s["backups"]):
                shard_id: str = s["id"]
                return shard_id
        raise KeyError(host)

    def member(self, index: int, via: ClusterNode | None = None) -> Json | None:
        """Node `index`'s entry in GET /cluster's `nodes`, or None if not listed."""
        host = self.nodes[index].server_host
        for n in self.view(via)["nodes"]:
            if n["url"] == host:
                entry: Json = n
                return entry
        return None

    def owners_are(self, expected: dict[str, str], via: ClusterNode | None = None) -> bool:
        """Whether each shard id of `expected` is owned by that URL (no error if unreachable)."""
        try:
            shards = {s["id"]: s["owner"] for s in self.view(via)["shards"]}
        except (httpx.HTTPError, IndexError):
            return False
        return all(shards.get(k) == v for k, v in expected.items())

    def wait_settled(self, timeout: float = START_TIMEOUT_S) -> None:
        """Wait until every shard of the layout is owned by its configured primary."""
        wanted = {i: self.nodes[shard[0]].server_host for i, shard in enumerate(self.layout)}

        def settled() -> bool:
            try:
                shards = self.view()["shards"]
            except httpx.HTTPStatusError as exc:
                if exc.response.status_code in (401, 404, 405):  # no cluster here: say so now
                    raise AssertionError(f"GET /cluster: {exc.response.text}") from None
                return False
            except (httpx.HTTPError, IndexError):
                return False
            owners = {s["primary"]: s["owner"] for s in shards}
            return all(owners.get(url) == url for url in wanted.values())

        wait_until(settled, timeout, "every shard owned by its configured primary", 0.1)
        # The store says so; each node's routing learns it at its next reading of the store (a
        # heartbeat at most): until then it answers 503 for the shard it has not seen taken.
        shards = self.view()["shards"]
        ids = [s["id"] for s in shards]
        probes = {
            channels_on([s["id"]], 1, "settled", among=ids)[0]: s["primary"]
            for s in shards
            if s["primary"] in wanted.values()
        }

        def routed() -> bool:
            try:
                return all(
                    self.route(channel, via=node)["owner"] == owner
                    for channel, owner in probes.items()
                    for node in self.serving()
                )
            except httpx.HTTPError:
                return False

        wait_until(routed, timeout, "every node routing each shard to its owner", 0.05)

    def set_nodes(
        self, shards: Sequence[Sequence[int]], via: ClusterNode | None = None
    ) -> httpx.Response:
        """PUT /cluster/nodes with the admin token: shards as node indices, primary first."""
        node = via or self.serving()[0]
        body = {
            "shards": [
                {
                    "primary": self.nodes[s[0]].server_host,
                    "backups": [self.nodes[i].server_host for i in s[1:]],
                }
                for s in shards
            ]
        }
        return httpx.put(
            node.url + "/cluster/nodes",
            json=body,
            headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
            timeout=HTTP_TIMEOUT,
        )


def api_auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {API_TOKEN}"}


def channels_on(
    shard_ids: Sequence[str],
    per_shard: int,
    prefix: str = "ch",
    among: Sequence[str] | None = None,
) -> list[str]:
    """`per_shard` channel names placed on each of `shard_ids` by the placement function over
    the cluster's shards `among` (default: `shard_ids` are all of them), grouped by shard in
    the order given: the same names on every run."""
    picked: dict[str, list[str]] = {s: [] for s in shard_ids}
    ring = among or shard_ids
    assert set(shard_ids) <= set(ring), f"{shard_ids} not all among {ring}"
    for i in range(100_000):
        name = f"{prefix}-{i}"
        bucket = picked.get(shard_for(name, ring))
        if bucket is not None and len(bucket) < per_shard:
            bucket.append(name)
        if all(len(b) == per_shard for b in picked.values()):
            return [name for s in shard_ids for name in picked[s]]
    raise AssertionError(f"could not place {per_shard} channels on each of {shard_ids}")


def measure_until(
    ok: Callable[[], bool], started: float, timeout: float, what: str, interval: float = 0.02
) -> float:
    """Seconds from `started` (time.monotonic()) until `ok()` first holds; fails after timeout."""
    wait_until(ok, timeout, what, interval)
    return time.monotonic() - started


def _write_lock_free(db: Path) -> bool:
    """Whether a write transaction can begin on `db` within 0.3 s (another live node may hold
    the lock for a commit meanwhile; a frozen one holds it for good)."""
    conn = sqlite3.connect(db, timeout=0.3, isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("ROLLBACK")
        return True
    except sqlite3.OperationalError:
        return False
    finally:
        conn.close()
