"""The `lionmq` command, run through its installed entry point against a real node process,
as a user types it (subprocesses: each costs ~0.3 s, so each test groups its assertions)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

import pytest
from cli_support import LIONMQ, cli_env, lionmq, lionmq_here, lionmq_on_tty
from lionmq import Client, NewMessage
from lionmq.cli.main import build_parser, main

from tests.conftest import NodeProcess, free_port, wait_until

TOKEN = "cli-api-token"


@pytest.fixture(scope="module")
def mq_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    node = NodeProcess(tmp_path_factory.mktemp("cli-node"), API_TOKEN=TOKEN).start()
    yield node
    node.kill9()


@pytest.fixture(scope="module")
def env(mq_node: NodeProcess) -> dict[str, str]:
    return cli_env(LIONMQ_URL=mq_node.url, LIONMQ_TOKEN=TOKEN)


@pytest.fixture(scope="module")
def mq(mq_node: NodeProcess) -> Iterator[Client]:
    with Client(mq_node.url, token=TOKEN) as client:
        yield client


def test_publish_then_consume_round_trip(env: dict[str, str], mq: Client, tmp_path: Path) -> None:
    one = lionmq("publish", "rt", '{"sku": "A1"}', env=env)
    assert one.code == 0 and one.err == ""
    assert one.out.strip().isdigit()  # the id, alone on its line

    lines = tmp_path / "bodies.jsonl"
    lines.write_text('{"n": 1}\n\n[2]\n"three"\n')
    first = lionmq("publish", "rt", "--file", str(lines), "--dedup", "imp", "--json", env=env)
    again = lionmq_here("publish", "rt", "--file", str(lines), "--dedup", "imp", "--json", env=env)
    assert first.code == again.code == 0
    assert first.err == ""  # stderr is no terminal: no progress bar
    # Same dedup ids (imp-1, imp-3, imp-4): the second run stored nothing and got the same ids.
    assert json.loads(first.out)["ids"] == json.loads(again.out)["ids"]
    assert len(json.loads(first.out)["ids"]) == 3

    piped = lionmq("publish", "rt", "--header", "source=cli", env=env, input='"from stdin"\n')
    assert (piped.code, piped.out) == (0, "published 1 message to rt\n")

    listed = lionmq_here("channels", "--json", env=env)
    (rt,) = [c for c in json.loads(listed.out) if c["name"] == "rt"]
    assert rt["counts"]["ready"] == 5

    printed = lionmq("consume", "rt", "--max", "4", "--wait", "1s", env=env)
    assert printed.code == 0
    assert printed.out.splitlines() == ['{"sku":"A1"}', '{"n":1}', "[2]", '"three"']
    assert printed.err == "consumed 4 messages from rt: 4 acked, 0 nacked\n"

    whole = lionmq("consume", "rt", "--json", "--wait", "300ms", env=env)
    (message,) = [json.loads(line) for line in whole.out.splitlines()]
    assert message["body"] == "from stdin" and message["headers"] == {"source": "cli"}
    assert message["attempt"] == 1
    info = mq.get_channel("rt")
    assert (info.counts.ready, info.counts.in_flight, info.totals.acked) == (0, 0, 5)


def test_consume_exec_acks_on_exit_0_nacks_otherwise_and_extends_leases(
    env: dict[str, str], mq: Client
) -> None:
    mq.enqueue_many("ex", ["ok", "fail", "slow"])
    # "slow" outlasts its 1 s lease: acked all the same because the lease is extended.
    script = (
        'read body; echo "$LIONMQ_ATTEMPT $LIONMQ_CHANNEL $body"; '
        "case $body in *slow*) sleep 1.6;; *fail*) exit 3;; esac"
    )
    ran = lionmq(
        "consume", "ex", "--exec", script, "--max", "3", "--visibility", "1s",
        "--nack-delay", "100ms", env=env,
    )  # fmt: skip
    assert ran.code == 4  # a command failed: its message was nacked
    assert ran.out.splitlines() == ['1 ex "ok"', '1 ex "fail"', '1 ex "slow"']
    assert "exited with 3: message" in ran.err
    assert ran.err.endswith("consumed 3 messages from ex: 2 acked, 1 nacked\n")
    info = mq.get_channel("ex")
    assert (info.counts.ready + info.counts.delayed, info.counts.in_flight) == (1, 0)
    assert info.totals.acked == 2
    assert info.totals.redelivered == 0  # "slow" never went back while its command ran
    (again,) = mq.dequeue("ex", 10, wait_ms=2000)
    assert (again.body, again.attempt) == ("fail", 2)
    again.ack()


def test_consume_exec_a_large_body_a_hung_command_and_a_lost_lease(
    env: dict[str, str], mq: Client
) -> None:
    # A body larger than a pipe's buffer, to a command that reads it only after its lease
    # would have ended: the lease is extended meanwhile (writing the body to a pipe blocked
    # until the command read it, so the lease ended and the ack was stale, yet counted acked).
    mq.enqueue("xl", "x" * 200_000)
    big = lionmq(
        "consume", "xl", "--max", "1", "--visibility", "1s", "--exec", "sleep 1.5; wc -c",
        env=env,
    )  # fmt: skip
    assert (big.code, big.out.strip()) == (0, "200003"), big.err
    info = mq.get_channel("xl")
    assert (info.totals.acked, info.totals.redelivered, info.counts.ready) == (1, 0, 0)
    # A command that hangs is stopped after --timeout and its message nacked.
    mq.enqueue("xl", "hang")
    hung = lionmq_here(
        "consume", "xl", "--max", "1", "--timeout", "300ms", "--exec", "sleep 30", env=env
    )
    assert hung.code == 4 and "'sleep 30' still ran after 300ms: stopped" in hung.err, hung.err
    info = mq.get_channel("xl")
    assert (info.totals.nacked, info.counts.ready) == (1, 1)
    # The message is gone before the ack (the command purges its channel): not counted acked.
    purge = f"{LIONMQ} purge xl --yes"
    lost = lionmq_here("consume", "xl", "--max", "1", "--exec", purge, env=env)
    assert lost.code == 4, lost.err
    assert "its lease had ended before the ack" in lost.err
    assert lost.err.endswith(
        "consumed 1 message from xl: 0 acked, 0 nacked, 1 not acked in time (delivered again)\n"
    )


def test_what_a_publisher_wrote_cannot_drive_the_terminal(env: dict[str, str], mq: Client) -> None:
    # Header names and values are the publisher's: shown escaped (as JSON
    # strings) when they hold control characters, never raw (an escape sequence, a newline
    # forging a line of the output).
    (msg_id,) = mq.enqueue_many(
        "esc",
        [
            NewMessage(
                "\x1b[31mred",
                headers={"k\x1b[2J": "v\x1b]0;pwned\x07\nstate  acked", "plain": "café ok"},
            )
        ],
    )
    for shown in (lionmq_here("get", "esc", msg_id, env=env), lionmq_here("peek", "esc", env=env)):
        assert shown.code == 0 and "\x1b" not in shown.out and "\x07" not in shown.out, shown.out
    lines = lionmq_here("get", "esc", msg_id, env=env).out.splitlines()
    assert 'header "k\\u001b[2J"  "v\\u001b]0;pwned\\u0007\\nstate  acked"' in lines
    assert ["header", "plain", "café", "ok"] in [line.split() for line in lines]
    assert not any(line.startswith("state  acked") for line in lines)


def test_errors_are_one_line_with_distinct_exit_codes(env: dict[str, str]) -> None:
    unknown = lionmq("stats", "nope", env=env)
    assert unknown.code == 1
    assert (
        unknown.err == "lionmq: error: channel 'nope' does not exist; enqueue to it to create it\n"
    )
    wrong_token = lionmq_here("channels", env={**env, "LIONMQ_TOKEN": "wrong"})
    assert wrong_token.code == 1
    assert wrong_token.err.startswith("lionmq: error: ") and wrong_token.err.count("\n") == 1
    down = lionmq("channels", "--url", f"http://127.0.0.1:{free_port()}", env=env)
    assert down.code == 3 and down.err.startswith("lionmq: error: cannot reach the node: ")
    # Seeds: --url repeated or comma-separated; one that does not answer is passed over.
    seeds = lionmq_here(
        "channels", "--json", "--url", f"http://127.0.0.1:{free_port()}", "--url",
        f"http://127.0.0.1:{free_port()},{env['LIONMQ_URL']}", env=env,
    )  # fmt: skip
    assert seeds.code == 0 and isinstance(json.loads(seeds.out), list), seeds.err
    bad = lionmq("publish", "rt", "{not json", env=env)
    assert bad.code == 2 and bad.err.startswith("lionmq: error: BODY is not JSON")
    no_admin = lionmq_here("nodes", "handoff", "s1", env=env)
    assert no_admin.code == 2 and "set LIONMQ_ADMIN_TOKEN" in no_admin.err
    for ran in (unknown, wrong_token, down, bad, no_admin):
        assert ran.out == "" and ran.err.count("\n") == 1, ran


def test_set_shows_the_settings_and_stats_reads_them(env: dict[str, str]) -> None:
    ran = lionmq(
        "set", "st", "--max-attempts", "3", "--visibility", "1m", "--dead-letter", "none",
        "--max-length", "10", "--ttl", "1h", "--json", env=env,
    )  # fmt: skip
    assert ran.code == 0, ran.err
    settings = json.loads(ran.out)["settings"]
    assert settings["max_attempts"] == 3 and settings["visibility_ms"] == 60_000
    assert settings["dead_letter"] is None and settings["max_length"] == 10
    assert settings["ttl_ms"] == 3_600_000
    shown = lionmq_here("stats", "st", env=env).out.splitlines()
    assert "max attempts  3" in shown and "visibility    1m" in shown
    assert "dead letter   none (dropped)" in shown and "ttl           1h" in shown
    node = json.loads(lionmq_here("stats", "--json", env=env).out)
    assert node["node"]["status"] == "ok" and node["channels"] >= 1
    nothing = lionmq_here("set", "st", env=env)
    assert nothing.code == 2 and "nothing to set" in nothing.err


def test_purge_asks_on_a_terminal_and_refuses_without_one(env: dict[str, str], mq: Client) -> None:
    mq.enqueue_many("pg", [1, 2, 3])
    blind = lionmq("purge", "pg", env=env)
    assert blind.code == 2 and "add --yes" in blind.err
    declined = lionmq_on_tty("purge", "pg", env=env, answer="n\n")
    assert "purge every message of pg (3 ready, 0 delayed, 0 in flight)? [y/N]" in declined.err
    assert declined.code == 1 and mq.get_channel("pg").counts.ready == 3
    agreed = lionmq_on_tty("purge", "pg", env=env, answer="y\n")
    assert (agreed.code, agreed.out) == (0, "purged 3 messages from pg\n")
    assert "purging pg…" in agreed.err  # the terminal shows it working
    assert mq.get_channel("pg").counts.ready == 0
    scripted = lionmq_here("purge", "pg", "--yes", "--json", env=env)
    assert json.loads(scripted.out) == {"channel": "pg", "purged": 0}


def test_progress_bar_only_on_a_terminal(env: dict[str, str], tmp_path: Path) -> None:
    lines = tmp_path / "many.jsonl"
    lines.write_text("".join(f'{{"n": {i}}}\n' for i in range(1200)))
    shown = lionmq_on_tty("publish", "bar", "--file", str(lines), env=env)
    assert shown.code == 0 and shown.out == "published 1200 messages to bar\n"
    assert "publishing to bar [" in shown.err and "1200/1200" in shown.err
    assert shown.err.endswith("\r\033[K")  # wiped once done
    typing = lionmq_on_tty("publish", "bar", env=env)  # no BODY, no file, stdin a terminal
    assert typing.code == 2 and "pipe one JSON body per line to stdin" in typing.err


def test_publish_failing_midway_says_what_was_published(
    env: dict[str, str], mq: Client, tmp_path: Path
) -> None:
    # 600 messages on lines 1-601 (line 3 blank): the first batch of 500 fits, the second
    # passes max_length. The node says "nothing was stored" of that batch only: the command
    # must say that 500 were published, up to which line, and from where it failed.
    mq.put_channel("half", max_length=550)
    lines = tmp_path / "half.jsonl"
    lines.write_text("1\n2\n\n" + "".join(f"{i}\n" for i in range(3, 601)))
    ran = lionmq("publish", "half", "--file", str(lines), env=env)
    assert ran.code == 1 and len(ran.err.splitlines()) == 1, ran.err
    assert "published 500 of 600 messages (up to line 501); lines 502-601 not published" in (
        ran.err
    )
    assert "would pass max_length, so nothing was stored" in ran.err
    assert mq.get_channel("half").counts.ready == 500
    # A message the node refuses in a later batch: its index in the batch is named as a line.
    big = tmp_path / "big.jsonl"
    big.write_text("1\n" * 700 + '"' + "x" * 300_000 + '"\n')
    refused = lionmq_here("publish", "big", "--file", str(big), "--dedup", "b", env=env)
    assert refused.code == 1, refused.err
    assert "published 500 of 701 messages (up to line 500); lines 501-701 not published" in (
        refused.err
    )
    assert "message 200 is" in refused.err and "its message 0 is line 501" in refused.err
    assert refused.err.rstrip().endswith("run it again with --dedup b to publish the rest")
    # Ctrl-C during the second batch: said too.
    with mock.patch.object(Client, "enqueue_many", side_effect=[["1"] * 500, KeyboardInterrupt]):
        stopped = lionmq_here("publish", "big", "--file", str(big), env=env)
    assert stopped.code == 130 and stopped.err == (
        f"\nlionmq: interrupted: {big}: published 500 of 701 messages (up to line 500); lines "
        "501-701 may not be published\n"
    ), stopped.err


def test_peek_by_state_looks_past_a_page_that_found_none(env: dict[str, str], mq: Client) -> None:
    # A page filtered by state examines at most 10,000 messages: past 10,500 ready ones, the
    # node's first page of delayed ones is empty, with a `next`. peek follows it, rather than
    # say "no delayed messages"; and its "more:" hint keeps the state and limit asked.
    for _ in range(21):
        mq.enqueue_many("deep", list(range(500)))
    late = mq.enqueue("deep", "late", delay_ms=600_000)
    found = lionmq_here("peek", "deep", "--state", "delayed", "--json", env=env)
    page = json.loads(found.out)
    assert [m["id"] for m in page["messages"]] == [late] and page["next"] is None
    shown = lionmq_here("peek", "deep", "--state", "delayed", env=env)
    assert shown.out.splitlines()[1].split()[:2] == [late, "delayed"], shown.out
    ready = lionmq_here("peek", "deep", "--state", "ready", "--limit", "2", env=env)
    assert re.fullmatch(r"more: lionmq peek deep --state ready --limit 2 --after \d+\n", ready.err)


def test_a_redrive_stopped_midway_says_what_it_moved(tmp_path: Path) -> None:
    # Ctrl-C, then the node killed, each during a paced redrive: the command says how many it
    # had moved and that running it again is safe (it said nothing).
    node = NodeProcess(tmp_path / "node", API_TOKEN=TOKEN).start()
    try:
        env = cli_env(LIONMQ_URL=node.url, LIONMQ_TOKEN=TOKEN)
        with Client(node.url, token=TOKEN) as client:
            client.enqueue_many("s.dlq", [NewMessage(i, headers={"x-dead-letter-channel": "s"})
                                          for i in range(400)])  # fmt: skip
            client.put_channel("s")

            def moved() -> int:
                return client.get_channel("s").counts.ready

            outcomes = []
            for stop in ("interrupt", "kill"):
                run = subprocess.Popen(
                    [str(LIONMQ), "redrive", "s.dlq", "--rate", "200", "--batch", "20"],
                    env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                )  # fmt: skip
                before = moved()
                wait_until(lambda before=before: moved() >= before + 40, 10, "a redrive under way")
                if stop == "interrupt":
                    run.send_signal(signal.SIGINT)
                else:
                    node.kill9()
                _, err = run.communicate(timeout=30)
                outcomes.append((run.returncode, err))
        for (code, err), want in zip(outcomes, (130, 3), strict=True):
            assert code == want and re.search(
                r"redrive of s.dlq stopped after moving [1-9]\d* messages \(perhaps a batch "
                r"more\); running it again moves only what is left\n$",
                err,
            ), err
    finally:
        node.kill9()


def test_publish_reads_lines_as_json_does(env: dict[str, str], mq: Client, tmp_path: Path) -> None:
    # U+2028 is allowed raw in a JSON string: the line is one message (str.splitlines() cut
    # it in two, and both halves were refused as not JSON). \r\n ends a line too.
    piped = lionmq("publish", "u2028", "--json", env=env, input='"a\u2028b"\r\n[2]\n')
    assert piped.code == 0, piped.err
    assert [m.body for m in mq.peek("u2028").messages] == ["a\u2028b", [2]]
    # Bytes that are not UTF-8, in a file, on stdin, as BODY, a header, a channel or in a
    # setting: one line naming them, exit 2 (tracebacks, before).
    latin = tmp_path / "latin1.jsonl"
    latin.write_bytes(b'"ok"\n"caf\xe9"\n')
    for args, given in [
        (["--file", str(latin)], b""),
        ([], b'"ok"\n"caf\xe9"\n'),
        ([os.fsdecode(b'"caf\xe9"')], b""),
        (["1", "--header", os.fsdecode(b"k=caf\xe9")], b""),
        (["1", "--url", os.fsdecode(b"http://caf\xe9")], b""),
    ]:
        done = subprocess.run(
            [str(LIONMQ), "publish", "latin", *args], env=env, input=given, capture_output=True
        )
        assert done.returncode == 2, done.stderr
        assert done.stderr.decode().startswith("lionmq: error: ") and b"Traceback" not in (
            done.stderr
        )
        assert b"line 2 is not UTF-8" in done.stderr or b"argument " in done.stderr, done.stderr
    bad_token = lionmq("channels", env={**env, "LIONMQ_TOKEN": os.fsdecode(b"t\xe9")})
    assert (bad_token.code, bad_token.err) == (2, "lionmq: error: LIONMQ_TOKEN is not UTF-8 text\n")
    assert "latin" not in [c.name for c in mq.list_channels()]  # nothing was sent


def test_every_command_has_help_with_an_example(
    env: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    top = lionmq("--help", env=env)
    assert top.code == 0 and "LIONMQ_ADMIN_TOKEN" in top.out
    commands = [
        ["publish"], ["consume"], ["peek"], ["get"], ["channels"], ["stats"], ["set"],
        ["purge"], ["redrive"], ["nodes"], ["nodes", "show"], ["nodes", "set"],
        ["nodes", "handoff"],
    ]  # fmt: skip
    listed = build_parser().format_help()
    for command in commands:
        assert command[0] in listed
        with pytest.raises(SystemExit) as exited:
            main([*command, "--help"])
        assert exited.value.code == 0
        text = capsys.readouterr().out
        assert "example:\n  lionmq " + " ".join(command) in text, command


def test_peek_get_and_redrive(env: dict[str, str], mq: Client) -> None:
    # A nack dead-letters at once (to br.dlq), and every message's history is recorded.
    traced = lionmq_here("set", "br", "--max-attempts", "1", "--trace", "on", env=env)
    assert "trace         on" in traced.out.splitlines()
    first, second = mq.enqueue_many("br", [{"n": 1}, {"n": 2}])
    later = mq.enqueue("br", "later", delay_ms=60_000)
    (held,) = mq.dequeue("br", 1)

    page = json.loads(lionmq("peek", "br", "--json", env=env).out)
    states = {m["id"]: m["state"] for m in page["messages"]}
    assert states == {first: "in_flight", second: "ready", later: "delayed"}
    assert page["next"] is None and mq.get_channel("br").counts.in_flight == 1  # nothing leased
    table = lionmq_here("peek", "br", "--state", "in-flight", env=env).out.splitlines()
    assert table[0].split() == ["ID", "STATE", "ATTEMPT", "ENQUEUED", "DUE", "/", "LEASE", "ENDS",
                                "BODY"]  # fmt: skip
    assert len(table) == 2 and table[1].split()[:3] == [first, "in-flight", "1"]
    assert table[1].endswith('{"n":1}')
    short = lionmq_here("peek", "br", "--limit", "1", env=env)
    assert short.err == f"more: lionmq peek br --limit 1 --after {first}\n"

    shown = lionmq("get", "br", first, env=env)
    assert shown.code == 0, shown.err
    lines = shown.out.splitlines()
    assert lines[0].split() == ["id", first] and ["state", "in-flight"] in [
        line.split() for line in lines
    ]
    assert any(line.startswith("lease ends") and "(in " in line for line in lines)
    assert 'body\n{\n  "n": 1\n}\n' in shown.out
    history = shown.out.split("history\n", 1)[1].splitlines()
    assert history[0].split() == ["AT", "EVENT", "DETAILS"]
    assert [line.split()[4] for line in history[1:]] == ["enqueued", "delivered"]
    assert "attempt=1" in history[2] and " consumer=127.0.0.1:" in history[2]
    assert re.search(r" lease_deadline=\d\d:\d\d:\d\d\.\d{3}Z", history[2]), history[2]
    missing = lionmq_here("get", "br", "12345", env=env)
    assert missing.code == 1 and missing.err.startswith("lionmq: error: ")

    held.nack()  # its last attempt: to br.dlq
    moved = lionmq("redrive", "br.dlq", env=env)
    assert (moved.code, moved.err) == (0, "")
    assert moved.out == "moved 1 message from br.dlq back to their channels; 0 left\n"
    (back,) = mq.peek("br", state="ready").messages[-1:]
    assert (back.body, back.attempt) == ({"n": 1}, 0)
    assert back.headers is not None and back.headers["x-redriven-from"] == "br.dlq"
    assert back.headers["x-dead-letter-channel"] == "br"  # kept, as history
    events = json.loads(lionmq_here("get", "br", back.id, "--json", env=env).out)["history"]
    assert [e["event"] for e in events] == [
        "enqueued", "delivered", "dead_lettered", "redriven"
    ]  # fmt: skip

    mq.enqueue_many("nohdr", [1, 2, 3])
    skipped = lionmq_here("redrive", "nohdr", env=env)
    assert skipped.out == (
        "moved 0 messages from nohdr back to their channels; 3 skipped "
        "(no x-dead-letter-channel header: use --to); 3 left\n"
    )
    paced = lionmq_here("redrive", "nohdr", "--to", "dst", "--rate", "100", "--json", env=env)
    assert json.loads(paced.out) == {"moved": 3, "skipped": 0, "remaining": 0, "calls": 1}
    assert mq.get_channel("dst").counts.ready == 3

    # Paced: one call carries two seconds' worth (the node paces inside a call and starts each
    # call at once, so many small calls would each add a batch to the rate).
    mq.enqueue_many("pace", list(range(3000)))
    began = time.monotonic()
    fast = lionmq_here("redrive", "pace", "--to", "paced", "--rate", "5000", "--json", env=env)
    took = time.monotonic() - began
    assert json.loads(fast.out) == {"moved": 3000, "skipped": 0, "remaining": 0, "calls": 1}
    assert took >= 0.5, took  # the last of six batches of 500 is due 0.5 s after the start


async def test_async_client_browses_and_redrives(mq_node: NodeProcess, mq: Client) -> None:
    from lionmq import AsyncClient

    mq.enqueue_many("abr", ["x", "y"])
    async with AsyncClient(mq_node.url, token=TOKEN) as client:
        page = await client.peek("abr", state="ready", limit=1)
        assert [m.body for m in page.messages] == ["x"] and page.next == page.messages[0].id
        one = await client.get_message("abr", page.messages[0].id)
        assert (one.body, one.state, one.history) == ("x", "ready", None)
        result = await client.redrive("abr", to="abr2", max=1)
        assert (result.moved, result.remaining) == (1, 1)


def test_consume_stopped_nacks_the_message_in_hand_and_stops_its_command(
    env: dict[str, str], mq: Client
) -> None:
    mq.enqueue("stop", "long job")
    # The command would run 30 s; SIGTERM (a supervisor's stop, handled as Ctrl-C) ends it.
    worker = subprocess.Popen(
        [str(LIONMQ), "consume", "stop", "--follow", "--exec", "read b; echo started; sleep 30"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert worker.stdout is not None
        assert worker.stdout.readline() == "started\n"  # the command has the message
        worker.send_signal(signal.SIGTERM)
        _, err = worker.communicate(timeout=10)
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
    assert worker.returncode == 130
    assert "interrupted: message" in err and "nacked" in err
    assert err.endswith("consumed 0 messages from stop: 0 acked, 0 nacked\n\n")
    (again,) = mq.dequeue("stop", 1)  # back at once, not after its lease
    assert (again.body, again.attempt) == ("long job", 2)
    again.ack()


def test_consume_into_a_reader_that_leaves_nacks_what_it_printed(
    env: dict[str, str], mq: Client
) -> None:
    """`lionmq consume … | head -1`: bodies larger than the pipe's buffer, so the write fails
    once the reader is gone; the batch goes back at once instead of waiting out its lease."""
    mq.enqueue_many("gone", ["x" * 100_000] * 3)
    reader = subprocess.Popen(
        [str(LIONMQ), "consume", "gone", "--max", "3"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert reader.stdout is not None
        assert reader.stdout.read(10) == b'"xxxxxxxxx'
        reader.stdout.close()  # the reader leaves
        reader.wait(timeout=15)
    finally:
        if reader.poll() is None:
            reader.kill()
            reader.wait()
    assert reader.returncode == 1
    counts = mq.get_channel("gone").counts
    assert (counts.ready, counts.in_flight) == (3, 0)
