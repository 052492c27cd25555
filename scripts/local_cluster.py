"""`make cluster`: a whole LionMQ cluster on this machine's loopback, to watch a failover.

Two shards, each a primary and a backup (four `python -m app` processes seeded with
CLUSTER_INIT on one SQLite file), and the watcher (`python -m watcher`), with secrets generated
for the run. It waits until each shard is owned by its primary, prints every URL, the secrets
and how to kill a primary, then reports what happens: a shard changing owner, a process that
dies (never restarted behind your back: `kill -HUP` this launcher to start the dead ones again).
Ctrl-C (SIGINT) or SIGTERM stops everything it started and exits 0.

    .venv/bin/python scripts/local_cluster.py [--ports 8001,8002,8003,8004] [--watcher-port 8080]
        [--data DIR]

The store and the logs go to a temporary directory removed at exit, or to --data DIR (kept;
CLUSTER_INIT only seeds an empty store, so reuse a DIR with the same ports).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PROG = "make cluster"
HOST = "127.0.0.1"
DEFAULT_PORTS = (8001, 8002, 8003, 8004)
DEFAULT_WATCHER_PORT = 8080
# Node indices of each shard, primary first: CLUSTER_INIT names them s1, s2 in this order.
LAYOUT = ((0, 1), (2, 3))
START_TIMEOUT_S = 60.0
STOP_GRACE_S = 10.0
POLL_S = 0.2
VIEW_EVERY_S = 1.0
HTTP_TIMEOUT_S = 2.0
LOG_TAIL_LINES = 15
PR_SET_PDEATHSIG = 1


class Stop(Exception):
    """SIGINT or SIGTERM arrived: stop everything and exit 0."""


class StartFailed(Exception):
    """The cluster did not come up; the message says why."""


@dataclass
class Child:
    name: str
    url: str
    role: str
    argv: list[str]
    env: dict[str, str]
    log: Path
    proc: subprocess.Popen[bytes] | None = None
    reported: bool = False  # its unexpected exit was reported

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid


def say(line: str = "") -> None:
    print(line, flush=True)


def port_list(text: str) -> tuple[int, ...]:
    try:
        ports = tuple(int(p) for p in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list") from None
    if len(ports) != 4 or len(set(ports)) != 4 or not all(0 < p < 65536 for p in ports):
        raise argparse.ArgumentTypeError("give four different ports, as in 8001,8002,8003,8004")
    return ports


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Start 2 shards x (primary + backup) and the watcher on 127.0.0.1, on one "
        "SQLite file; Ctrl-C stops them all.",
    )
    p.add_argument(
        "--ports",
        type=port_list,
        default=DEFAULT_PORTS,
        help="the four nodes' ports: primary s1, backup s1, primary s2, backup s2"
        " (default 8001,8002,8003,8004; make cluster CLUSTER_PORTS=...)",
    )
    p.add_argument(
        "--watcher-port",
        type=int,
        default=DEFAULT_WATCHER_PORT,
        help="the watcher's port (default 8080; make cluster CLUSTER_WATCHER_PORT=...)",
    )
    p.add_argument(
        "--data",
        type=Path,
        help="directory for the store and the logs, kept at exit (default: a temporary one)",
    )
    return p


def busy_ports(ports: list[int]) -> list[int]:
    """The ports something on this host already listens on (as the node binds: reuse allowed,
    so a port in TIME_WAIT counts as free)."""
    busy = []
    for port in ports:
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((HOST, port))
            except OSError:
                busy.append(port)
    return busy


def die_with_parent() -> None:
    """In each child before exec: SIGTERM when the launcher dies, even by kill -9 (Linux)."""
    if sys.platform == "linux":
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def get_json(url: str, token: str) -> Any:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT_S) as answer:
        return json.load(answer)


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT_S) as answer:
            return bool(answer.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def how_it_ended(code: int) -> str:
    if code < 0:
        return f"killed by {signal.Signals(-code).name}"
    return f"exited with code {code}"


class Launcher:
    def __init__(self, ports: tuple[int, ...], watcher_port: int, data: Path) -> None:
        self.data = data
        self.store_url = f"sqlite:///{data / 'cluster.db'}"
        self.tokens = {
            name: secrets.token_hex(16)
            for name in ("API_TOKEN", "CLUSTER_SECRET", "ADMIN_TOKEN", "WATCHER_TOKEN")
        }
        urls = [f"http://{HOST}:{port}" for port in ports]
        self.shards = {f"s{i}": tuple(urls[n] for n in shard) for i, shard in enumerate(LAYOUT, 1)}
        init = {"shards": [{"primary": p, "backups": list(b)} for p, *b in self.shards.values()]}
        self.watcher = self._child(
            "watcher",
            f"http://{HOST}:{watcher_port}/",
            "dashboard: nodes, shards, failovers",
            "watcher",
            WATCHER_HOST=HOST,
            WATCHER_PORT=str(watcher_port),
            WATCHER_TOKEN=self.tokens["WATCHER_TOKEN"],
        )
        shared = {
            "HOST": HOST,
            "STORE_URL": self.store_url,
            "CLUSTER_INIT": json.dumps(init),
            "WATCHER_URL": f"ws://{HOST}:{watcher_port}/ingest",
            **self.tokens,
        }
        roles = {
            n: f"{'backup' if k else 'primary'} of {shard}"
            for shard, members in zip(self.shards, LAYOUT, strict=True)
            for k, n in enumerate(members)
        }
        self.nodes = [
            self._child(
                f"node{n + 1}",
                urls[n],
                roles[n],
                "app",
                **shared,
                PORT=str(ports[n]),
                NODE_ID=f"node{n + 1}",
                SERVER_HOST=urls[n],
            )
            for n in sorted(roles)
        ]
        self.children = [self.watcher, *self.nodes]
        self.owners: dict[str, str | None] = {}
        self.restart_asked = False

    def _child(self, name: str, url: str, role: str, module: str, **env: str) -> Child:
        # Run in the data directory, so that no .env of the developer's is read; the settings
        # given here win over the shell's, the rest (LOG_LEVEL, LEASE_MS...) pass through.
        path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
        return Child(
            name,
            url,
            role,
            [sys.executable, "-m", module],
            {**os.environ, "PYTHONPATH": path, **env},
            self.data / f"{name}.log",
        )

    # -- processes ---------------------------------------------------------------------------

    def spawn(self, child: Child) -> None:
        with child.log.open("ab") as log:
            child.proc = subprocess.Popen(
                child.argv,
                cwd=self.data,
                env=child.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                # Out of the terminal's process group: Ctrl-C reaches the launcher alone, which
                # stops the nodes in order (backups first) rather than all at once.
                start_new_session=True,
                preexec_fn=die_with_parent,
            )
        child.reported = False

    def start(self) -> None:
        for child in self.children:
            self.spawn(child)
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self._up():
            if time.monotonic() > deadline:
                raise StartFailed(
                    f"the cluster was not up after {START_TIMEOUT_S:.0f} s"
                    f" (each shard owned by its primary); logs in {self.data}"
                )
            time.sleep(POLL_S)

    def _up(self) -> bool:
        for child in self.children:
            if not child.alive:
                assert child.proc is not None
                raise StartFailed(
                    f"{child.name} {how_it_ended(child.proc.returncode)} while starting:\n"
                    + self.tail(child)
                )
        if not all(answers(c.url.rstrip("/") + "/health") for c in self.children):
            return False
        view = self.view()
        return view is not None and all(
            self.owners.get(shard) == members[0] for shard, members in self.shards.items()
        )

    def view(self) -> dict[str, Any] | None:
        """GET /cluster from the first live node that answers; notes who owns each shard."""
        for node in self.nodes:
            if not node.alive:
                continue
            try:
                view: dict[str, Any] = get_json(node.url + "/cluster", self.tokens["API_TOKEN"])
            except (urllib.error.URLError, OSError, ValueError):
                continue
            self.owners = {s["id"]: s["owner"] for s in view["shards"]}
            return view
        return None

    def tail(self, child: Child) -> str:
        lines = child.log.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:]
        return "\n".join(f"    | {line}" for line in lines) or "    | (empty log)"

    def stop(self) -> None:
        """Nodes that own no shard first (a stopping owner then has no backup to wait for),
        then the owners, then the watcher; SIGKILL for any that outlives STOP_GRACE_S."""
        owners = set(self.owners.values())
        backups = [n for n in self.nodes if n.url not in owners]
        for batch in (backups, [n for n in self.nodes if n not in backups], [self.watcher]):
            live = [c for c in batch if c.alive]
            for child in live:
                assert child.proc is not None
                child.proc.terminate()
            for child in live:
                assert child.proc is not None
                try:
                    child.proc.wait(STOP_GRACE_S)
                except subprocess.TimeoutExpired:
                    say(f"{child.name} did not stop within {STOP_GRACE_S:.0f} s: SIGKILL")
                    child.proc.kill()
                    child.proc.wait()

    # -- while it runs -----------------------------------------------------------------------

    def banner(self) -> None:
        token, admin = self.tokens["API_TOKEN"], self.tokens["ADMIN_TOKEN"]
        first = self.nodes[0]
        say(f"LionMQ cluster up: 2 shards x (primary + backup) on {self.store_url}")
        say(f"logs: {self.data}/<name>.log")
        for child in [*sorted(self.nodes, key=lambda c: c.name), self.watcher]:
            say(f"  {child.name:<8} {child.url:<24} pid {child.pid:<8} {child.role}")
        say()
        say("Secrets generated for this run (the CLI and the client read these):")
        say(f"  export LIONMQ_URL={first.url} LIONMQ_TOKEN={token} LIONMQ_ADMIN_TOKEN={admin}")
        say(f"  CLUSTER_SECRET={self.tokens['CLUSTER_SECRET']}")
        say(f"  WATCHER_TOKEN={self.tokens['WATCHER_TOKEN']}")
        say()
        say("Who owns each shard (any node answers):")
        say(f'  curl -s -H "Authorization: Bearer {token}" {first.url}/cluster')
        say("Enqueue through any node (it forwards to the channel's owner):")
        say(
            f'  curl -s -H "Authorization: Bearer {token}" -H "Content-Type: application/json"'
            f' -d \'{{"messages": [{{"body": "hello"}}]}}\' {first.url}/channels/demo/enqueue'
        )
        say(f"Watch: open {self.watcher.url} (the cluster view shows owners and failovers).")
        say(
            f"See a failover: kill -9 {first.pid}   # {first.name}, {first.role}: its backup"
            " takes s1 over within about LEASE_MS (2 s), reported here and in the watcher."
        )
        say(
            f"Start the dead ones again: kill -HUP {os.getpid()}   # a killed primary comes"
            " back as a backup."
        )
        say(f"Stop everything: Ctrl-C (or kill {os.getpid()}).")

    def supervise(self) -> None:
        """Until a signal: report a process that died and each change of a shard's owner."""
        next_view = 0.0
        while True:
            for child in self.children:
                if child.proc is not None and not child.alive and not child.reported:
                    child.reported = True
                    say(
                        f"!! {child.name} ({child.url}, pid {child.pid}, {child.role})"
                        f" {how_it_ended(child.proc.returncode)}; not restarted"
                        f" (kill -HUP {os.getpid()} starts it again). End of {child.log}:\n"
                        + self.tail(child)
                    )
            if self.restart_asked:
                self.restart_asked = False
                for child in self.children:
                    if not child.alive:
                        self.spawn(child)
                        say(f"started {child.name} again ({child.url}, pid {child.pid})")
            if time.monotonic() >= next_view:
                next_view = time.monotonic() + VIEW_EVERY_S
                self.report_owners()
            time.sleep(POLL_S)

    def report_owners(self) -> None:
        before = dict(self.owners)
        if self.view() is None:
            return  # no node answers: the deaths are reported, nothing to add
        for shard, owner in self.owners.items():
            if owner != before.get(shard):
                was = self.name_of(before.get(shard))
                say(f"-- {shard}: owner {self.name_of(owner)} (was {was})")

    def name_of(self, url: str | None) -> str:
        if url is None:
            return "none (failover under way)"
        return next((f"{n.name} {url}" for n in self.nodes if n.url == url), url)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    ports = [*args.ports, args.watcher_port]
    busy = busy_ports(ports)
    if busy:
        say(
            f"{PROG}: port {', '.join(map(str, busy))} on {HOST} is in use (another cluster,"
            " or make run?); choose others, as in"
            " make cluster CLUSTER_PORTS=9001,9002,9003,9004 CLUSTER_WATCHER_PORT=9080"
        )
        return 2
    if args.data is not None:
        args.data.mkdir(parents=True, exist_ok=True)
    data = args.data.resolve() if args.data else Path(tempfile.mkdtemp(prefix="lionmq-cluster-"))
    launcher = Launcher(args.ports, args.watcher_port, data)

    def on_stop(signum: int, frame: FrameType | None) -> None:
        # Once: a second Ctrl-C while stopping does not interrupt the orderly stop.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise Stop(signal.Signals(signum).name)

    def on_hup(signum: int, frame: FrameType | None) -> None:
        launcher.restart_asked = True

    signal.signal(signal.SIGINT, on_stop)
    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGHUP, on_hup)
    code = 0
    try:
        say(f"starting 4 nodes and the watcher on {HOST} (store and logs in {data}) ...")
        launcher.start()
        launcher.banner()
        launcher.supervise()
    except Stop as stop:
        say(f"{stop}: stopping every process this launcher started ...")
    except StartFailed as failed:
        say(f"{PROG}: {failed}")
        code = 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        launcher.stop()
        if args.data is None and code == 0:
            shutil.rmtree(data)
    say("stopped." if code == 0 else f"stopped; logs kept in {data}")
    return code


if __name__ == "__main__":
    sys.exit(main())
