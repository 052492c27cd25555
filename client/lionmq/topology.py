"""The cluster topology: the shards, and the primary and backups that serve each.

The document lives in the store as
`{"version": n, "shards": [{"id": "s1", "slot": 1, "primary": url, "backups": [url, ...]}, ...],
"shard_seq": k}`. Channels are placed on shard ids (see `lionmq.placement`), so ids must
outlive the nodes that serve them: `next_topology` keeps a shard's id across a failover
or a change of backups, and fresh ids `s<k>` come from `shard_seq`, the highest k ever
issued, so a removed shard's id never comes back to mean another shard.

Each shard also has an id slot (1 .. MAX_SHARDS - 1; 0 is the implicit shard's, the store's
one shard before any topology): the part of a message id that keeps the primaries of different
shards from minting the same id (see `app.engine.ids`). A shard keeps its slot as long as it
keeps its id, and a new shard gets a slot no shard of the topology it replaces holds, so a
shard on its way out and one on its way in never mint in one slot at once.

Everything here is pure (no I/O): node and client validate with the same functions.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Collection, Iterator, Mapping, Sequence
from typing import TypeVar
from urllib.parse import urlsplit

import msgspec

from lionmq.errors import InvalidRequest

# The number of message-id slots (see `app.engine.ids`); slot 0 is the implicit shard's, so a
# topology holds at most MAX_SHARDS - 1 shards. Also bounds the ring every node and client builds.
MAX_SHARDS = 64
# With no topology stored, the store is one shard: this one, in this slot. Neither is ever a
# stored topology's (fresh ids start at s1), so its lease never mixes with a real shard's.
IMPLICIT_SHARD = "s0"
IMPLICIT_SLOT = 0
SHARD_ID = re.compile(r"[a-z][a-z0-9-]{0,31}")
_FRESH_ID = re.compile(r"s([1-9][0-9]*)")
_HOSTNAME = re.compile(r"[a-z0-9](?:[a-z0-9._-]*[a-z0-9])?")

_T = TypeVar("_T")


class InvalidTopology(InvalidRequest):
    """A topology or set_nodes request that breaks a rule; the message says which and where."""


class Shard(msgspec.Struct, frozen=True):
    id: str
    primary: str
    backups: tuple[str, ...] = ()
    # 1 .. MAX_SHARDS - 1 once validated; 0 (IMPLICIT_SLOT) in a document that gives none,
    # which `validate_topology` fills in.
    slot: int = IMPLICIT_SLOT

    @property
    def members(self) -> tuple[str, ...]:
        return (self.primary, *self.backups)


class Topology(msgspec.Struct, frozen=True):
    version: int
    shards: tuple[Shard, ...]
    shard_seq: int = 0  # the highest k of any id s<k> ever issued; those ids are never reused

    @property
    def shard_ids(self) -> tuple[str, ...]:
        return tuple(shard.id for shard in self.shards)

    def shard(self, shard_id: str) -> Shard:
        for shard in self.shards:
            if shard.id == shard_id:
                return shard
        raise KeyError(shard_id)


class ShardSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One shard as a set_nodes request gives it: its nodes, no id."""

    primary: str
    backups: tuple[str, ...] = ()

    @property
    def members(self) -> tuple[str, ...]:
        return (self.primary, *self.backups)


class SetNodes(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The body of a set_nodes request: `{"shards": [{"primary": url, "backups": [...]}]}`."""

    shards: tuple[ShardSpec, ...]


def normalize_url(url: str) -> str:
    """`scheme://host:port` for a node URL, or InvalidTopology if it is anything more or less.

    Scheme and host are lowercased and a trailing slash dropped, so one node has one spelling
    and the duplicate check cannot be dodged by writing it twice differently.
    """
    bad = InvalidTopology(
        "Invalid node URL",
        f"{url!r} must be http(s)://host:port, with no path, query, fragment or userinfo",
    )
    if not url.isprintable() or any(c in url for c in " ?#@"):
        raise bad
    try:  # urlsplit refuses a broken [IPv6] host, .port a non-number or one over 65535
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise bad from None
    scheme = parts.scheme.lower()
    host = parts.hostname or ""
    if scheme not in ("http", "https") or parts.path not in ("", "/") or not port:
        raise bad
    if ":" in host:
        try:
            host = f"[{ipaddress.IPv6Address(host).compressed}]"
        except ValueError:
            raise bad from None
    elif not _HOSTNAME.fullmatch(host):
        raise bad
    return f"{scheme}://{host}:{port}"


def _checked_nodes(
    shards: Sequence[tuple[str, str, Sequence[str]]],
) -> list[tuple[str, tuple[str, ...]]]:
    """Normalise each (label, primary, backups) and check every node serves one shard once."""
    if not shards:
        raise InvalidTopology("Invalid topology", "a topology needs at least one shard")
    if len(shards) > MAX_SHARDS - 1:
        raise InvalidTopology(
            "Invalid topology",
            f"{len(shards)} shards is more than the {MAX_SHARDS - 1} allowed",
        )
    where: dict[str, str] = {}
    checked = []
    for label, primary, backups in shards:
        nodes = (normalize_url(primary), *(normalize_url(b) for b in backups))
        for i, url in enumerate(nodes):
            role = f"{'the primary' if i == 0 else 'a backup'} of {label}"
            if url in where:
                raise InvalidTopology("Node listed twice", f"{url} is {where[url]} and {role}")
            where[url] = role
        checked.append((nodes[0], nodes[1:]))
    return checked


def validate_topology(topology: Topology) -> Topology:
    """The topology with node URLs normalised, or InvalidTopology naming the broken rule.

    `shard_seq` is raised to cover every `s<k>` id present, so a hand-written document
    without it still never gets one of its ids issued again. Shards without a slot (a
    hand-written document) get the smallest ones free, in order: 1, 2, ... when none has one.
    """
    if topology.version < 1:
        raise InvalidTopology("Invalid topology", f"version {topology.version} is not >= 1")
    ids: set[str] = set()
    for shard in topology.shards:
        if not SHARD_ID.fullmatch(shard.id):
            raise InvalidTopology(
                "Invalid topology", f"shard id {shard.id!r} must match {SHARD_ID.pattern}"
            )
        if shard.id == IMPLICIT_SHARD:
            raise InvalidTopology(
                "Invalid topology",
                f"shard id {IMPLICIT_SHARD} is reserved for the store's one shard before any"
                " topology",
            )
        if shard.id in ids:
            raise InvalidTopology("Invalid topology", f"shard id {shard.id} appears twice")
        ids.add(shard.id)
    nodes = _checked_nodes([(f"shard {s.id}", s.primary, s.backups) for s in topology.shards])
    given: dict[int, str] = {}
    for shard in topology.shards:
        if shard.slot == IMPLICIT_SLOT:
            continue
        if not IMPLICIT_SLOT < shard.slot < MAX_SHARDS:
            raise InvalidTopology(
                "Invalid topology",
                f"shard {shard.id} has slot {shard.slot}, outside 1..{MAX_SHARDS - 1}",
            )
        if shard.slot in given:
            raise InvalidTopology(
                "Invalid topology",
                f"shards {given[shard.slot]} and {shard.id} both have slot {shard.slot}",
            )
        given[shard.slot] = shard.id
    free = _free_slots(given)
    return Topology(
        version=topology.version,
        shards=tuple(
            Shard(shard.id, primary, backups, shard.slot or next(free))
            for shard, (primary, backups) in zip(topology.shards, nodes, strict=True)
        ),
        shard_seq=max([topology.shard_seq, *(_fresh_number(i) for i in ids)]),
    )


def validate_set_nodes(request: SetNodes) -> SetNodes:
    """The request with node URLs normalised, or InvalidTopology naming the broken rule."""
    nodes = _checked_nodes(
        [(f"shard {i}", s.primary, s.backups) for i, s in enumerate(request.shards, 1)]
    )
    return SetNodes(tuple(ShardSpec(primary, backups) for primary, backups in nodes))


def set_nodes_request(
    primaries: Sequence[str], backups: Mapping[str, Sequence[str]] | None = None
) -> SetNodes:
    """The set_nodes request for `set_nodes(primaries=[...], backups={primary: [...]})`."""
    by_primary: dict[str, tuple[str, ...]] = {}
    for primary, urls in (backups or {}).items():
        key = normalize_url(primary)
        if key in by_primary:
            raise InvalidTopology("Node listed twice", f"backups for {key} are given twice")
        by_primary[key] = tuple(urls)
    specs = [normalize_url(p) for p in primaries]
    unknown = sorted(set(by_primary) - set(specs))
    if unknown:
        raise InvalidTopology(
            "Invalid topology", f"backups are given for {', '.join(unknown)}, not a primary"
        )
    return validate_set_nodes(SetNodes(tuple(ShardSpec(p, by_primary.get(p, ())) for p in specs)))


def next_topology(current: Topology | None, request: SetNodes) -> Topology:
    """The topology after `request`, keeping the ids of shards that are still there.

    A requested shard keeps the id of the current shard it shares nodes with: the one with
    the same primary first, then the one sharing the most nodes, earlier shards winning
    ties. So a failover (a backup promoted) or new backups keep the id, and no channel
    moves. Shards matching none get fresh ids. A request that changes nothing returns
    `current` (validated) with its version unchanged.
    """
    specs = validate_set_nodes(request).shards
    current = validate_topology(current) if current else None
    old = current.shards if current else ()
    # (same primary, nodes shared, request index, current index) for every overlapping pair
    pairs = [
        (spec.primary == shard.primary, len(set(spec.members) & set(shard.members)), r, o)
        for r, spec in enumerate(specs)
        for o, shard in enumerate(old)
    ]
    kept: dict[int, Shard] = {}  # request index -> the current shard it keeps
    taken: set[int] = set()
    for _, shared, r, o in sorted(pairs, key=lambda p: (not p[0], -p[1], p[2], p[3])):
        if shared and r not in kept and o not in taken:
            kept[r] = old[o]
            taken.add(o)
    seq = current.shard_seq if current else 0
    # A new shard's slot is held by no current shard: one leaving may still be minting in it.
    free = _free_slots({shard.slot for shard in old})
    shards = []
    for r, spec in enumerate(specs):
        if r in kept:
            shard_id, slot = kept[r].id, kept[r].slot
        else:
            seq += 1
            shard_id, slot = f"s{seq}", next(free, IMPLICIT_SLOT)
            if slot == IMPLICIT_SLOT:
                raise InvalidTopology(
                    "Invalid topology",
                    f"no id slot is free for a new shard: the current topology holds"
                    f" {len(old)} of the {MAX_SHARDS - 1}; remove shards in one set_nodes"
                    " and add new ones in the next",
                )
        shards.append(Shard(shard_id, spec.primary, spec.backups, slot))
    if current is not None and tuple(shards) == old:
        return current
    version = current.version + 1 if current else 1
    return validate_topology(Topology(version, tuple(shards), shard_seq=seq))


def decode_topology(data: bytes | str) -> Topology:
    """A stored or served topology document, decoded and validated."""
    return validate_topology(_decode(data, Topology))


def decode_set_nodes(data: bytes | str) -> SetNodes:
    """A set_nodes request body, decoded and validated."""
    return validate_set_nodes(_decode(data, SetNodes))


def _decode(data: bytes | str, type: type[_T]) -> _T:
    try:
        return msgspec.json.decode(data, type=type)
    except msgspec.MsgspecError as exc:
        raise InvalidTopology(f"Invalid {type.__name__} document", str(exc)) from None


def _free_slots(used: Collection[int]) -> Iterator[int]:
    """The slots 1 .. MAX_SHARDS - 1 not in `used`, smallest first."""
    return (slot for slot in range(IMPLICIT_SLOT + 1, MAX_SHARDS) if slot not in used)


def _fresh_number(shard_id: str) -> int:
    match = _FRESH_ID.fullmatch(shard_id)
    return int(match.group(1)) if match else 0
