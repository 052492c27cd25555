"""GET /cluster documents for the watcher's tests: a 2-shard cluster, s1 = A with backup B,
s2 = C with backup D, as node `me` would report it."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

LEASE = 2000
A = "http://127.0.0.1:7001"  # primary of s1
B = "http://127.0.0.1:7002"  # backup of s1
C = "http://127.0.0.1:7003"  # primary of s2
D = "http://127.0.0.1:7004"  # backup of s2
IDS = {A: "node-a", B: "node-b", C: "node-c", D: "node-d"}


def cluster_doc(
    me: str,
    owners: dict[str, tuple[str | None, int, int | None]],
    *,
    down: frozenset[str] = frozenset(),
    lag: dict[str, dict[str, int]] | None = None,
    version: int = 1,
    primaries: dict[str, str] | None = None,
) -> dict[str, Any]:
    """`me`'s GET /cluster: shard -> (owner url, epoch, lease expires in ms)."""
    members = {"s1": (A, [B]), "s2": (C, [D])}
    if primaries:
        members = {s: (primaries.get(s, p), bs) for s, (p, bs) in members.items()}
    shards = []
    for slot, (sid, (primary, backups)) in enumerate(sorted(members.items()), start=1):
        owner, epoch, expires = owners[sid]
        shards.append(
            {
                "id": sid,
                "slot": slot,
                "primary": primary,
                "backups": backups,
                "owner": owner,
                "owner_id": IDS[owner] if owner else None,
                "epoch": epoch,
                "lease_expires_in_ms": expires,
                "channels": 10 * slot,
            }
        )
    nodes = []
    for url in (A, B, C, D):
        shard_ids = [s for s, (p, bs) in members.items() if url == p or url in bs]
        owns = any(o == url for o, _, _ in owners.values())
        configured = any(url == p for p, _ in members.values())
        nodes.append(
            {
                "url": url,
                "id": IDS[url],
                "role": "primary" if owns or configured else "backup",
                "shards": shard_ids,
                "status": "down" if url in down else "up",
                "heartbeat_age_ms": 100,
                "lag": (lag or {}).get(url),
                "applied_version": version,
            }
        )
    role = "primary" if any(o == me for o, _, _ in owners.values()) else "backup"
    return {
        "version": version,
        "node": {"id": IDS[me], "url": me, "role": role},
        "shards": shards,
        "nodes": nodes,
    }


def write_view(path: Path, doc: dict[str, Any]) -> None:
    """Replace a fake node's view at once (it reads the file for every snapshot)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc))
    os.replace(tmp, path)
