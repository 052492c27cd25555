"""Clients wired to an in-memory fake node (see lionmq_fake.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
from lionmq import AsyncClient, Client, RetryPolicy
from lionmq_fake import FakeNode

FAST_RETRY = RetryPolicy(attempts=3, base_delay=0.001, max_delay=0.01)


@pytest.fixture
def node() -> FakeNode:
    return FakeNode()


@pytest.fixture
def client(node: FakeNode) -> Iterator[Client]:
    with Client("http://node", transport=node.transport(), retry=FAST_RETRY) as client:
        yield client


@pytest.fixture
async def aclient(node: FakeNode) -> AsyncIterator[AsyncClient]:
    async with AsyncClient(
        "http://node", transport=node.async_transport(), retry=FAST_RETRY
    ) as client:
        yield client
