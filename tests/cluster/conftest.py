"""Fixtures of the cluster tests: clusters started and always killed, a ledger."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from tests.cluster.ledger import Ledger
from tests.cluster.nodes import Cluster

ClusterFactory = Callable[..., Cluster]


@pytest.fixture
def cluster_factory(tmp_path: Path) -> Iterator[ClusterFactory]:
    """`cluster_factory(layout, spare=0, **build_kwargs)`: a started cluster on a fresh SQLite
    file, killed (with its proxies) when the test ends, pass or fail."""
    built: list[Cluster] = []

    def make(layout: Sequence[Sequence[int]], **kwargs: Any) -> Cluster:
        data = tmp_path / f"cluster{len(built)}"
        cluster = Cluster.build(data, layout, **kwargs)
        built.append(cluster)
        return cluster.start()

    yield make
    for cluster in built:
        cluster.stop()


@pytest.fixture(scope="module")
def two_shards(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """2 shards x (primary + backup), fast timings, shared by a module's read-only tests."""
    cluster = Cluster.build(tmp_path_factory.mktemp("two-shards"), [[0, 1], [2, 3]])
    try:
        yield cluster.start()
    finally:
        cluster.stop()


@pytest.fixture
def ledger() -> Ledger:
    return Ledger()
