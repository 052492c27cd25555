"""Durability: `kill -9` the node and restart it on the same store, then check message by message.

The promises: a 201 on enqueue means the message survives; a 200 on ack means it is never
delivered again; every other message is delivered again (at once, or when its lease ends).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

from lionmq import Client, ConnectionFailed, LionMQError, Message, RetryPolicy

from tests.conftest import NodeProcess

NO_RETRY = RetryPolicy(attempts=1)
DELAY_MS = 8_000
LEASE_MS = 30_000


def drain(client: Client, channel: str, deadline_s: float) -> list[Message]:
    """Dequeue and ack until nothing is ready, delayed or in flight, or time runs out."""
    got: list[Message] = []
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        batch = client.dequeue(channel, 200, wait_ms=500)
        if batch:
            got += batch
            client.ack(channel, [m.receipt for m in batch])
            continue
        counts = client.get_channel(channel).counts
        if counts.ready + counts.delayed + counts.in_flight == 0:
            return got
    raise AssertionError(f"{channel} did not drain within {deadline_s}s")


def test_kill_9_keeps_every_promise(node_factory: type[NodeProcess], tmp_path: Path) -> None:
    data = tmp_path / "store"
    node = node_factory(data).start()
    with Client(node.url) as client:
        ids = client.enqueue_many("orders", [{"n": i} for i in range(600)])
        # Delay and lease outlast any restart, even on a loaded machine: the counts below are
        # then exact. After the restart the leases are shortened with extend (their receipts
        # must still hold) so the test need not wait for them.
        client.enqueue("orders", "later", delay_ms=DELAY_MS)
        leased = client.dequeue("orders", 200, visibility_ms=LEASE_MS)
        acked = leased[:100]
        client.ack("orders", [m.receipt for m in acked])
        still_leased = leased[100:]
    node.kill9()

    restarted = node_factory(data, port=node.port).start()
    with Client(restarted.url) as client:
        info = client.get_channel("orders")
        assert info.counts.ready == 400
        assert info.counts.in_flight == 100
        assert info.counts.delayed == 1
        # A lease taken before the crash still holds its receipt.
        assert client.ack("orders", [still_leased[0].receipt]).acked == 1
        acked_ids = {m.id for m in acked} | {still_leased[0].id}
        shortened = client.extend("orders", [m.receipt for m in still_leased[1:]], 1000)
        assert shortened.extended == 99

        first = client.dequeue("orders", 1000)
        assert {m.id for m in first} == set(ids[200:])  # never leased: delivered at once
        client.ack("orders", [m.receipt for m in first])
        rest = drain(client, "orders", 20)

    delivered = [m.id for m in first + rest]
    assert not acked_ids & set(delivered), "an acked message was delivered again"
    assert len(delivered) == len(set(delivered))
    later = [m for m in rest if m.body == "later"]
    assert len(later) == 1
    assert set(delivered) - {later[0].id} == set(ids) - acked_ids
    comeback = [m for m in rest if m.id in {s.id for s in still_leased}]
    assert len(comeback) == 99 and all(m.attempt == 2 for m in comeback)


def test_kill_9_during_enqueues_loses_no_201(
    node_factory: type[NodeProcess], tmp_path: Path
) -> None:
    data = tmp_path / "store"
    node = node_factory(data).start()
    confirmed: list[str] = []
    stop = threading.Event()

    def produce() -> None:
        with Client(node.url, retry=NO_RETRY, timeout=5) as c:
            for i in range(2000):  # bounded: the kill comes long before the end
                if stop.is_set():
                    return
                try:
                    confirmed.extend(
                        c.enqueue_many("stream", [{"batch": i, "k": k} for k in range(50)])
                    )
                except (ConnectionFailed, LionMQError):
                    return

    producers = [threading.Thread(target=produce) for _ in range(4)]
    for p in producers:
        p.start()
    deadline = time.monotonic() + 10
    while len(confirmed) < 2000 and time.monotonic() < deadline:
        time.sleep(0.01)
    node.kill9()
    stop.set()
    for p in producers:
        p.join(timeout=10)
    assert len(confirmed) >= 2000

    restarted = node_factory(data, port=node.port).start()
    with Client(restarted.url) as client:
        delivered = {m.id for m in drain(client, "stream", 30)}
    missing = set(confirmed) - delivered
    assert not missing, f"{len(missing)} messages acknowledged with 201 were lost"
