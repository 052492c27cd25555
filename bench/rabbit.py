"""`--peer rabbitmq`: Debian's rabbitmq-server, run on loopback by us, driven by each of two
Python clients: pika (BlockingConnection, one per worker thread) and aio-pika (asyncio).

The server runs from a temp dir (its own node name, AMQP, distribution and epmd ports, no
plugins) in its own process group, and is stopped by PID. Every scenario runs with both
clients; the report shows the faster one per scenario (and the JSON keeps both), so that
RabbitMQ's figures are RabbitMQ's, not one client's.
"""

from __future__ import annotations

import argparse

from bench.config import Profile
from bench.install import version
from bench.rabbit_server import CLIENTS, DURABILITY, PACKAGE, SERVER, RabbitServer, wait_amqp
from bench.shape import Runner, run_clients
from bench.stats import Results, RunMatrix, log

__all__ = [
    "CLIENTS",
    "DURABILITY",
    "PACKAGE",
    "SERVER",
    "RabbitServer",
    "run",
    "runners",
    "wait_amqp",
]


def runners(client: str) -> dict[int, Runner[RabbitServer]]:
    if client == "pika":
        from bench import rabbit_pika

        return rabbit_pika.RUNNERS
    if client == "aio-pika":
        from bench import rabbit_aio

        return rabbit_aio.RUNNERS
    raise ValueError(f"unknown RabbitMQ client {client!r}; choose from {CLIENTS}")


async def run(
    args: argparse.Namespace,
    profile: Profile,
    results: Results,
    run_matrix: RunMatrix,
) -> str:
    """Starts, drives (with each client of `args.rabbitmq_clients` in turn) and stops
    RabbitMQ; returns its version. Results go to `results["rabbitmq/<client>"]`."""
    with RabbitServer() as server:
        log(f"[rabbitmq] {version(PACKAGE)} pid {server.pid} on {server.url} ({server.node})")
        await wait_amqp(server.url, server.boot_timeout)
        clients = {client: runners(client) for client in args.rabbitmq_clients}
        await run_clients("rabbitmq", server, clients, args, profile, results, run_matrix)
    return version(PACKAGE)
