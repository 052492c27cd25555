"""Messages: publish, consume, peek and get."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any, get_args

from lionmq import ConnectionFailed, LionMQError, Message, NewMessage
from lionmq.cli import output
from lionmq.cli.command import (
    EXIT_NACKED,
    EXIT_OK,
    Commands,
    Context,
    UsageError,
    duration_ms,
    json_value,
    positive_int,
)
from lionmq.cli.progress import Progress
from lionmq.models import MessageView
from lionmq.protocol import MAX_WAIT_MS, MessageState

PUBLISH_BATCH = 500
"""Messages per request when publishing a file (the progress bar moves once per request)."""
PRINT_BATCH = 100
"""Messages per dequeue when consume prints them (acked together once printed)."""
PAGE_MAX = 1000
"""The node's largest page of messages."""
PEEK_LIMIT = 20
"""Messages peek shows by default."""
PEEK_PAGES = 100
"""Pages one peek reads at most. A page filtered by state examines at most 10,000 messages
and may come back short, even empty, with a `next`: peek follows it (up to 1,000,000 messages
examined) rather than report "no delayed messages" while some lie further on."""
STATES: tuple[str, ...] = tuple(s.replace("_", "-") for s in get_args(MessageState))


def register(commands: Commands) -> None:
    p = commands.add(
        "publish",
        "publish messages (BODY, --file or stdin: one JSON value per line)",
        """
lionmq publish orders '{"sku": "A1", "qty": 2}'
lionmq publish orders '"a string"' --delay 30s --dedup order-42
lionmq publish orders --file orders.jsonl --dedup import-2026-11-21
some-program | lionmq publish orders
""",
        publish,
        description="Publish one message (BODY, a JSON value), or one per line of --file F or "
        'of stdin. Prints the id (--json: {"ids": [...]}). With --file or stdin, --dedup ID '
        "gives line n the dedup id ID-n: publishing the same file again within the node's "
        "DEDUP_WINDOW_MS stores nothing twice.",
    )
    p.add_argument("channel", metavar="CHANNEL")
    p.add_argument("body", metavar="BODY", nargs="?", help="the message body, as JSON")
    p.add_argument("--file", "-f", metavar="F", help="one JSON body per line ('-': stdin)")
    p.add_argument("--delay", type=duration_ms, metavar="DURATION", help="deliver after this")
    p.add_argument("--ttl", type=duration_ms, metavar="DURATION", help="dead-letter after this")
    p.add_argument("--dedup", metavar="ID", help="dedup id (a prefix, with --file or stdin)")
    p.add_argument("--header", action="append", default=[], metavar="KEY=VALUE", help="repeatable")

    p = commands.add(
        "consume",
        "take messages: print their bodies, or run a command on each",
        """
lionmq consume orders --max 10                      # print up to 10 bodies, ack them
lionmq consume orders --exec 'python handle.py'     # body on the command's stdin
lionmq consume orders --exec ./handle.sh --follow   # a worker: until Ctrl-C
""",
        consume,
        description="Takes messages from CHANNEL. Without --exec, prints each body as one "
        "line of JSON (--json: the whole message) and acks it once printed. With --exec CMD, "
        "runs CMD (through /bin/sh) for each message with the body as JSON on its stdin and "
        "LIONMQ_CHANNEL, LIONMQ_MESSAGE_ID, LIONMQ_ATTEMPT, LIONMQ_HEADERS in its environment; "
        "exit 0 acks the message, anything else nacks it (exit code 4 at the end). The lease "
        "is extended while the command runs. Stops after --max messages, or once none came "
        "for --wait (default 2s), or never with --follow. Ctrl-C or SIGTERM stops it: the "
        "running command is stopped and its message nacked at once.",
    )
    p.add_argument("channel", metavar="CHANNEL")
    p.add_argument("--exec", dest="command", metavar="CMD", help="run CMD for each message")
    p.add_argument("--max", type=positive_int, metavar="N", help="stop after N messages")
    p.add_argument(
        "--wait",
        type=duration_ms,
        default=2000,
        metavar="DURATION",
        help="stop once no message came for this long (default 2s)",
    )
    p.add_argument("--follow", action="store_true", help="never stop on an empty channel")
    p.add_argument(
        "--visibility",
        type=duration_ms,
        default=30_000,
        metavar="DURATION",
        help="lease of each message (default 30s; extended while --exec runs)",
    )
    p.add_argument(
        "--nack-delay",
        type=duration_ms,
        default=0,
        metavar="DURATION",
        help="a nacked message is ready again after this (default 0: at once)",
    )
    p.add_argument(
        "--timeout",
        type=duration_ms,
        metavar="DURATION",
        help="stop a --exec command still running after this and nack its message (default: "
        "none; its lease is extended as long as it runs)",
    )

    p = commands.add(
        "peek",
        "list messages without taking them",
        """
lionmq peek orders
lionmq peek orders.dlq --state ready --limit 100
lionmq peek orders --after 1882449093859475456     # the next page
""",
        peek,
        description="Lists CHANNEL's messages in id order without leasing or changing them: "
        "id, state, attempt, when enqueued, when due (delayed) or when the lease ends (in "
        "flight), and the body. When more remain, the --after to pass for the next page is "
        'printed on stderr (--json: "next").',
    )
    p.add_argument("channel", metavar="CHANNEL")
    p.add_argument("--state", choices=STATES, help="only messages in this state")
    p.add_argument(
        "--limit", type=positive_int, default=PEEK_LIMIT, metavar="N", help=f"default {PEEK_LIMIT}"
    )
    p.add_argument("--after", metavar="ID", help="start past this id")

    p = commands.add(
        "get",
        "show one message (with its history on a channel that traces)",
        """
lionmq get orders.dlq 1882449093859475456
lionmq set orders --trace on          # record histories from now on
""",
        get,
        description="Shows one message: state, attempt, times, headers, body, and its history "
        "(enqueued, deliveries with the consumer's address, nacks, lease expiries, "
        "dead-lettering, redrive) when the channel traces (`lionmq set CHANNEL --trace on`).",
    )
    p.add_argument("channel", metavar="CHANNEL")
    p.add_argument("id", metavar="ID")


# -- publish --------------------------------------------------------------------------------


def publish(ctx: Context, args: argparse.Namespace) -> int:
    headers = _headers(args.header)
    if args.body is not None:
        if args.file is not None:
            raise UsageError("give BODY or --file, not both")
        body = json_value(args.body, "BODY")
        ids = [
            ctx.client.enqueue(args.channel, body, **_message_options(args, headers, args.dedup))
        ]
    else:
        where, lines, messages = _read_messages(args, headers)
        ids = []
        start = size = 0
        try:
            with Progress(f"publishing to {args.channel}", len(messages), ctx.err) as bar:
                for start in range(0, len(messages), PUBLISH_BATCH):
                    batch = messages[start : start + PUBLISH_BATCH]
                    size = len(batch)
                    ids += ctx.client.enqueue_many(args.channel, batch)
                    bar.advance(size)
        except (LionMQError, KeyboardInterrupt) as exc:  # after the bar is wiped
            _say_what_was_published(exc, where, lines, start, size, args.dedup, ctx)
            raise
    if ctx.json:
        ctx.emit({"ids": ids})
    elif args.body is not None:
        ctx.out.write(ids[0] + "\n")
    else:
        ctx.out.write(f"published {output.count(len(ids), 'message')} to {args.channel}\n")
    return EXIT_OK


def _headers(given: list[str]) -> dict[str, str] | None:
    headers: dict[str, str] = {}
    for item in given:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--header {item!r}: give KEY=VALUE")
        headers[key] = value
    return headers or None


def _message_options(
    args: argparse.Namespace, headers: dict[str, str] | None, dedup: str | None
) -> dict[str, Any]:
    given = {"headers": headers, "delay_ms": args.delay, "ttl_ms": args.ttl, "dedup_id": dedup}
    return {k: v for k, v in given.items() if v is not None}


def _say_what_was_published(
    exc: LionMQError | KeyboardInterrupt,
    where: str,
    lines: list[int],
    start: int,
    size: int,
    dedup: str | None,
    ctx: Context,
) -> None:
    """A batch of `size` failed (or Ctrl-C came) after `start` messages were published: say
    how many were and from which line on the batch failed (in `exc`'s detail, or on stderr).
    The node's detail counts the batch's messages from 0 ("message 200"): say which line that
    is. Without this, a refusal past the first batch ("nothing was stored") read as if the
    whole file had been refused."""
    if not size or (not start and isinstance(exc, ConnectionFailed)):
        return  # nothing sent, or no node reached at all: the error says it all
    first, last = lines[start], lines[start + size - 1]
    total = output.count(len(lines), "message")
    done = f"published {start} of {total} (up to line {lines[start - 1]}); " if start else ""
    # No answer came: the node may have stored the batch (the client's retries carry its
    # dedup ids, so a stored batch is not stored twice, but the outcome is unknown).
    again = f"; run it again with --dedup {dedup} to publish the rest" if dedup else ""
    if isinstance(exc, KeyboardInterrupt):
        ctx.err.write(
            f"\nlionmq: interrupted: {where}: {done}lines {first}-{last} may not be "
            f"published{again}"
        )  # main's own newline ends the line
        return
    fate = "may not be published" if isinstance(exc, ConnectionFailed) else "not published"
    exc.detail = (
        f"{where}: {done}lines {first}-{last} {fate} ({exc.detail or exc.title}; its "
        f"message 0 is line {first}){again}"
    )


def _read_messages(
    args: argparse.Namespace, headers: dict[str, str] | None
) -> tuple[str, list[int], list[NewMessage]]:
    """Where they come from, each message's line number, the messages. Every line is parsed
    before anything is sent: a bad line stops the command with nothing published. Blank lines
    are skipped but keep their number (for dedup ids). Read as bytes and split at \n, \r
    and \r\n only: str.splitlines() also splits at U+2028 and others, which JSON allows raw
    in a string; and a line not UTF-8 is named, not a traceback."""
    name = args.file or "-"
    if name == "-":
        if sys.stdin.isatty():
            raise UsageError("give BODY or --file F, or pipe one JSON body per line to stdin")
        lines = sys.stdin.buffer.read().splitlines()
        where = "stdin"
    else:
        try:
            with open(name, "rb") as f:
                lines = f.read().splitlines()
        except OSError as exc:
            raise UsageError(f"cannot read {name}: {exc.strerror}") from None
        where = name
    numbers, messages = [], []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        body = json_value(line, f"{where} line {number}")
        dedup = f"{args.dedup}-{number}" if args.dedup else None
        numbers.append(number)
        messages.append(NewMessage(body, **_message_options(args, headers, dedup)))
    if not messages:
        raise UsageError(f"{where} has no message (one JSON body per line)")
    return where, numbers, messages


# -- consume --------------------------------------------------------------------------------


def consume(ctx: Context, args: argparse.Namespace) -> int:
    tally = {"acked": 0, "nacked": 0, "lost": 0}
    # A worker under a supervisor is stopped with SIGTERM: the same as Ctrl-C.
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        _consume(ctx, args, tally)
    except KeyboardInterrupt:  # a message in hand was nacked; say what was done
        _summary(ctx, args.channel, tally)
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
    _summary(ctx, args.channel, tally)
    return EXIT_NACKED if tally["nacked"] or tally["lost"] else EXIT_OK


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _summary(ctx: Context, channel: str, tally: dict[str, int]) -> None:
    handled = tally["acked"] + tally["nacked"] + tally["lost"]
    lost = f", {tally['lost']} not acked in time (delivered again)" if tally["lost"] else ""
    ctx.err.write(
        f"consumed {output.count(handled, 'message')} from {channel}: "
        f"{tally['acked']} acked, {tally['nacked']} nacked{lost}\n"
    )


def _consume(ctx: Context, args: argparse.Namespace, tally: dict[str, int]) -> None:
    client, channel = ctx.client, args.channel
    handled = 0
    idle_since = time.monotonic()
    while args.max is None or handled < args.max:
        if args.follow:
            wait_ms = MAX_WAIT_MS
        else:
            wait_ms = min(args.wait - round((time.monotonic() - idle_since) * 1000), MAX_WAIT_MS)
            if wait_ms < 0:
                break
        left = PRINT_BATCH if args.max is None else args.max - handled
        batch = min(left, 1 if args.command else PRINT_BATCH)
        messages = client.dequeue(channel, batch, wait_ms=wait_ms, visibility_ms=args.visibility)
        if not messages:
            continue
        if args.command:
            for message in messages:
                tally[_run(args.command, message, args, ctx)] += 1
        else:
            receipts = [m.receipt for m in messages]
            try:
                for message in messages:
                    line = output.compact(_delivered(message) if ctx.json else message.body)
                    ctx.out.write(line + "\n")
                ctx.out.flush()  # printed before acked: never lost to a reader gone
            except BrokenPipeError:  # `| head`: what it did not read goes back at once
                client.nack(channel, receipts)
                raise
            stale = len(client.ack(channel, receipts).stale)
            if stale:  # printed too slowly (a reader that waits): their leases ended first
                ctx.err.write(
                    f"lionmq: {output.count(stale, 'message')} printed after its lease ended: "
                    "delivered again (raise --visibility)\n"
                )
            tally["acked"] += len(messages) - stale
            tally["lost"] += stale
        handled += len(messages)
        idle_since = time.monotonic()


def _delivered(message: Message) -> dict[str, Any]:
    return {
        "id": message.id,
        "attempt": message.attempt,
        "enqueued_at": message.enqueued_at,
        "headers": message.headers,
        "body": message.body,
    }


def _run(command: str, message: Message, args: argparse.Namespace, ctx: Context) -> str:
    """Runs `command` on one message and settles it: ack on exit 0, else nack (and after
    --timeout, stopped and nacked). The lease is extended whenever half of it has gone by.
    Ctrl-C nacks the message, then stops. Returns "acked", "nacked", or "lost" (the lease
    ended before the ack: the message is delivered again)."""
    visibility_ms: int = args.visibility
    env = {
        **os.environ,
        "LIONMQ_CHANNEL": message.channel,
        "LIONMQ_MESSAGE_ID": message.id,
        "LIONMQ_ATTEMPT": str(message.attempt),
        "LIONMQ_HEADERS": output.compact(message.headers),
    }
    # The body from a file, not a pipe: a write of a body larger than the pipe's buffer would
    # block until the command read it (or exited), and the lease, not yet extended, could end.
    with tempfile.TemporaryFile() as body:
        body.write(output.compact(message.body).encode() + b"\n")
        body.seek(0)
        # The command's stdout and stderr are ours: what it prints is what the user sees. Its
        # own process group: stopping it stops what it started too (`sh -c` leaves children).
        proc = subprocess.Popen(command, shell=True, stdin=body, env=env, process_group=0)
    started = time.monotonic()
    timeout_s = None if args.timeout is None else args.timeout / 1000
    code: int | None = None
    try:
        while code is None:
            wait_s = visibility_ms / 2000
            if timeout_s is not None:
                wait_s = max(0.0, min(wait_s, started + timeout_s - time.monotonic()))
            try:
                code = proc.wait(timeout=wait_s)
            except subprocess.TimeoutExpired:
                if timeout_s is not None and time.monotonic() - started >= timeout_s:
                    _stop(proc)
                    ctx.err.write(
                        f"lionmq: {command!r} still ran after {output.span(args.timeout)}: "
                        f"stopped, message {message.id} nacked\n"
                    )
                    message.nack(delay_ms=args.nack_delay)
                    return "nacked"
                message.extend(visibility_ms)
    except BaseException:  # Ctrl-C, SIGTERM: the command stops too, its message goes back
        _stop(proc)
        message.nack(delay_ms=args.nack_delay)
        ctx.err.write(f"lionmq: interrupted: message {message.id} nacked\n")
        raise
    if code == 0:
        if message.ack().stale:
            ctx.err.write(
                f"lionmq: message {message.id}: its lease had ended before the ack (it is "
                "delivered again, unless purged or moved meanwhile)\n"
            )
            return "lost"
        return "acked"
    ctx.err.write(f"lionmq: {command!r} exited with {code}: message {message.id} nacked\n")
    message.nack(delay_ms=args.nack_delay)
    return "nacked"


STOP_GRACE_S = 5.0
"""How long a stopped command gets to exit on SIGTERM before it is killed."""


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


# -- peek and get ---------------------------------------------------------------------------


def peek(ctx: Context, args: argparse.Namespace) -> int:
    state: Any = args.state.replace("-", "_") if args.state else None
    found: list[MessageView] = []
    after: str | None = args.after
    for _ in range(PEEK_PAGES):
        page = ctx.client.peek(
            args.channel, state=state, after=after, limit=min(args.limit - len(found), PAGE_MAX)
        )
        found += page.messages
        after = page.next
        if after is None or len(found) >= args.limit:
            break
    if ctx.json:
        ctx.emit({"channel": args.channel, "messages": found, "next": after})
        return EXIT_OK
    now = output.now_ms()
    if not found:
        ctx.out.write(f"no {args.state or ''} messages in {args.channel}\n".replace("  ", " "))
    else:
        output.table(
            ("ID", "STATE", "ATTEMPT", "ENQUEUED", "DUE / LEASE ENDS", "BODY"),
            (
                (
                    m.id,
                    m.state.replace("_", "-"),
                    m.attempt,
                    output.relative(m.enqueued_at, now),
                    output.relative(m.available_at or m.lease_deadline, now),
                    output.compact(m.body),
                )
                for m in found
            ),
            ctx.out,
        )
    if after is not None:
        # The same question, from where this page ended.
        same = f" --state {args.state}" if args.state else ""
        if args.limit != PEEK_LIMIT:
            same += f" --limit {args.limit}"
        ctx.err.write(f"more: lionmq peek {args.channel}{same} --after {after}\n")
    return EXIT_OK


def _detail(key: str, value: object) -> str:
    """An event's detail as people read it: times as UTC clock times, delays as spans (and
    `delay_ms=500` as `delay=500ms`)."""
    if isinstance(value, int) and not isinstance(value, bool):
        if key.endswith(("_at", "_deadline")):
            return f"{key}={output.clock_time(value)}"
        if key.endswith("_ms"):
            return f"{key.removesuffix('_ms')}={output.span(value)}"
    return f"{key}={value if isinstance(value, str) else output.compact(value)}"


def get(ctx: Context, args: argparse.Namespace) -> int:
    m = ctx.client.get_message(args.channel, args.id)
    if ctx.json:
        ctx.emit(m)
        return EXIT_OK
    now = output.now_ms()
    fields: list[tuple[str, object]] = [
        ("id", m.id),
        ("channel", args.channel),
        ("state", m.state.replace("_", "-")),
        ("attempt", m.attempt),
        ("enqueued", output.timestamp(m.enqueued_at, now)),
    ]
    if m.available_at is not None:
        fields.append(("due", output.timestamp(m.available_at, now)))
    if m.lease_deadline is not None:
        fields.append(("lease ends", output.timestamp(m.lease_deadline, now)))
    fields.append(("expires", output.timestamp(m.expires_at, now)))
    fields += [(f"header {output.shown(k)}", v) for k, v in sorted((m.headers or {}).items())]
    output.pairs(fields, ctx.out)
    ctx.out.write("body\n" + output.pretty(m.body) + "\n")
    if m.history is None:
        ctx.out.write("history  not recorded (lionmq set CHANNEL --trace on)\n")
    else:
        ctx.out.write("history\n")
        output.table(
            ("AT", "EVENT", "DETAILS"),
            (
                (
                    output.timestamp(event.get("at"), now),
                    event.get("event"),
                    " ".join(_detail(k, v) for k, v in event.items() if k not in ("at", "event")),
                )
                for event in m.history
            ),
            ctx.out,
            width=None,
        )
    return EXIT_OK
