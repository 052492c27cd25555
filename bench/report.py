"""The printed table and the JSON document, with the machine and durability they belong to."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
from pathlib import Path
from typing import Any

from bench.config import SCENARIOS
from bench.stats import ScenarioResult

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


def machine_info() -> dict[str, Any]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cores": os.cpu_count(),
        "cpu": model or platform.processor(),
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


def table(
    results: dict[str, dict[str, ScenarioResult]], sizes: list[str], scenarios: list[int]
) -> str:
    lion, rabbit = results.get("lionmq", {}), results.get("rabbitmq", {})
    header = ["#", "scenario", "body", "metric", "LionMQ", "CPU node/bench %"]
    if rabbit:
        header += ["RabbitMQ", "CPU rabbit/bench %", "LionMQ/RabbitMQ"]
    header.append("target")
    lines = [header]
    order = [
        (row, size)
        for number in scenarios
        for size in (sizes if number != 6 else ["16B"])
        for row in ROWS
        if row[0] == number
    ]
    for (number, metric, label, target, _higher), size in order:
        key = f"{number}:{size}"
        if key not in lion and key not in rabbit:
            continue
        ours = lion.get(key)
        mine = ours.median.get(metric) if ours else None
        cpu = _cpu(ours)
        mark = " (partial)" if ours and ours.partial else ""
        row = [str(number), SCENARIOS[number], size, label, _fmt(mine) + mark, cpu]
        if rabbit:
            theirs = rabbit.get(key)
            other = theirs.median.get(metric) if theirs else None
            ratio = mine / other if mine is not None and other else None
            partial = " (partial)" if theirs and theirs.partial else ""
            row += [_fmt(other) + partial, _cpu(theirs), f"{ratio:.2f}x" if ratio else "-"]
        row.append(target)
        lines.append(row)
    widths = [max(len(r[i]) for r in lines) for i in range(len(header))]
    out = []
    for i, row in enumerate(lines):
        out.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
        if i == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def write_json(path: Path, document: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2, default=str) + "\n")


def document(results: dict[str, dict[str, ScenarioResult]], meta: dict[str, Any]) -> dict[str, Any]:
    return {
        **meta,
        "results": {
            broker: {key: r.to_json() for key, r in per.items()} for broker, per in results.items()
        },
    }
