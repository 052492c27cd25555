"""The cluster: nodes show, nodes set and nodes handoff."""

from __future__ import annotations

import argparse

from lionmq import ClusterInfo, Topology
from lionmq.cli import output
from lionmq.cli.command import EXIT_OK, Commands, Context, UsageError


def register(commands: Commands) -> None:
    group = commands.add(
        "nodes",
        "show or change the cluster: shards, owners, nodes",
        "lionmq nodes show\nlionmq nodes set --shard http://10.0.0.1:8000=http://10.0.0.2:8000",
        None,
    )
    sub = group.add_subparsers(dest="nodes_command", metavar="COMMAND", required=True)

    commands.add(
        "show",
        "the shards (owner, epoch, backups) and nodes (role, status, lag)",
        "lionmq nodes show --url http://10.0.0.1:8000",
        show,
        sub=sub,
    )

    p = commands.add(
        "set",
        "store a new topology: one --shard per shard (needs LIONMQ_ADMIN_TOKEN)",
        """
lionmq nodes set \\
  --shard http://10.0.0.1:8000=http://10.0.0.2:8000 \\
  --shard http://10.0.0.3:8000=http://10.0.0.4:8000,http://10.0.0.5:8000
""",
        set_nodes,
        sub=sub,
        description="Stores the next topology version: each --shard PRIMARY[=BACKUP[,BACKUP]] "
        "is one shard, a primary and its backups. Shards that keep a node keep their id; "
        "the channels of shards added or removed move. Every node applies it on its next "
        "heartbeat. Prints the stored topology.",
    )
    p.add_argument(
        "--shard",
        action="append",
        required=True,
        metavar="PRIMARY[=BACKUP[,BACKUP]]",
        help="one shard (repeat for each)",
    )

    p = commands.add(
        "handoff",
        "hand a shard from its owner to an up-to-date backup (needs LIONMQ_ADMIN_TOKEN)",
        "lionmq nodes handoff s1\nlionmq nodes handoff s1 --to http://10.0.0.2:8000",
        handoff,
        sub=sub,
        description="Asks the shard's owner to hand it to an up-to-date backup (or --to "
        "one), as a rolling restart does: the backup takes the ownership lease at once. "
        "Prints who had it, who has it and the new epoch.",
    )
    p.add_argument("shard", metavar="SHARD")
    p.add_argument("--to", metavar="URL", help="the backup to hand it to")


def show(ctx: Context, args: argparse.Namespace) -> int:
    info = ctx.client.cluster()
    if ctx.json:
        ctx.emit(info)
        return EXIT_OK
    _shards(info, ctx)
    ctx.out.write("\n")
    output.table(
        ("NODE", "ID", "ROLE", "SHARDS", "STATUS", "HEARTBEAT", "LAG"),
        (
            (
                n.url,
                n.id,
                n.role,
                ",".join(n.shards) or None,
                n.status,
                None if n.heartbeat_age_ms is None else output.span(n.heartbeat_age_ms) + " ago",
                ",".join(f"{s}:{lag}" for s, lag in sorted(n.lag.items())) if n.lag else None,
            )
            for n in info.nodes
        ),
        ctx.out,
        width=None,
    )
    return EXIT_OK


def _shards(info: ClusterInfo, ctx: Context) -> None:
    who = f", answered by {info.node.url} ({info.node.role})" if info.node else ""
    ctx.out.write(f"topology version {info.version}{who}\n\n")
    output.table(
        ("SHARD", "PRIMARY", "BACKUPS", "OWNER", "EPOCH", "LEASE", "CHANNELS"),
        (
            (
                s.id,
                s.primary,
                ",".join(s.backups) or None,
                s.owner or "none",
                s.epoch,
                None if s.lease_expires_in_ms is None else output.span(s.lease_expires_in_ms),
                s.channels,
            )
            for s in info.shards
        ),
        ctx.out,
        width=None,
    )


def set_nodes(ctx: Context, args: argparse.Namespace) -> int:
    shards = []
    for spec in args.shard:
        primary, _, backups = spec.partition("=")
        if not primary:
            raise UsageError(f"--shard {spec!r}: give PRIMARY[=BACKUP[,BACKUP]]")
        shards.append({"primary": primary, "backups": [b for b in backups.split(",") if b.strip()]})
    ctx.require_admin()
    topology = ctx.client.set_nodes(shards)
    if ctx.json:
        ctx.emit(topology)
    else:
        _topology(topology, ctx)
    return EXIT_OK


def _topology(topology: Topology, ctx: Context) -> None:
    ctx.out.write(f"stored topology version {topology.version}\n")
    output.table(
        ("SHARD", "PRIMARY", "BACKUPS"),
        ((s.id, s.primary, ",".join(s.backups) or None) for s in topology.shards),
        ctx.out,
        width=None,
    )


def handoff(ctx: Context, args: argparse.Namespace) -> int:
    ctx.require_admin()
    result = ctx.client.handoff(args.shard, to=args.to)
    if ctx.json:
        ctx.emit(result)
    else:
        ctx.out.write(
            f"shard {result.shard} handed from {result.from_} to {result.to} "
            f"(epoch {result.epoch}) in {result.took_ms} ms\n"
        )
    return EXIT_OK
