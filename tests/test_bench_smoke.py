"""The benchmark in miniature, so that it never rots: every LionMQ scenario against a real node
process (`python -m bench --quick`), every peer adapter (RabbitMQ with pika and with aio-pika,
NATS JetStream with nats-py) against a real server with tiny counts when the server is
installed, the table's choice of a peer's client, the apt install step with a stand-in
apt-get, and `python -m bench transport`."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import psutil
import pytest

from bench import jetstream, rabbit, report
from bench.config import QUICK, Profile
from bench.install import ensure_installed, missing
from bench.peers import PEERS
from bench.peers import parse as parse_peers
from bench.report import PRIMARY, ROWS
from bench.stats import Results, RunResult, ScenarioResult

ROOT = Path(__file__).resolve().parent.parent

# Counts small enough that a peer's six scenarios take a second or two once its server is up.
TINY: Profile = replace(
    QUICK,
    batch_total=300,
    single_total=64,
    drain_prefill=300,
    e2e_total=400,
    e2e_backlog=200,
    paced_rate=100,
    paced_seconds=0.3,
    long_depth=500,
    long_drain=200,
    fill_batch=100,
    settle_s=0.05,
    deadline_s=8.0,
    fill_deadline_s=8.0,
)


def test_quick_bench_reports_every_scenario(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--runs", "1", "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "batch enqueue" in proc.stdout
    document = json.loads(out.read_text())
    assert document["durability"]["lionmq"]
    assert document["machine"]["cores"] >= 1
    results = document["results"]["lionmq"]
    for number, metric, *_ in ROWS:
        sizes = ["16B"] if number == 6 else ["16B", "1KiB"]
        for size in sizes:
            figure = results[f"{number}:{size}"]["median"].get(metric)
            assert figure is not None and figure > 0, (number, size, metric, results)
    # The README table is written beside the JSON, from the same run.
    markdown = out.with_suffix(".md").read_text()
    assert "| 1 | batch enqueue" in markdown and "python -m bench --quick" in markdown


def _check_every_scenario(name: str, outcomes: dict[int, RunResult]) -> None:
    for number, outcome in outcomes.items():
        metric, _ = PRIMARY[number]
        assert not outcome.partial, (name, number, outcome)
        assert outcome.metrics.get(metric, 0) > 0, (name, number, outcome)
        assert outcome.metrics.get("server_cpu_pct", -1) >= 0, (name, number, outcome)


def _listening(pid: int) -> set[str]:
    """The addresses that a server's processes (the root and its children) listen on."""
    root = psutil.Process(pid)
    return {
        conn.laddr.ip
        for proc in [root, *root.children(recursive=True)]
        for conn in proc.net_connections(kind="tcp")
        if conn.status == psutil.CONN_LISTEN
    }


def _installed(peer: str) -> None:
    if missing({PEERS[peer].package: PEERS[peer].server}):
        pytest.skip(f"{PEERS[peer].package} is not installed (make bench-peer installs it)")


@pytest.fixture(scope="module")
def rabbit_server() -> Iterator[rabbit.RabbitServer]:
    _installed("rabbitmq")
    with rabbit.RabbitServer(boot_timeout=30) as server:
        asyncio.run(rabbit.wait_amqp(server.url, 30))
        yield server


def test_rabbitmq_listens_on_loopback_only(rabbit_server: rabbit.RabbitServer) -> None:
    # AMQP and the Erlang distribution port (epmd runs apart, bound by ERL_EPMD_ADDRESS).
    addresses = _listening(rabbit_server.pid)
    assert len(addresses) >= 1 and addresses <= {"127.0.0.1", "::1"}, addresses


@pytest.mark.parametrize("client", rabbit.CLIENTS)
async def test_rabbitmq_adapters_run_every_scenario(
    rabbit_server: rabbit.RabbitServer, client: str
) -> None:
    started = time.monotonic()
    runners = rabbit.runners(client)
    outcomes = {
        n: await asyncio.wait_for(run(rabbit_server, 16, TINY), 20) for n, run in runners.items()
    }
    _check_every_scenario(f"rabbitmq/{client}", outcomes)
    assert time.monotonic() - started < 20


async def test_nats_adapter_runs_every_scenario() -> None:
    _installed("nats")
    started = time.monotonic()
    with jetstream.NatsServer(boot_timeout=15) as server:
        await jetstream.wait_jetstream(server.url, 15)
        assert _listening(server.pid) == {"127.0.0.1"}
        outcomes = {
            n: await asyncio.wait_for(run(server, 16, TINY), 20)
            for n, run in jetstream.RUNNERS.items()
        }
        pid = server.pid
    _check_every_scenario("nats/nats-py", outcomes)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # stopped by PID, and reaped
    assert time.monotonic() - started < 20


def _result(key: str, partial: bool = False, **metrics: float) -> ScenarioResult:
    return ScenarioResult(key, [RunResult(dict(metrics), partial=partial)])


def test_the_table_shows_each_peers_best_client_and_names_it() -> None:
    results: Results = {
        "lionmq": {"4:16B": _result("4:16B", msg_s=30_000.0, p99_ms=90.0)},
        "rabbitmq/pika": {"4:16B": _result("4:16B", msg_s=12_000.0, p99_ms=80.0)},
        "rabbitmq/aio-pika": {"4:16B": _result("4:16B", msg_s=5_000.0, p99_ms=40.0)},
        "nats/nats-py": {"4:16B": _result("4:16B", msg_s=20_000.0, p99_ms=60.0)},
    }
    pick = report.best(results, "rabbitmq", "4:16B")
    assert pick is not None and pick.client == "pika"
    lines = report.table(results, ["16B"], [4]).splitlines()
    assert "RabbitMQ (client)" in lines[0] and "NATS (client)" in lines[0]
    throughput = next(line for line in lines if "msg/s" in line)
    assert "12,000 (pika)" in throughput and "2.50x" in throughput  # 30,000 / 12,000
    assert "20,000 (nats-py)" in throughput and "1.50x" in throughput
    p99 = next(line for line in lines if "p99 ms" in line)
    # The p99 shown is the chosen client's (pika's), and lower is better: 80 / 90.
    assert "80.00 (pika)" in p99 and "0.89x" in p99


def test_a_client_whose_runs_were_cut_short_loses_to_one_that_finished() -> None:
    results: Results = {
        "rabbitmq/pika": {"1:16B": _result("1:16B", msg_s=4_000.0)},
        "rabbitmq/aio-pika": {"1:16B": _result("1:16B", partial=True, msg_s=9_000.0)},
    }
    pick = report.best(results, "rabbitmq", "1:16B")
    assert pick is not None and pick.client == "pika"


def test_peer_names() -> None:
    assert parse_peers("all") == ["rabbitmq", "nats"]
    assert parse_peers("nats,rabbitmq") == ["rabbitmq", "nats"]
    with pytest.raises(argparse.ArgumentTypeError, match="kafka"):
        parse_peers("rabbitmq,kafka")


def test_missing_servers_are_installed_with_one_apt_update(tmp_path: Path) -> None:
    """A stand-in apt-get records its calls and 'installs' by creating the binaries."""
    calls = tmp_path / "calls"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    servers = {"rabbitmq-server": tmp_path / "rabbit", "nats-server": tmp_path / "nats"}
    policy = tmp_path / "policy-rc.d"
    (bin_dir / "apt-get").write_text(
        "#!/bin/sh\n"
        f'echo "$DEBIAN_FRONTEND $([ -x {policy} ] && echo policy) $*" >> {calls}\n'
        'case " $* " in *" install "*)'
        f" touch {servers['rabbitmq-server']} {servers['nats-server']};; esac\n"
    )
    (bin_dir / "apt-get").chmod(0o755)
    (bin_dir / "sudo").write_text('#!/bin/sh\nexec "$@"\n')  # when the tests run unprivileged
    (bin_dir / "sudo").chmod(0o755)
    servers["nats-server"].touch()  # already installed: not asked for
    saved = os.environ["PATH"]
    os.environ["PATH"] = f"{bin_dir}{os.pathsep}{saved}"
    try:
        ensure_installed({"rabbitmq-server": servers["rabbitmq-server"]}, policy_rc=policy)
        ensure_installed(servers, policy_rc=policy)  # nothing missing: apt-get not run
    finally:
        os.environ["PATH"] = saved
    lines = calls.read_text().splitlines()
    assert len(lines) == 2, lines
    update, install = lines
    assert update.startswith("noninteractive") and update.endswith("update -qq")
    assert install.startswith("noninteractive") and "install -y -qq rabbitmq-server" in install
    assert "nats-server" not in install
    if os.geteuid() == 0:
        assert " policy " in install  # no service started while installing
    assert not policy.exists()


def test_transport_mode_compares_the_senders() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "transport", "--requests", "40", "--seconds", "0.5"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert lines[0].split()[0] == "sender"
    rows = {line.split("(")[0].strip(): line.split(")")[-1].split() for line in lines[1:]}
    assert set(rows) == {"httpx", "lionmq default"}
    assert all(float(cell) > 0 for cells in rows.values() for cell in cells)
