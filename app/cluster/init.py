"""CLUSTER_INIT: the topology a node seeds an empty store with."""

from __future__ import annotations

import msgspec
from lionmq.topology import (
    InvalidTopology,
    Topology,
    decode_set_nodes,
    decode_topology,
    next_topology,
)


def parse_cluster_init(text: str) -> Topology:
    """The topology CLUSTER_INIT gives: a full document (`{"version", "shards": [{"id", ...}]}`)
    or only its nodes (`{"shards": [{"primary", "backups"}]}`, ids given as s1, s2, ...), as
    version 1 unless the document says otherwise. ValueError names what is wrong."""
    try:
        raw = msgspec.json.decode(text)
        if not isinstance(raw, dict):
            raise InvalidTopology("Invalid topology", "CLUSTER_INIT must be a JSON object")
        if "version" in raw:
            return decode_topology(text)
        return next_topology(None, decode_set_nodes(text))
    except (msgspec.MsgspecError, InvalidTopology) as exc:
        raise ValueError(f"CLUSTER_INIT is not a topology: {exc}") from None


__all__ = ["parse_cluster_init"]
