"""The topology model: validation, and set_nodes turned into the next topology, from tables."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest
from lionmq import (
    InvalidTopology,
    Ring,
    SetNodes,
    Shard,
    ShardSpec,
    Topology,
    decode_set_nodes,
    decode_topology,
    next_topology,
    set_nodes_request,
    validate_topology,
)
from lionmq.topology import MAX_SHARDS, normalize_url

A, B, C, D, E, X = (f"http://{n}:8000" for n in "abcdex")


def doc(*shards: tuple[str, str, list[str]], version: int = 1) -> dict[str, Any]:
    return {
        "version": version,
        "shards": [{"id": i, "primary": p, "backups": b} for i, p, b in shards],
    }


def topology(*shards: tuple[str, str, list[str]], seq: int = 0, version: int = 1) -> Topology:
    return validate_topology(
        Topology(version, tuple(Shard(i, p, tuple(b)) for i, p, b in shards), shard_seq=seq)
    )


def request(*shards: tuple[str, list[str]]) -> SetNodes:
    return SetNodes(tuple(ShardSpec(p, tuple(b)) for p, b in shards))


@pytest.mark.parametrize(
    ("url", "normal"),
    [
        ("http://a:8000", "http://a:8000"),
        ("HTTP://Node-1.Example:8000/", "http://node-1.example:8000"),
        ("https://lionmq_node_2:443", "https://lionmq_node_2:443"),
        ("http://127.0.0.1:9", "http://127.0.0.1:9"),
        ("http://[0:0::1]:80/", "http://[::1]:80"),
    ],
)
def test_node_urls_are_normalised(url: str, normal: str) -> None:
    assert normalize_url(url) == normal


@pytest.mark.parametrize(
    "url",
    [
        "ftp://a:8000",
        "a:8000",
        "http://a",  # no port
        "http://a:0",
        "http://a:70000",
        "http://a:http",
        "http://:8000",
        "http://a:8000/queue",
        "http://a:8000//",
        "http://a:8000?x=1",
        "http://a:8000/?",
        "http://a:8000#top",
        "http://user:pw@a:8000",
        "http://a b:8000",
        "http://a\n:8000",
        "http://-a:8000",
        "http://a%2e:8000",
        "http://[::1:8000",
        "http://[nope]:8000",
        "",
    ],
)
def test_malformed_node_urls_are_refused(url: str) -> None:
    with pytest.raises(InvalidTopology, match="must be http\\(s\\)://host:port"):
        normalize_url(url)


@pytest.mark.parametrize(
    ("document", "message"),
    [
        (doc(), "needs at least one shard"),
        (doc(("s1", A, []), version=0), "version 0"),
        (doc(("s1", A, []), ("s1", B, [])), "shard id s1 appears twice"),
        (doc(("S1", A, [])), "shard id 'S1' must match"),
        (doc(("s0", A, [])), "shard id s0 is reserved"),
        (doc(("1", A, [])), "shard id '1' must match"),
        (doc(("", A, [])), "shard id '' must match"),
        (doc(("s" * 33, A, [])), "must match"),
        (
            doc(("s1", A, []), ("s2", B, [A])),
            f"{A} is the primary of shard s1 and a backup of shard s2",
        ),
        (doc(("s1", A, [B]), ("s2", B, [])), f"{B} is a backup of shard s1 and the primary of"),
        (doc(("s1", A, [B, B])), f"{B} is a backup of shard s1 and a backup of shard s1"),
        (doc(("s1", A, [A])), f"{A} is the primary of shard s1 and a backup of shard s1"),
        (doc(("s1", A, []), ("s2", "HTTP://A:8000/", [])), f"{A} is the primary of shard s1"),
        (doc(("s1", "http://a:8000/x", [])), "must be http"),
        (
            doc(*((f"s{k}", f"http://n{k}:1", []) for k in range(1, MAX_SHARDS + 1))),
            "more than the 63",
        ),
        ({"version": 1}, "missing required field `shards`"),
        ({"version": "1", "shards": []}, "Expected `int`"),
    ],
)
def test_invalid_topologies_are_refused_with_the_reason(
    document: dict[str, Any], message: str
) -> None:
    with pytest.raises(InvalidTopology, match=message.replace("(", "\\(").replace(")", "\\)")):
        decode_topology(msgspec.json.encode(document))


def test_not_json_is_an_invalid_topology() -> None:
    with pytest.raises(InvalidTopology, match="Invalid Topology document"):
        decode_topology(b"{nope")


def test_a_topology_round_trips_through_its_document() -> None:
    t = topology(("s1", A, [B]), ("s2", C, []), seq=2, version=7)
    data = msgspec.json.encode(t)
    assert msgspec.json.decode(data) == {
        "version": 7,
        "shards": [
            {"id": "s1", "primary": A, "backups": [B], "slot": 1},
            {"id": "s2", "primary": C, "backups": [], "slot": 2},
        ],
        "shard_seq": 2,
    }
    assert decode_topology(data) == t
    assert t.shard("s2").primary == C and t.shard_ids == ("s1", "s2")


def test_validation_normalises_urls_and_covers_existing_ids_in_shard_seq() -> None:
    t = decode_topology(msgspec.json.encode(doc(("s7", "HTTP://A:8000/", ["http://B:8000"]))))
    assert t == Topology(1, (Shard("s7", A, (B,), slot=1),), shard_seq=7)


S12 = (("s1", A, [B]), ("s2", C, [D]))  # two shards, each with a backup


@pytest.mark.parametrize(
    ("current", "seq", "wanted", "ids"),
    [
        pytest.param((), 0, [(A, [B]), (C, [])], ["s1", "s2"], id="first topology"),
        pytest.param(S12, 2, [(B, [A]), (C, [D])], ["s1", "s2"], id="failover swaps"),
        pytest.param(S12, 2, [(B, []), (C, [D])], ["s1", "s2"], id="failover drops primary"),
        pytest.param(S12, 2, [(A, [E]), (C, [D])], ["s1", "s2"], id="new backup"),
        pytest.param(S12, 2, [(C, [D]), (A, [B])], ["s2", "s1"], id="reordered"),
        pytest.param(S12, 2, [(A, [B]), (C, [D]), (E, [])], ["s1", "s2", "s3"], id="added"),
        pytest.param(S12, 2, [(C, [D])], ["s2"], id="removed"),
        pytest.param((("s2", C, []),), 2, [(C, []), (E, [])], ["s2", "s3"], id="no reuse"),
        pytest.param((("s1", A, [B]),), 1, [(B, []), (A, [])], ["s2", "s1"], id="split"),
        pytest.param(S12, 2, [(A, [C])], ["s1"], id="merged"),
        pytest.param(S12, 2, [(X, [A, C])], ["s1"], id="tie goes to the first"),
        pytest.param(S12, 2, [(X, [D]), (E, [B])], ["s2", "s1"], id="matched by backups"),
        pytest.param((("s1", A, []),), 1, [(X, [])], ["s2"], id="all nodes replaced"),
    ],
)
def test_set_nodes_keeps_the_ids_of_shards_still_there(
    current: tuple[tuple[str, str, list[str]], ...],
    seq: int,
    wanted: list[tuple[str, list[str]]],
    ids: list[str],
) -> None:
    before = topology(*current, seq=seq, version=4) if current else None
    after = next_topology(before, request(*wanted))
    assert after.shard_ids == tuple(ids)
    assert [(s.primary, list(s.backups)) for s in after.shards] == wanted
    assert after.version == (5 if before else 1)
    fresh = [i for i in ids if before is None or i not in before.shard_ids]
    assert after.shard_seq == seq + len(fresh)
    assert validate_topology(after) == after


def test_a_failover_moves_no_channel() -> None:
    before = topology(*S12, seq=2)
    after = next_topology(before, request((B, [A]), (D, [C])))
    channels = [f"ch-{i}" for i in range(500)]
    old, new = Ring(before.shard_ids), Ring(after.shard_ids)
    assert [old.shard_for(c) for c in channels] == [new.shard_for(c) for c in channels]


def test_set_nodes_that_changes_nothing_keeps_the_version() -> None:
    before = topology(*S12, seq=2, version=3)
    same = request(("HTTP://A:8000/", [B]), (C, ["http://d:8000/"]))
    after = next_topology(before, same)
    assert after == before and after.version == 3


@pytest.mark.parametrize(
    ("wanted", "message"),
    [
        ([], "needs at least one shard"),
        ([(A, []), (A, [])], f"{A} is the primary of shard 1 and the primary of shard 2"),
        ([(A, [B]), (C, [B])], f"{B} is a backup of shard 1 and a backup of shard 2"),
        ([(A, ["http://b:8000/path"])], "must be http"),
    ],
)
def test_invalid_set_nodes_requests_are_refused(
    wanted: list[tuple[str, list[str]]], message: str
) -> None:
    with pytest.raises(InvalidTopology, match=message):
        next_topology(topology(*S12, seq=2), request(*wanted))


def test_set_nodes_body_is_decoded_strictly() -> None:
    body = {"shards": [{"primary": "http://A:8000/", "backups": [B]}]}
    assert decode_set_nodes(msgspec.json.encode(body)) == request((A, [B]))
    with pytest.raises(InvalidTopology, match="unknown field `backup`"):
        decode_set_nodes(msgspec.json.encode({"shards": [{"primary": A, "backup": [B]}]}))


@pytest.mark.parametrize(
    ("primaries", "backups", "expected"),
    [
        ([A, C], {A: [B]}, [(A, [B]), (C, [])]),
        ([A], None, [(A, [])]),
        (["HTTP://A:8000/"], {"http://a:8000/": ["http://B:8000"]}, [(A, [B])]),
    ],
)
def test_set_nodes_form_is_converted(
    primaries: list[str],
    backups: dict[str, list[str]] | None,
    expected: list[tuple[str, list[str]]],
) -> None:
    assert set_nodes_request(primaries, backups) == request(*expected)


@pytest.mark.parametrize(
    ("primaries", "backups", "message"),
    [
        ([A], {C: [D]}, f"backups are given for {C}, not a primary"),
        ([A], {A: [B], "http://A:8000/": [C]}, f"backups for {A} are given twice"),
        ([A, C], {A: [C]}, f"{C} is a backup of shard 1 and the primary of shard 2"),
        ([], None, "needs at least one shard"),
    ],
)
def test_set_nodes_form_is_refused(
    primaries: list[str], backups: dict[str, list[str]] | None, message: str
) -> None:
    with pytest.raises(InvalidTopology, match=message):
        set_nodes_request(primaries, backups)


# -- id slots --------------------------------------------------------------------------------


def slotted(*shards: tuple[str, str, int | None]) -> dict[str, Any]:
    """A document of shards (id, primary, slot or None for none given)."""
    return {
        "version": 1,
        "shards": [
            {"id": i, "primary": p, **({} if slot is None else {"slot": slot})}
            for i, p, slot in shards
        ],
    }


@pytest.mark.parametrize(
    ("document", "slots"),
    [
        pytest.param(slotted(("s1", A, None)), [1], id="one without"),
        pytest.param(
            slotted(("s1", A, None), ("s2", B, None), ("s3", C, None)), [1, 2, 3], id="in order"
        ),
        pytest.param(slotted(("s9", A, None), ("s2", B, None)), [1, 2], id="by order, not id"),
        pytest.param(slotted(("s1", A, 5), ("s2", B, 2)), [5, 2], id="given are kept"),
        pytest.param(
            slotted(("s1", A, None), ("s2", B, 1), ("s3", C, None)), [2, 1, 3], id="mixed"
        ),
        pytest.param(slotted(("s1", A, MAX_SHARDS - 1)), [MAX_SHARDS - 1], id="highest"),
        pytest.param(
            doc(*((f"s{k}", f"http://n{k}:1", []) for k in range(1, MAX_SHARDS))),
            list(range(1, MAX_SHARDS)),
            id="the most shards",
        ),
    ],
)
def test_a_document_gets_its_missing_slots_in_order(
    document: dict[str, Any], slots: list[int]
) -> None:
    t = decode_topology(msgspec.json.encode(document))
    assert [s.slot for s in t.shards] == slots
    assert decode_topology(msgspec.json.encode(t)) == t  # stored with them from then on


@pytest.mark.parametrize(
    ("document", "message"),
    [
        (slotted(("s1", A, 1), ("s2", B, 1)), "shards s1 and s2 both have slot 1"),
        (slotted(("s1", A, 3), ("s2", B, None), ("s3", C, 3)), "shards s1 and s3 both have slot"),
        (slotted(("s1", A, MAX_SHARDS)), f"slot {MAX_SHARDS}, outside 1..{MAX_SHARDS - 1}"),
        (slotted(("s1", A, -1)), "slot -1, outside"),
        ({"version": 1, "shards": [{"id": "s1", "primary": A, "slot": "1"}]}, "Expected `int`"),
    ],
)
def test_bad_slots_are_refused(document: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidTopology, match=message):
        decode_topology(msgspec.json.encode(document))


def with_slots(*shards: tuple[str, str, list[str], int]) -> Topology:
    return validate_topology(
        Topology(
            4,
            tuple(Shard(i, p, tuple(b), slot) for i, p, b, slot in shards),
            shard_seq=max(int(i[1:]) for i, *_ in shards),
        )
    )


S12_SLOTS = (("s1", A, [B], 1), ("s2", C, [D], 2))


@pytest.mark.parametrize(
    ("current", "wanted", "slots"),
    [
        pytest.param((), [(A, []), (C, [])], [1, 2], id="first topology"),
        pytest.param(S12_SLOTS, [(B, [A]), (C, [D])], [1, 2], id="failover keeps"),
        pytest.param(S12_SLOTS, [(C, [D]), (A, [B])], [2, 1], id="reordered keeps"),
        pytest.param(S12_SLOTS, [(A, [B]), (C, [D]), (E, [])], [1, 2, 3], id="added"),
        pytest.param(S12_SLOTS, [(C, [D])], [2], id="removed"),
        # s1 leaves while s3 comes: s3 must not mint in s1's slot while s1 may still do so.
        pytest.param(S12_SLOTS, [(C, [D]), (E, [])], [2, 3], id="not a leaving shard's slot"),
        pytest.param((("s2", C, [D], 2),), [(C, [D]), (E, [])], [2, 1], id="freed slot reused"),
        pytest.param(
            (("s1", A, [], 1), ("s3", C, [], 3)), [(A, []), (C, []), (E, [])], [1, 3, 2], id="hole"
        ),
        pytest.param(
            (("s1", A, [], 7),), [(X, []), (A, []), (E, [])], [1, 7, 2], id="smallest first"
        ),
        pytest.param((("s1", A, [B], 5),), [(B, []), (A, [])], [1, 5], id="split"),
    ],
)
def test_set_nodes_keeps_slots_and_gives_new_shards_free_ones(
    current: tuple[tuple[str, str, list[str], int], ...],
    wanted: list[tuple[str, list[str]]],
    slots: list[int],
) -> None:
    before = with_slots(*current) if current else None
    after = next_topology(before, request(*wanted))
    assert [s.slot for s in after.shards] == slots
    for shard in after.shards:  # a kept shard id keeps its slot
        if before is not None and shard.id in before.shard_ids:
            assert before.shard(shard.id).slot == shard.slot
    assert validate_topology(after) == after


def test_set_nodes_with_every_slot_held_cannot_swap_a_shard_in_one_step() -> None:
    full = validate_topology(
        Topology(
            1, tuple(Shard(f"s{k}", f"http://n{k}:1") for k in range(1, MAX_SHARDS)), shard_seq=63
        )
    )
    assert len(full.shards) == MAX_SHARDS - 1
    swapped = [(s.primary, []) for s in full.shards[1:]] + [(X, [])]
    with pytest.raises(InvalidTopology, match="no id slot is free"):
        next_topology(full, request(*swapped))
    # In two steps: remove, then add (the freed slot goes to the new shard).
    fewer = next_topology(full, request(*swapped[:-1]))
    again = next_topology(fewer, request(*swapped))
    assert again.shards[-1].slot == 1 and again.shards[-1].id == f"s{MAX_SHARDS}"
