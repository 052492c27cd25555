"""The `lionmq` command: publish, consume, browse and operate a LionMQ node or cluster.

Installed with the client package (`pip install ./client`); `lionmq --help` lists the
commands. Built on the client's public API only.
"""

from lionmq.cli.main import main

__all__ = ["main"]
