"""`python -m bench cluster [--kills 20]`: the cluster's figures, on loopback processes sharing
one SQLite file, with the default HEARTBEAT_MS (500) and LEASE_MS (2000).

- takeover after kill -9: 2 shards x (primary + backup) under producers and consumers on both
  shards; each kill takes the acting owner of one shard (alternating), times the first enqueue
  its backup serves itself, restarts the killed node and waits for it to rejoin as a backup;
- over all those kills: confirmed enqueues never delivered, acked messages delivered again and
  deliveries within another delivery's lease (two owners), judged after a drain;
- set_nodes: a third shard added then removed under load; the longest time a moved channel
  answered no request (it is probed every 20 ms) and how long until every node routed anew;
- the cost of a forwarded request: median latency of a one-message enqueue sent to a node that
  forwards it against one sent to the owner;
- rolling restart: every node of both shards stopped with SIGTERM (each while it owns its shard,
  so each stop hands the shard to its up-to-date backup) and started again, under load; the
  longest time a channel answered no request around each stop (probed every 20 ms), and the
  books judged as above.

The steps are the cluster tests' own (tests/cluster/scenarios.py), not a second version of them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.stats import log
from tests.cluster.ledger import (
    Ledger,
    acked_redelivered,
    duplicated,
    lost,
    overlapping,
    problems,
    refused,
    server_errors,
    summary,
)
from tests.cluster.load import Load, drain
from tests.cluster.nodes import (
    API_TOKEN,
    DEFAULT_HEARTBEAT_MS,
    DEFAULT_LEASE_MS,
    Cluster,
    channels_on,
)
from tests.cluster.rolling import describe, roll
from tests.cluster.scenarios import forward_cost, kill_owner, moving_channels, rejoin, reshape

VISIBILITY_MS = 5000


@dataclass
class Figures:
    kills: int
    takeover_s: list[float] = field(default_factory=list)
    rejoin_s: list[float] = field(default_factory=list)
    confirmed: int = 0
    lost: int = 0
    acked_redelivered: int = 0
    two_owners: int = 0
    duplicated: int = 0
    errors: int = 0  # 5xx other than 503, and refusals of well-formed requests
    moved_share: float = 0.0
    move_outage_s: dict[str, float] = field(default_factory=dict)
    move_settled_s: dict[str, float] = field(default_factory=dict)
    direct_ms: float = 0.0
    forwarded_ms: float = 0.0
    books: dict[str, int] = field(default_factory=dict)
    restart_outage_s: list[float] = field(default_factory=list)  # per SIGTERM hand-off
    restart_problems: int = 0  # lost, redelivered after ack, two owners, errors...


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench cluster", description=__doc__)
    parser.add_argument("--kills", type=int, default=20, help="kill -9 cycles (default 20)")
    parser.add_argument(
        "--forward-requests", type=int, default=300, help="enqueues per side of the forward cost"
    )
    parser.add_argument(
        "--restarts", type=int, default=1, help="rolling restart rounds over every node (1)"
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    if args.kills < 1 or args.forward_requests < 1 or args.restarts < 0:
        parser.error("--kills and --forward-requests must be at least 1, --restarts 0 or more")
    return args


def run(args: argparse.Namespace, data: Path) -> Figures:
    figures = Figures(args.kills)
    cluster = Cluster.build(
        data,
        [[0, 1], [2, 3]],
        spare=1,
        heartbeat_ms=DEFAULT_HEARTBEAT_MS,
        lease_ms=DEFAULT_LEASE_MS,
    )
    try:
        cluster.start()
        log(f"[cluster] 5 nodes up on {data}")
        ids = cluster.shard_ids()
        channels = channels_on(ids, 3, "bench")
        probes = channels_on(ids, 1, "bench-first")
        ledger = Ledger()
        with Load(cluster.urls, channels, ledger, API_TOKEN, visibility_ms=VISIBILITY_MS):
            for k in range(args.kills):
                shard = ids[k % len(ids)]
                takeover = kill_owner(cluster, shard, probes[k % len(ids)], ledger)
                figures.takeover_s.append(takeover.seconds)
                figures.rejoin_s.append(rejoin(cluster, takeover))
                log(
                    f"[cluster] kill {k + 1}/{args.kills}: {takeover.victim.node_id} -> "
                    f"{takeover.successor.node_id} on {shard} in {takeover.seconds:.2f}s"
                )
        drain(cluster.urls, [*channels, *probes], ledger, API_TOKEN, VISIBILITY_MS, 60)
        books = ledger.books()
        figures.books = summary(books)
        figures.confirmed = len(books.enqueued)
        figures.lost = len(lost(books))
        figures.acked_redelivered = len(acked_redelivered(books))
        figures.two_owners = len(overlapping(books))
        figures.duplicated = len(duplicated(books))
        figures.errors = len(server_errors(books)) + len(refused(books))

        hosts = [[n.server_host for n in cluster.nodes[i : i + 2]] for i in (0, 2)]
        view = cluster.view()
        routed = [f"bench-routed-{i}" for i in range(300)]
        moving, staying = moving_channels(view, [*hosts, [cluster.nodes[4].server_host]], 3, "bm")
        ledger = Ledger()
        with Load(cluster.urls, moving + staying, ledger, API_TOKEN, visibility_ms=VISIBILITY_MS):
            for name, layout in (("add", [[0, 1], [2, 3], [4]]), ("remove", [[0, 1], [2, 3]])):
                change = reshape(cluster, layout, routed + moving + staying, moving, ledger)
                figures.move_outage_s[name] = max(change.outage.values())
                figures.move_settled_s[name] = change.settled_s
                if name == "add":
                    figures.moved_share = sum(1 for c in routed if c in change.moved) / len(routed)
                log(f"[cluster] set_nodes {name}: {change.outage} settled {change.settled_s:.2f}s")

        cost = forward_cost(cluster, channels[0], args.forward_requests)
        figures.direct_ms, figures.forwarded_ms = cost.direct_ms, cost.forwarded_ms

        if args.restarts:
            ledger = Ledger()
            stops = roll(cluster, ledger, args.restarts, len(ids))
            figures.restart_outage_s = [s.worst_s for s in stops]
            figures.restart_problems = len(problems(ledger.books()))
            log(f"[cluster] rolling restart:\n{describe(stops)}")
    finally:
        cluster.stop()
    return figures


def report(figures: Figures) -> str:
    t = figures.takeover_s
    lines = [
        f"takeover after kill -9 ({figures.kills} kills, HEARTBEAT_MS={DEFAULT_HEARTBEAT_MS}, "
        f"LEASE_MS={DEFAULT_LEASE_MS}): median {statistics.median(t):.2f} s, max {max(t):.2f} s",
        f"rejoin as backup after restart: median {statistics.median(figures.rejoin_s):.2f} s",
        f"over those kills: {figures.confirmed} confirmed enqueues, {figures.lost} lost, "
        f"{figures.acked_redelivered} acked redelivered, {figures.two_owners} delivered by two "
        f"owners at once, {figures.duplicated} duplicated, {figures.errors} errors",
        f"set_nodes: {figures.moved_share:.1%} of channels moved onto the added shard; longest "
        f"unavailability of a moved channel: add {figures.move_outage_s['add']:.2f} s, remove "
        f"{figures.move_outage_s['remove']:.2f} s",
        f"forwarded enqueue: median {figures.forwarded_ms:.2f} ms against {figures.direct_ms:.2f} "
        f"ms direct (+{figures.forwarded_ms - figures.direct_ms:.2f} ms)",
    ]
    if figures.restart_outage_s:
        r = figures.restart_outage_s
        lines.append(
            f"rolling restart ({len(r)} SIGTERM hand-offs): longest unavailability of a channel"
            f" median {statistics.median(r) * 1000:.0f} ms, max {max(r) * 1000:.0f} ms;"
            f" {figures.restart_problems} broken promises"
        )
    return "\n".join(lines)


def cli(argv: list[str]) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="lionmq-bench-cluster-") as tmp:
        figures = run(args, Path(tmp))
    print(report(figures))
    print(f"({time.monotonic() - started:.0f} s; python -m bench cluster {' '.join(argv)})")
    if args.json is not None:
        doc: dict[str, Any] = {"command": f"python -m bench cluster {' '.join(argv)}"}
        doc.update(asdict(figures))
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(cli(sys.argv[1:]))
