"""The printed table, the same table in Markdown (for README) and the JSON document, with the
machine and durability they belong to.

A peer measured with several clients ("rabbitmq/pika", "rabbitmq/aio-pika") shows, per
scenario and body size, the client that did best on the scenario's main figure (PRIMARY);
the JSON keeps every client's runs.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.config import SCENARIOS
from bench.peers import PEERS
from bench.stats import Results, ScenarioResult

# (scenario, metric, label, target as text, True when higher is better)
ROWS: list[tuple[int, str, str, str, bool]] = [
    (1, "msg_s", "msg/s", ">= 100,000 (16B)", True),
    (2, "msg_s", "msg/s", ">= 8,000", True),
    (2, "p50_ms", "p50 ms", "", False),
    (2, "p99_ms", "p99 ms", "<= 15", False),
    (3, "msg_s", "msg/s", ">= 60,000", True),
    (4, "msg_s", "msg/s", ">= 30,000", True),
    (4, "p50_ms", "p50 ms", "", False),
    (4, "p99_ms", "p99 ms", "<= 100", False),
    (5, "p50_ms", "p50 ms", "<= 3", False),
    (5, "p99_ms", "p99 ms", "<= 10", False),
    (5, "sent_msg_s", "sent msg/s", "the pace", True),
    (6, "rss_mb", "RSS MB at depth", "<= 150", False),
    (6, "drain_empty_msg_s", "drain msg/s, empty", "", True),
    (6, "drain_depth_msg_s", "drain msg/s, at depth", "", True),
    (6, "depth_vs_empty", "depth/empty", ">= 0.80", True),
]

# The figure that picks a peer's client per scenario: (metric, True when higher is better).
PRIMARY: dict[int, tuple[str, bool]] = {
    1: ("msg_s", True),
    2: ("msg_s", True),
    3: ("msg_s", True),
    4: ("msg_s", True),
    5: ("p99_ms", False),
    6: ("drain_depth_msg_s", True),
}


def machine_info() -> dict[str, Any]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory = int(line.split()[1]) * 1024
                break
    except OSError:
        pass
    return {
        "cores": os.cpu_count(),
        "cpu": model or platform.processor(),
        "memory_gib": round(memory / 2**30, 1),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }


def _fmt(value: float | None) -> str:
    if value is None or value != value:
        return "-"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.2f}"


def _cpu(result: ScenarioResult | None) -> str:
    """Server and load-generator CPU, % of one core: which side limits the figure."""
    if result is None or "server_cpu_pct" not in result.median:
        return "-"
    return f"{result.median['server_cpu_pct']:.0f}/{result.median['bench_cpu_pct']:.0f}"


@dataclass(frozen=True)
class Pick:
    """A peer's figures for one scenario and size: the best client's, and which it is."""

    client: str
    result: ScenarioResult


def best(results: Results, peer: str, key: str) -> Pick | None:
    """The client of `peer` whose runs of `key` ("4:16B") did best on the scenario's PRIMARY
    figure; a client whose runs were all cut short counts only when no other has figures."""
    metric, higher = PRIMARY[int(key.split(":", 1)[0])]
    candidates: list[tuple[bool, float, str, ScenarioResult]] = []
    for name, per in results.items():
        broker, _, client = name.partition("/")
        if broker != peer or key not in per:
            continue
        value = per[key].median.get(metric)
        if value is None:
            continue
        candidates.append((per[key].partial, value if higher else -value, client, per[key]))
    if not candidates:
        return None
    # Complete runs first, then the better figure.
    _, _, client, result = max(candidates, key=lambda c: (not c[0], c[1]))
    return Pick(client, result)


def peers_in(results: Results) -> list[str]:
    """The peers that have results, in the order they ran."""
    seen: list[str] = []
    for name in results:
        broker = name.split("/", 1)[0]
        if broker != "lionmq" and broker not in seen:
            seen.append(broker)
    return seen


def _advantage(ours: float | None, theirs: float | None, higher: bool) -> str:
    """How many times better LionMQ's figure is (below 1: worse)."""
    if ours is None or theirs is None or ours != ours or theirs != theirs or not ours or not theirs:
        return "-"
    return f"{(ours / theirs) if higher else (theirs / ours):.2f}x"


def rows(results: Results, sizes: list[str], scenarios: list[int]) -> list[list[str]]:
    """The table as rows of cells, the header first."""
    lion = results.get("lionmq", {})
    peers = peers_in(results)
    header = ["#", "scenario", "body", "metric", "LionMQ", "CPU node/bench %"]
    for peer in peers:
        title = PEERS[peer].title if peer in PEERS else peer
        header += [f"{title} (client)", f"CPU {peer}/bench %", f"LionMQ vs {title}"]
    header.append("target")
    lines = [header]
    order = [
        (row, size)
        for number in scenarios
        for size in (sizes if number != 6 else ["16B"])
        for row in ROWS
        if row[0] == number
    ]
    for (number, metric, label, target, higher), size in order:
        key = f"{number}:{size}"
        picks = {peer: best(results, peer, key) for peer in peers}
        if key not in lion and not any(picks.values()):
            continue
        ours = lion.get(key)
        mine = ours.median.get(metric) if ours else None
        mark = " (partial)" if ours and ours.partial else ""
        row = [str(number), SCENARIOS[number], size, label, _fmt(mine) + mark, _cpu(ours)]
        for peer in peers:
            pick = picks[peer]
            if pick is None:
                row += ["-", "-", "-"]
                continue
            other = pick.result.median.get(metric)
            partial = " (partial)" if pick.result.partial else ""
            row += [
                f"{_fmt(other)} ({pick.client}){partial}",
                _cpu(pick.result),
                _advantage(mine, other, higher),
            ]
        row.append(target)
        lines.append(row)
    return lines


def table(results: Results, sizes: list[str], scenarios: list[int]) -> str:
    lines = rows(results, sizes, scenarios)
    widths = [max(len(r[i]) for r in lines) for i in range(len(lines[0]))]
    out = []
    for i, row in enumerate(lines):
        out.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
        if i == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def markdown(results: Results, sizes: list[str], meta: dict[str, Any]) -> str:
    """The run as README shows it: where and how it ran, the durability of each broker, and
    the table."""
    machine = meta["machine"]
    lines = [
        f"`{meta['command']}` on {machine['cores']} cores ({machine['cpu']}, "
        f"{machine['memory_gib']} GiB), {machine['os']}, Python {machine['python']} "
        f"({meta['event_loop']}), {machine['date']}; {meta['profile']} profile, median of "
        f"{meta['runs']} run(s), the long queue once.",
        "",
    ]
    for broker, text in meta["durability"].items():
        version = meta.get("versions", {}).get(broker)
        lines.append(f"- {broker}{f' {version}' if version else ''}: {text}")
    lines.append("")
    cells = rows(results, sizes, meta["scenarios"])
    lines.append("| " + " | ".join(cells[0]) + " |")
    lines.append("|" + "---|" * len(cells[0]))
    lines.extend("| " + " | ".join(c.replace("|", "/") for c in row) + " |" for row in cells[1:])
    lines += [
        "",
        "CPU: the server's and the load generator's, % of one core. LionMQ vs a peer: how many "
        "times better LionMQ's figure is (below 1: worse); the client in brackets is the one "
        "that did best on that scenario.",
    ]
    return "\n".join(lines) + "\n"


def write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def write_json(path: Path, document: dict[str, Any]) -> None:
    write_text(path, json.dumps(document, indent=2, default=str) + "\n")


def document(results: Results, meta: dict[str, Any]) -> dict[str, Any]:
    return {
        **meta,
        "results": {
            broker: {key: r.to_json() for key, r in per.items()} for broker, per in results.items()
        },
    }
