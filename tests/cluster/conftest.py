"""Fixtures of the cluster tests: clusters started and always killed, a ledger."""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from tests.cluster.ledger import Ledger
from tests.cluster.nodes import Cluster

ClusterFactory = Callable[..., Cluster]


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    # Keeps each phase's report on the test item, so a fixture knows at teardown if it failed.
    report = yield
    item.stash.setdefault(PHASES, {})[report.when] = report
    return report


PHASES = pytest.StashKey[dict[str, pytest.TestReport]]()


def failed(request: pytest.FixtureRequest) -> bool:
    return any(r.failed for r in request.node.stash.get(PHASES, {}).values())


@pytest.fixture
def cluster_factory(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[ClusterFactory]:
    """`cluster_factory(layout, spare=0, **build_kwargs)`: a started cluster on a fresh SQLite
    file, killed (with its proxies) when the test ends, pass or fail; the end of each node's
    log is printed when the test failed."""
    built: list[Cluster] = []

    def make(layout: Sequence[Sequence[int]], **kwargs: Any) -> Cluster:
        data = tmp_path / f"cluster{len(built)}"
        cluster = Cluster.build(data, layout, **kwargs)
        built.append(cluster)
        return cluster.start()

    yield make
    for cluster in built:
        cluster.stop()
        if failed(request):
            print(cluster.log_tails())


@pytest.fixture(scope="module")
def two_shards(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """2 shards x (primary + backup), fast timings, shared by a module's read-only tests."""
    cluster = Cluster.build(tmp_path_factory.mktemp("two-shards"), [[0, 1], [2, 3]])
    try:
        yield cluster.start()
    except BaseException:
        print(cluster.log_tails())
        raise
    finally:
        cluster.stop()


@pytest.fixture
def ledger() -> Ledger:
    return Ledger()
