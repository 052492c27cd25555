"""Tests never read the developer's `.env`: in-process settings ignore it, node processes run
where there is none."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import ROOT, NodeProcess, make_settings


def test_in_process_settings_ignore_a_dotenv_in_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / ".env").write_text("MAX_BATCH=7\nAPI_TOKEN=from-a-developer-dotenv\n")
    monkeypatch.chdir(tmp_path)
    settings = make_settings(tmp_path)
    assert settings.max_batch == 1000
    assert settings.api_token == ""


def test_a_node_process_runs_outside_the_checkout(node: NodeProcess) -> None:
    # ROOT/.env (the developer's) is read from the working directory: a node must not start there.
    assert node.proc is not None
    cwd = Path(f"/proc/{node.proc.pid}/cwd").resolve()
    assert cwd == node.data_dir.resolve()
    assert cwd != ROOT and not (cwd / ".env").exists()
