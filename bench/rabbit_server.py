"""Debian's rabbitmq-server run on loopback by us: started from a temp dir (its own node name,
AMQP, distribution and epmd ports, no plugins) in its own process group, stopped by PID."""

from __future__ import annotations

import contextlib
import os
import subprocess
from pathlib import Path
from typing import Self

import psutil

from bench.ports import ServerProcess, free_port, terminate, until_answers

PACKAGE = "rabbitmq-server"
SERVER = Path("/usr/lib/rabbitmq/bin/rabbitmq-server")
CTL = Path("/usr/lib/rabbitmq/bin/rabbitmqctl")
CLIENTS = ("pika", "aio-pika")
DURABILITY = (
    "durable classic queue, persistent messages (delivery_mode=2); a publish counts once "
    "confirmed (publisher confirms, or tx.commit-ok for pika's batches of 100), which RabbitMQ "
    "sends once the messages are written and fsynced; manual acks, multiple=true every 100"
)


class RabbitServer(ServerProcess):
    """Our own rabbitmq-server on 127.0.0.1, everything under one temp dir."""

    NAME = "rabbitmq-server"

    def __init__(self, *, boot_timeout: float = 90.0) -> None:
        super().__init__(prefix="rabbit-bench-", boot_timeout=boot_timeout)
        self.node = f"bench-{self.port}@localhost"
        self.url = f"amqp://guest:guest@127.0.0.1:{self.port}/"
        self.epmd_port = free_port()
        self.env = {
            **os.environ,
            "HOME": str(self.dir),  # the Erlang cookie lives here, not in root's home
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(free_port()),
            # Erlang distribution (how rabbitmqctl reaches the node) listens on loopback only.
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
            "ERL_EPMD_PORT": str(self.epmd_port),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            "RABBITMQ_MNESIA_BASE": str(self.dir / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.dir / "log"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.dir / "enabled_plugins"),
            "RABBITMQ_CONFIG_FILE": str(self.dir / "rabbitmq"),
            "RABBITMQ_CONF_ENV_FILE": str(self.dir / "rabbitmq-env.conf"),
            "RABBITMQ_PID_FILE": str(self.dir / "rabbit.pid"),
        }

    def start(self) -> Self:
        (self.dir / "enabled_plugins").write_text("[].\n")
        (self.dir / "rabbitmq.conf").write_text(f"listeners.tcp.default = 127.0.0.1:{self.port}\n")
        (self.dir / "rabbitmq-env.conf").write_text("")
        self.launch([str(SERVER)], self.env, f"RabbitMQ's AMQP port {self.port}")
        return self

    def rss_bytes(self) -> int:
        """The server's resident memory: the Erlang VM and its helpers."""
        total = 0
        with contextlib.suppress(psutil.Error):
            root = psutil.Process(self.pid)
            for proc in [root, *root.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):
                    total += proc.memory_info().rss
        return total

    def end(self, proc: subprocess.Popen[bytes]) -> None:
        """rabbitmqctl stop, then SIGTERM to the process group, SIGKILL after 10 s."""
        with contextlib.suppress(subprocess.TimeoutExpired, OSError):
            subprocess.run(
                [str(CTL), "-n", self.node, "stop"],
                env=self.env,
                capture_output=True,
                timeout=30,
            )
        terminate(proc, 10)

    def stop(self) -> None:
        super().stop()
        self._stop_epmd()

    def _stop_epmd(self) -> None:
        """epmd daemonizes out of our process group: find ours by its port and end it."""
        for proc in psutil.process_iter(["name", "pid"]):
            if proc.info["name"] != "epmd":
                continue
            with contextlib.suppress(psutil.Error):
                if proc.environ().get("ERL_EPMD_PORT") == str(self.epmd_port):
                    proc.kill()


async def wait_amqp(url: str, within_s: float) -> None:
    """The AMQP port accepts before the broker answers: wait for a real handshake."""
    import aio_pika

    async def attempt() -> None:
        connection = await aio_pika.connect(url, timeout=5)
        await connection.close()

    await until_answers(attempt, within_s)
