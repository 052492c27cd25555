"""What every route needs: the node's long-lived parts (from app.state) and name checks."""

from __future__ import annotations

from dataclasses import dataclass

from starlette.requests import Request

from app.clock import Clock
from app.cluster.runtime import ClusterRuntime
from app.engine.ids import ReceiptSigner
from app.engine.maintenance import Maintenance
from app.engine.queue import QueueEngine
from app.errors import InvalidInput
from app.models import CHANNEL_NAME_RULE, valid_channel_name
from app.settings import Settings
from app.store.base import Store


@dataclass(slots=True)
class Node:
    """Everything the lifespan opened, kept on app.state.node."""

    settings: Settings
    clock: Clock
    store: Store
    engine: QueueEngine
    started_at: int
    maintenance: Maintenance
    receipts: ReceiptSigner
    cluster: ClusterRuntime  # ownership, routing, presence: see its docstring


def node(request: Request) -> Node:
    n: Node = request.app.state.node
    return n


def channel_name(name: str) -> str:
    if not valid_channel_name(name):
        raise InvalidInput(f"channel name {name[:140]!r} is invalid: use {CHANNEL_NAME_RULE}")
    return name
