"""The brokers `--peer` can run beside LionMQ, each driven by its fastest Python clients."""

from __future__ import annotations

import argparse
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from bench import jetstream, rabbit
from bench.config import Profile
from bench.stats import Results, RunMatrix

Run = Callable[[argparse.Namespace, Profile, Results, RunMatrix], Awaitable[str]]


@dataclass(frozen=True)
class Peer:
    name: str
    """As `--peer` names it, and the prefix of its results ("rabbitmq/pika")."""
    title: str
    package: str
    """Debian's package of the server, installed with apt when `server` is missing."""
    server: Path
    clients: tuple[str, ...]
    durability: str
    run: Run
    """Starts the server, runs the matrix with each client, stops it; returns its version."""


PEERS = {
    "rabbitmq": Peer(
        "rabbitmq",
        "RabbitMQ",
        rabbit.PACKAGE,
        rabbit.SERVER,
        rabbit.CLIENTS,
        rabbit.DURABILITY,
        rabbit.run,
    ),
    "nats": Peer(
        "nats",
        "NATS",
        jetstream.PACKAGE,
        jetstream.SERVER,
        jetstream.CLIENTS,
        jetstream.DURABILITY,
        jetstream.run,
    ),
}


def parse(value: str) -> list[str]:
    """`--peer rabbitmq,nats` or `--peer all`: the peers' names, in PEERS' order."""
    names = {n.strip() for n in value.split(",") if n.strip()}
    if "all" in names:
        return list(PEERS)
    if unknown := names - set(PEERS):
        raise argparse.ArgumentTypeError(
            f"unknown peers {sorted(unknown)}; choose from {', '.join(PEERS)} or all"
        )
    return [name for name in PEERS if name in names]
