"""Channels: channels, stats, set, purge and redrive."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any, TextIO

from lionmq import ChannelInfo, ChannelOptions, LionMQError
from lionmq.cli import output
from lionmq.cli.command import (
    EXIT_OK,
    EXIT_PROBLEM,
    Commands,
    Context,
    UsageError,
    duration_ms,
    positive_float,
    positive_int,
)
from lionmq.cli.progress import Progress

REDRIVE_BATCH = 1000
"""Messages per redrive call when no --rate paces it (the bar moves once per call)."""
REDRIVE_MAX = 10_000
"""The most one call may move (the node's bound)."""
REDRIVE_CALL_S = 2.0
"""With --rate, each call moves about this many seconds' worth, so the bar keeps moving."""
NONE = ("none", "off", "null")


def register(commands: Commands) -> None:
    p = commands.add(
        "channels",
        "list the channels with their message counts",
        "lionmq channels\nlionmq channels --json | jq '.[].name'",
        channels,
    )

    p = commands.add(
        "stats",
        "a channel's settings, counts and totals; without CHANNEL, the node's",
        "lionmq stats orders\nlionmq stats            # node: uptime, channels, sums",
        stats,
    )
    p.add_argument("channel", metavar="CHANNEL", nargs="?")

    p = commands.add(
        "set",
        "change a channel's settings (creates it if needed)",
        """
lionmq set orders --max-attempts 5 --visibility 1m --dead-letter orders.dlq
lionmq set orders --ttl none --max-length 100000 --trace on
""",
        set_settings,
        description="Changes the settings given and leaves the others; creates the channel "
        "with the node's defaults first if it does not exist. 'none' clears --dead-letter "
        "(dead messages are dropped), --max-length and --ttl. Prints the settings.",
    )
    p.add_argument("channel", metavar="CHANNEL")
    p.add_argument("--max-attempts", type=positive_int, metavar="N")
    p.add_argument("--visibility", type=duration_ms, metavar="DURATION", help="default lease")
    p.add_argument("--dead-letter", metavar="CHANNEL|none")
    p.add_argument("--max-length", metavar="N|none")
    p.add_argument("--ttl", metavar="DURATION|none")
    p.add_argument("--trace", choices=("on", "off"), help="record each message's history")

    p = commands.add(
        "purge",
        "drop every message of a channel (asks first)",
        "lionmq purge orders\nlionmq purge orders --yes      # in a script: no question",
        purge,
        description="Drops every message of CHANNEL, in flight too, after asking on the "
        "terminal. Without a terminal to ask on it refuses unless --yes is given.",
    )
    p.add_argument("channel", metavar="CHANNEL")
    p.add_argument("--yes", "-y", action="store_true", help="do not ask")

    p = commands.add(
        "redrive",
        "move dead letters back (to where they died, or --to a channel)",
        """
lionmq redrive orders.dlq                     # each back to its x-dead-letter-channel
lionmq redrive orders.dlq --to orders-retry --rate 50
""",
        redrive,
        description="Moves CHANNEL's ready messages, oldest first, back to the channel each "
        "died in (its x-dead-letter-channel header; messages without it are skipped) or to "
        "--to, with attempt counts reset and the dead-letter headers kept. Calls the node "
        "until nothing is left; each call moves its batch atomically, so an interrupted "
        "redrive loses nothing and running it again moves only what is left.",
    )
    p.add_argument("channel", metavar="CHANNEL")
    p.add_argument("--to", metavar="CHANNEL", help="move every message there")
    p.add_argument("--rate", type=positive_float, metavar="N", help="messages per second")
    p.add_argument("--batch", type=positive_int, metavar="N", help="messages per call")


def channels(ctx: Context, args: argparse.Namespace) -> int:
    found = sorted(ctx.client.list_channels(), key=lambda c: c.name)
    if ctx.json:
        ctx.emit(found)
    elif not found:
        ctx.out.write("no channels\n")
    else:
        output.table(
            ("CHANNEL", "READY", "DELAYED", "IN-FLIGHT", "OLDEST READY", "DEAD LETTER"),
            (
                (
                    c.name,
                    c.counts.ready,
                    c.counts.delayed,
                    c.counts.in_flight,
                    None if c.oldest_ready_age_ms is None else output.span(c.oldest_ready_age_ms),
                    c.settings.dead_letter,
                )
                for c in found
            ),
            ctx.out,
        )
    return EXIT_OK


def stats(ctx: Context, args: argparse.Namespace) -> int:
    if args.channel is None:
        return _node_stats(ctx)
    info = ctx.client.get_channel(args.channel)
    if ctx.json:
        ctx.emit(info)
    else:
        _show(info, ctx)
    return EXIT_OK


def _show(info: ChannelInfo, ctx: Context) -> None:
    s, c, t = info.settings, info.counts, info.totals
    output.pairs(
        [
            ("channel", info.name),
            ("ready", c.ready),
            ("delayed", c.delayed),
            ("in flight", c.in_flight),
            ("oldest ready", _age(info.oldest_ready_age_ms)),
            ("visibility", _ms(s.visibility_ms)),
            ("max attempts", s.max_attempts),
            ("dead letter", s.dead_letter or "none (dropped)"),
            ("max length", s.max_length or "none"),
            ("ttl", _ms(s.ttl_ms) or "none"),
            ("trace", "on" if s.trace else "off"),
            (
                "since start",
                f"{t.enqueued} enqueued, {t.dequeued} dequeued, {t.acked} acked, "
                f"{t.nacked} nacked, {t.redelivered} redelivered, "
                f"{t.dead_lettered} dead-lettered",
            ),
        ],
        ctx.out,
    )


def _ms(value: int | None) -> str | None:
    return None if value is None else output.span(value)


def _age(value: int | None) -> str:
    return "-" if value is None else output.span(value)


def _node_stats(ctx: Context) -> int:
    health = ctx.client.health()
    found = ctx.client.list_channels()
    counts = {
        key: sum(getattr(c.counts, key) for c in found) for key in ("ready", "delayed", "in_flight")
    }
    totals = {
        key: sum(getattr(c.totals, key) for c in found)
        for key in ("enqueued", "dequeued", "acked", "nacked", "redelivered", "dead_lettered")
    }
    if ctx.json:
        ctx.emit({"node": health, "channels": len(found), "counts": counts, "totals": totals})
        return EXIT_OK
    uptime = health.get("uptime_s")
    output.pairs(
        [
            ("node", health.get("node_id")),
            ("status", health.get("status")),
            ("uptime", None if uptime is None else output.span(round(uptime * 1000))),
            ("channels", len(found)),
            ("ready", counts["ready"]),
            ("delayed", counts["delayed"]),
            ("in flight", counts["in_flight"]),
            ("since start", ", ".join(f"{v} {k.replace('_', '-')}" for k, v in totals.items())),
        ],
        ctx.out,
    )
    return EXIT_OK


def set_settings(ctx: Context, args: argparse.Namespace) -> int:
    settings: ChannelOptions = {}
    if args.max_attempts is not None:
        settings["max_attempts"] = args.max_attempts
    if args.visibility is not None:
        settings["visibility_ms"] = args.visibility
    if args.dead_letter is not None:
        settings["dead_letter"] = None if args.dead_letter.lower() in NONE else args.dead_letter
    if args.max_length is not None:
        settings["max_length"] = _or_none(args.max_length, "--max-length", positive_int)
    if args.ttl is not None:
        settings["ttl_ms"] = _or_none(args.ttl, "--ttl", duration_ms)
    if args.trace is not None:
        settings["trace"] = args.trace == "on"
    if not settings:
        raise UsageError("nothing to set: give at least one setting (lionmq set --help)")
    info = ctx.client.put_channel(args.channel, **settings)
    if ctx.json:
        ctx.emit(info)
    else:
        _show(info, ctx)
    return EXIT_OK


def _or_none(text: str, option: str, parse: Any) -> Any:
    if text.lower() in NONE:
        return None
    try:
        return parse(text)
    except argparse.ArgumentTypeError as exc:
        raise UsageError(f"{option}: {exc}") from None


def purge(ctx: Context, args: argparse.Namespace) -> int:
    channel = args.channel
    if not args.yes:
        c = ctx.client.get_channel(channel).counts  # also: an unknown channel fails here
        stdin = _terminal_input()
        if stdin is None:
            raise UsageError(f"refusing to purge {channel} without a terminal to ask: add --yes")
        ctx.err.write(
            f"purge every message of {channel} ({c.ready} ready, {c.delayed} delayed, "
            f"{c.in_flight} in flight)? [y/N] "
        )
        ctx.err.flush()
        if stdin.readline().strip().lower() not in ("y", "yes"):
            ctx.err.write("not purged\n")
            return EXIT_PROBLEM
    with Progress(f"purging {channel}", None, ctx.err, ticking=True):
        purged = ctx.client.purge(channel)
    if ctx.json:
        ctx.emit({"channel": channel, "purged": purged})
    else:
        ctx.out.write(f"purged {output.count(purged, 'message')} from {channel}\n")
    return EXIT_OK


def _terminal_input() -> TextIO | None:
    return sys.stdin if sys.stdin is not None and sys.stdin.isatty() else None


def _say_what_was_redriven(
    exc: LionMQError | KeyboardInterrupt, channel: str, moved: int, err: TextIO
) -> None:
    """A redrive stopped midway (the node failed, Ctrl-C): say what it had moved, and that
    running it again is safe. The call under way may have moved a batch more."""
    done = (
        f"redrive of {channel} stopped after moving {output.count(moved, 'message')} (perhaps "
        "a batch more); running it again moves only what is left"
    )
    if isinstance(exc, KeyboardInterrupt):
        err.write(f"\nlionmq: {done}")  # main's own newline ends the line
    else:
        exc.detail = f"{exc.detail or exc.title}; {done}"


def redrive(ctx: Context, args: argparse.Namespace) -> int:
    client, channel = ctx.client, args.channel
    if args.batch:
        per_call = args.batch
    elif args.rate:
        per_call = max(1, min(REDRIVE_MAX, round(args.rate * REDRIVE_CALL_S)))
    else:
        per_call = REDRIVE_BATCH
    total = client.get_channel(channel).counts.ready
    moved = calls = 0
    skipped = remaining = 0
    try:
        with Progress(f"redriving {channel}", total, ctx.err) as bar:
            # Bounded: every call but the last moves at least one message, and the source
            # held `total` (plus what arrives meanwhile; the bound leaves room for that).
            started = time.monotonic()
            for _ in range(2 * (total // per_call) + 10):
                if args.rate:
                    # The node paces within a call and starts each call at once: wait out
                    # this call's share first, or every call would add a batch's worth.
                    time.sleep(max(0.0, started + moved / args.rate - time.monotonic()))
                result = client.redrive(channel, to=args.to, max=per_call, rate=args.rate)
                calls += 1
                moved += result.moved
                skipped, remaining = result.skipped, result.remaining
                bar.advance(result.moved)
                if result.moved == 0 or result.remaining == 0:
                    break
    except (LionMQError, KeyboardInterrupt) as exc:  # after the bar is wiped
        _say_what_was_redriven(exc, channel, moved, ctx.err)
        raise
    summary = {"moved": moved, "skipped": skipped, "remaining": remaining, "calls": calls}
    if ctx.json:
        ctx.emit(summary)
        return EXIT_OK
    where = f"to {args.to}" if args.to else "back to their channels"
    line = f"moved {output.count(moved, 'message')} from {channel} {where}"
    if skipped:
        line += f"; {skipped} skipped (no x-dead-letter-channel header: use --to)"
    ctx.out.write(f"{line}; {remaining} left\n")
    return EXIT_OK
