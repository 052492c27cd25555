"""The Makefile on a bare Debian: missing system packages come from apt (with sudo only when not
root), and a python3 that cannot make a virtual environment is named with the package to add.

Each recipe runs for real in a scratch copy of the Makefile, with a PATH of stand-ins: apt-get
and sudo record how they were called, `id` says who we are, and chromium is nowhere on it.
"""

from __future__ import annotations

import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

MAKE = shutil.which("make")
pytestmark = pytest.mark.skipif(MAKE is None, reason="make is missing")


def script(path: Path, text: str) -> Path:
    path.write_text("#!/bin/sh\n" + text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def bare_debian(tmp_path: Path, uid: int) -> tuple[Path, dict[str, str], Path]:
    """A scratch project dir, an environment whose PATH holds only stand-ins, and the call log."""
    project = tmp_path / "project"
    project.mkdir()
    shutil.copy(ROOT / "Makefile", project / "Makefile")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls.log"
    for tool in ("env", "cat"):  # the real ones; nothing else of /usr/bin is reachable
        real = shutil.which(tool)
        assert real is not None
        (bin_dir / tool).symlink_to(real)
    script(bin_dir / "id", '[ "$1" = -u ] && echo "$FAKE_UID" || echo "uid=$FAKE_UID"\n')
    script(
        bin_dir / "apt-get",
        f'echo "apt-get DEBIAN_FRONTEND=${{DEBIAN_FRONTEND:-}} $*" >> {calls}\n'
        '[ "$(id -u)" = 0 ] || { echo "apt-get: permission denied" >&2; exit 100; }\n',
    )
    # sudo runs the rest of its arguments as root.
    script(bin_dir / "sudo", f'echo "sudo $*" >> {calls}\nFAKE_UID=0 exec "$@"\n')
    env = {"PATH": str(bin_dir), "HOME": str(tmp_path), "FAKE_UID": str(uid)}
    return project, env, calls


def run_make(project: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    assert MAKE is not None
    return subprocess.run(
        [MAKE, "--no-print-directory", *args],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_make_test_installs_the_debian_packages_it_needs_first() -> None:
    plan = subprocess.run(
        [MAKE or "make", "-n", "test"], cwd=ROOT, capture_output=True, text=True, timeout=30
    )
    assert plan.returncode == 0, plan.stderr
    # The apt step comes before pytest, and names every package with the command it provides.
    install = plan.stdout.index("apt-get install")
    assert install < plan.stdout.index("-m pytest")
    assert "chromium:chromium docker-compose:docker-compose prometheus:promtool" in plan.stdout


def test_as_root_apt_get_runs_without_sudo(tmp_path: Path) -> None:
    project, env, calls = bare_debian(tmp_path, uid=0)
    script(Path(env["PATH"]) / "sudo", "echo 'sudo must not run as root' >&2; exit 1\n")
    done = run_make(project, env, "test-deps")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "installing Debian's chromium docker-compose prometheus" in done.stdout
    assert calls.read_text().splitlines() == [
        "apt-get DEBIAN_FRONTEND= update -qq",
        "apt-get DEBIAN_FRONTEND=noninteractive install -y -qq chromium docker-compose prometheus",
    ]


def test_as_a_user_apt_get_runs_through_sudo(tmp_path: Path) -> None:
    project, env, calls = bare_debian(tmp_path, uid=1000)
    done = run_make(project, env, "test-deps")
    assert done.returncode == 0, done.stdout + done.stderr
    assert calls.read_text().splitlines() == [
        "sudo apt-get update -qq",
        "apt-get DEBIAN_FRONTEND= update -qq",
        "sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium docker-compose"
        " prometheus",
        "apt-get DEBIAN_FRONTEND=noninteractive install -y -qq chromium docker-compose prometheus",
    ]


def test_only_what_is_missing_is_installed_and_nothing_when_all_is_there(tmp_path: Path) -> None:
    project, env, calls = bare_debian(tmp_path, uid=0)
    script(Path(env["PATH"]) / "docker-compose", "exit 0\n")
    # The prometheus package is known by its promtool: a `prometheus` command alone (the server,
    # from elsewhere) does not count.
    script(Path(env["PATH"]) / "prometheus", "exit 0\n")
    assert run_make(project, env, "test-deps").returncode == 0
    assert calls.read_text().splitlines()[-1].endswith("install -y -qq chromium prometheus")
    calls.unlink()
    script(Path(env["PATH"]) / "chromium", "exit 0\n")
    script(Path(env["PATH"]) / "promtool", "exit 0\n")
    done = run_make(project, env, "test-deps")
    assert done.returncode == 0, done.stderr
    assert not calls.exists() and done.stdout == ""


def test_a_failed_apt_get_fails_make(tmp_path: Path) -> None:
    project, env, _ = bare_debian(tmp_path, uid=0)
    script(Path(env["PATH"]) / "apt-get", "exit 100\n")
    assert run_make(project, env, "test-deps").returncode != 0


def test_a_python_without_venv_is_named_with_the_debian_package(tmp_path: Path) -> None:
    project, env, _ = bare_debian(tmp_path, uid=0)
    shutil.copy(ROOT / "pyproject.toml", project / "pyproject.toml")
    (project / "client").mkdir()
    shutil.copy(ROOT / "client" / "pyproject.toml", project / "client" / "pyproject.toml")
    # A real Python whose venv module is gone, as on Debian before python3-venv.
    shadow = tmp_path / "shadow"
    (shadow / "venv").mkdir(parents=True)
    (shadow / "venv" / "__init__.py").write_text("raise ImportError('No module named venv')\n")
    python = script(tmp_path / "python3", f'PYTHONPATH={shadow} exec {sys.executable} "$@"\n')
    done = run_make(project, env, f"PY={python}", ".venv/.installed")
    assert done.returncode != 0
    assert "apt-get install python3-venv" in done.stderr
    assert not (project / ".venv").exists()
