"""deploy/prometheus/alerts.yml: valid rules (`promtool check rules`) that fire as meant
(`promtool test rules alerts_test.yml`) when Debian's prometheus package is installed (`make
test` installs it); and always, parsed here, every expression names only metrics a real node's
/metrics exports (or `up`, Prometheus's own)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.conftest import ROOT, NodeProcess

RULES_DIR = ROOT / "deploy" / "prometheus"
RULES = RULES_DIR / "alerts.yml"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool is missing (Debian's prometheus; make test installs it)"
)

# PromQL words that are not metric names.
KEYWORDS = {
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "offset",
    "bool",
    "and",
    "or",
    "unless",
    "inf",
    "nan",
}
# The conditions the watcher raises (watcher/alerts.py), each with its rule.
EXPECTED_ALERTS = {
    "LionMQNodeSuspect",
    "LionMQNodeDown",
    "LionMQShardWithoutOwner",
    "LionMQBackupLagging",
    "LionMQDeadLettersGrowing",
    "LionMQOldestReadyMessageOld",
    "LionMQNodeMemoryHigh",
}


def rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(RULES.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects: what is left once strings, label matchers,
    groupings, ranges, durations, numbers, functions and keywords are taken out."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = re.sub(r"\boffset\s+\w+", " ", text)
    names = set()
    for match in re.finditer(r"(?<![\w.])([a-zA-Z_:][a-zA-Z0-9_:]*)(\s*\()?", text):
        name, call = match.group(1), match.group(2)
        if not call and name.lower() not in KEYWORDS:
            names.add(name)
    return names


def test_the_expression_reader_finds_metric_names() -> None:
    expr = (
        'sum by (channel) (a_total{job="x", channel=~".+[.]dlq"}) - (max without (i) '
        "(rate(b[5m] offset 10m)) or c * 0) >= 1 and on (shard) d > bool 2e3"
    )
    assert metric_names(expr) == {"a_total", "b", "c", "d"}


def test_every_condition_of_the_watcher_has_a_rule_with_a_severity_and_summary() -> None:
    found = rules()
    assert {r["alert"] for r in found} == EXPECTED_ALERTS
    for rule in found:
        assert rule["labels"]["severity"] in ("critical", "warning")
        assert rule["annotations"]["summary"]


def test_every_metric_the_rules_read_is_exported_by_a_real_node(tmp_path: Path) -> None:
    node = NodeProcess(tmp_path / "node").start()
    try:
        text = httpx.get(node.url + "/metrics", timeout=10).text
    finally:
        node.stop()
    exported = set(re.findall(r"^# TYPE (\S+) ", text, re.MULTILINE))
    # Counters are exported as <name>_total (and typed under <name>).
    exported |= {f"{name}_total" for name in exported}
    used = set().union(*(metric_names(r["expr"]) for r in rules()))
    assert "process_resident_memory_bytes" in used
    assert used - {"up"} <= exported, f"not on /metrics: {sorted(used - {'up'} - exported)}"


@needs_promtool
def test_promtool_checks_the_rules() -> None:
    assert PROMTOOL is not None
    done = subprocess.run(
        [PROMTOOL, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(EXPECTED_ALERTS)} rules found" in done.stdout


@needs_promtool
def test_promtool_unit_tests_show_each_rule_fires_and_clears() -> None:
    assert PROMTOOL is not None
    done = subprocess.run(
        [PROMTOOL, "test", "rules", "alerts_test.yml"],
        cwd=RULES_DIR,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    tested = set(re.findall(r"alertname: (\w+)", (RULES_DIR / "alerts_test.yml").read_text()))
    assert tested == EXPECTED_ALERTS
