"""The benchmark in miniature (`python -m bench --quick`), so that it never rots: every LionMQ
scenario against a real node process, tiny counts, no RabbitMQ."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from bench.report import ROWS

ROOT = Path(__file__).resolve().parent.parent


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
