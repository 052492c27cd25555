"""`python -m bench [--quick] [--scenarios 1,3] [--runs N] [--json PATH] [--peer rabbitmq,nats|all]`
runs the six scenarios against LionMQ (and, with --peer, against RabbitMQ and NATS JetStream);
`python -m bench transport --help`: the client's HTTP senders against a bare ASGI app;
`python -m bench cluster --help`: takeover, set_nodes and forwarding figures of a cluster."""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import signal
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from lionmq import AsyncClient

from bench import report
from bench.config import FULL, QUICK, SCENARIOS, Profile
from bench.install import ensure_installed
from bench.node import DURABILITY, Node
from bench.peers import PEERS
from bench.peers import parse as parse_peers
from bench.rabbit import CLIENTS as RABBIT_CLIENTS
from bench.scenarios import RUNNERS
from bench.stats import SIZES, Results, RunOne, RunResult, ScenarioResult, log

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def _rabbit_clients(value: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in value.split(",") if n.strip())
    if not names or set(names) - set(RABBIT_CLIENTS):
        raise argparse.ArgumentTypeError(f"choose from {', '.join(RABBIT_CLIENTS)}")
    return names


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="tiny counts (the smoke test)")
    parser.add_argument(
        "--scenarios",
        default=",".join(map(str, SCENARIOS)),
        help="comma-separated scenario numbers: "
        + "; ".join(f"{n} {name}" for n, name in SCENARIOS.items()),
    )
    parser.add_argument(
        "--trace",
        action="store_true",
        help="LionMQ's channels with per-message history on (what tracing costs)",
    )
    parser.add_argument("--sizes", default=",".join(SIZES), help="body sizes: 16B,1KiB")
    parser.add_argument("--runs", type=int, default=None, help="runs per figure (median)")
    parser.add_argument(
        "--json",
        type=Path,
        default=None,
        help="where to write the results (the Markdown table goes beside it, as .md)",
    )
    parser.add_argument(
        "--peer",
        type=parse_peers,
        default=[],
        help=f"also run these brokers: {','.join(PEERS)} or all (installed with apt if missing)",
    )
    parser.add_argument(
        "--without-lionmq",
        action="store_true",
        help="run only the peers (their figures alone: no ratios)",
    )
    parser.add_argument(
        "--rabbitmq-clients",
        type=_rabbit_clients,
        default=RABBIT_CLIENTS,
        help=f"the clients that drive RabbitMQ (default {','.join(RABBIT_CLIENTS)}: the table "
        "shows the faster per scenario)",
    )
    args = parser.parse_args(argv)
    args.scenarios = sorted({int(s) for s in args.scenarios.split(",") if s.strip()})
    if unknown := set(args.scenarios) - set(SCENARIOS):
        parser.error(f"unknown scenarios {sorted(unknown)}; choose from {list(SCENARIOS)}")
    args.sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    if unknown_sizes := set(args.sizes) - set(SIZES):
        parser.error(f"unknown sizes {sorted(unknown_sizes)}; choose from {list(SIZES)}")
    if args.runs is None:
        args.runs = 1 if args.quick else 3
    if args.json is None:
        stamp = dt.datetime.now().strftime("%Y-%m-%d-%H%M%S")
        args.json = RESULTS_DIR / f"{stamp}.json"
    args.long_runs = (QUICK if args.quick else FULL).long_runs
    return args


async def run_matrix(
    name: str, run_one: RunOne, args: argparse.Namespace, results: dict[str, ScenarioResult]
) -> None:
    """Runs each selected scenario at each size `args.runs` times, logging as it goes."""
    for number in args.scenarios:
        for size_name in args.sizes if number != 6 else ["16B"]:
            key = f"{number}:{size_name}"
            result = results.setdefault(key, ScenarioResult(key))
            runs = min(args.runs, args.long_runs) if number == 6 else args.runs
            for run in range(runs):
                log(f"[{name}] {number} {SCENARIOS[number]} {size_name} run {run + 1}/{runs}")
                try:
                    outcome = await run_one(number, SIZES[size_name])
                except Exception as exc:  # one failed run must not lose the others
                    log(f"[{name}]   failed: {exc!r}")
                    outcome = RunResult({}, partial=True, note=f"failed: {exc!r}")
                result.runs.append(outcome)
                shown = ", ".join(f"{k}={v:,.2f}" for k, v in outcome.metrics.items())
                log(f"[{name}]   {shown}{' (partial)' if outcome.partial else ''}")


async def run_lionmq(args: argparse.Namespace, profile: Profile, results: Results) -> None:
    per = results.setdefault("lionmq", {})
    # Scenarios 1-5 share a node; the long queue gets a fresh one so its RSS is its own.
    groups = [[n for n in args.scenarios if n != 6], [n for n in args.scenarios if n == 6]]
    for group in groups:
        if not group:
            continue
        with Node() as node:
            log(f"[lionmq] node pid {node.pid} on {node.url}")
            async with AsyncClient(node.url, timeout=60.0) as client:

                async def run_one(
                    number: int, size: int, client: AsyncClient = client, node: Node = node
                ) -> RunResult:
                    return await RUNNERS[number](client, node, size, profile)

                sub = argparse.Namespace(**{**vars(args), "scenarios": group})
                await run_matrix("lionmq", run_one, sub, per)


async def main(args: argparse.Namespace, versions: dict[str, str]) -> Results:
    profile = replace(QUICK if args.quick else FULL, trace=args.trace)
    results: Results = {}
    if not args.without_lionmq:
        await run_lionmq(args, profile, results)
    for name in args.peer:
        versions[name] = await PEERS[name].run(args, profile, results, run_matrix)
    return results


def _terminate(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # unwinds through the context managers that kill the servers


def cli(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["transport"]:
        from bench import transport

        return transport.cli(argv[1:])
    if argv[:1] == ["cluster"]:
        from bench import cluster

        return cluster.cli(argv[1:])
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    # Before any figure: a missing server must not cost a LionMQ run first.
    ensure_installed({PEERS[name].package: PEERS[name].server for name in args.peer})
    traced = "; trace on: every message's history written" if args.trace else ""
    meta: dict[str, Any] = {
        "machine": report.machine_info(),
        "durability": {} if args.without_lionmq else {"lionmq": DURABILITY + traced},
        "profile": "quick" if args.quick else "full",
        "runs": args.runs,
        "scenarios": args.scenarios,
        "sizes": args.sizes,
        "command": " ".join(["python -m bench", *argv]),
    }
    for name in args.peer:
        peer = PEERS[name]
        clients = args.rabbitmq_clients if name == "rabbitmq" else peer.clients
        meta["durability"][name] = f"{peer.durability} (clients: {', '.join(clients)})"
    try:
        import uvloop

        loop_factory = uvloop.new_event_loop
        meta["event_loop"] = "uvloop"
    except ImportError:  # pragma: no cover - uvloop ships with uvicorn[standard]
        loop_factory = None
        meta["event_loop"] = "asyncio"
    versions: dict[str, str] = {}
    meta["versions"] = versions
    results: Results = {}
    interrupted = False
    try:
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            results = runner.run(main(args, versions))
    except KeyboardInterrupt:
        interrupted = True
        log("interrupted: servers stopped")
    if not results:
        return 130 if interrupted else 1
    machine = meta["machine"]
    print(
        f"\nLionMQ bench, {meta['profile']} profile, median of {args.runs} run(s); "
        f"{machine['cores']} cores, {machine['cpu']}, {machine['date']}, "
        f"Python {machine['python']} ({meta['event_loop']})"
    )
    for broker, text in meta["durability"].items():
        print(f"durability, {broker} {versions.get(broker, '')}: {text}")
    print()
    print(report.table(results, args.sizes, args.scenarios))
    report.write_json(args.json, report.document(results, meta))
    markdown = args.json.with_suffix(".md")
    report.write_text(markdown, report.markdown(results, args.sizes, meta))
    print(f"\nresults: {args.json}\nREADME table: {markdown}")
    return 0


if __name__ == "__main__":
    sys.exit(cli())
