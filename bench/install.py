"""Installs the peers' servers from Debian's packages when they are missing: one
`apt-get update`, one `apt-get install`, no service started by the packages' scripts."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

POLICY_RC = Path("/usr/sbin/policy-rc.d")
# Another apt run (a second session, unattended-upgrades) holds the lock for a while.
LOCK_WAIT_S = 600


def missing(binaries: Mapping[str, Path]) -> list[str]:
    """The packages (keys) whose server binary (value) is not installed."""
    return [package for package, binary in binaries.items() if not binary.exists()]


def ensure_installed(binaries: Mapping[str, Path], policy_rc: Path = POLICY_RC) -> None:
    """Installs each package of `binaries` whose binary is missing. As root it runs apt-get
    itself, otherwise through sudo; while it runs, a policy-rc.d (removed afterwards) keeps the
    packages from starting system services that would compete for the CPU."""
    packages = missing(binaries)
    if not packages:
        return
    print(f"[bench] installing {', '.join(packages)} with apt", file=sys.stderr, flush=True)
    root = os.geteuid() == 0
    apt = [
        *([] if root else ["sudo"]),
        "env",
        "DEBIAN_FRONTEND=noninteractive",
        "apt-get",
        "-o",
        f"DPkg::Lock::Timeout={LOCK_WAIT_S}",
    ]
    added_policy = False
    if root and not policy_rc.exists():
        policy_rc.write_text("#!/bin/sh\n# bench: no service starts during install\nexit 101\n")
        policy_rc.chmod(0o755)
        added_policy = True
    try:
        subprocess.run([*apt, "update", "-qq"], check=True)
        subprocess.run([*apt, "install", "-y", "-qq", *packages], check=True)
    finally:
        if added_policy:
            policy_rc.unlink(missing_ok=True)
    if not added_policy:
        # Nothing kept the packages from starting their system services: stop them, so they
        # do not compete for the CPU (a service that is not running is no error here).
        for package in packages:
            stop = [*([] if root else ["sudo"]), "service", package, "stop"]
            subprocess.run(stop, capture_output=True, check=False)
    if still := missing(binaries):
        raise RuntimeError(f"apt-get installed {still} but their servers are not where expected")


def version(package: str) -> str:
    out = subprocess.run(
        ["dpkg-query", "-W", "-f=${Version}", package], capture_output=True, text=True
    )
    return out.stdout.strip() or "unknown"
