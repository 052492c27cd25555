"""A node that stops (SIGTERM) ends its long polls at once, local and forwarded, so the drain of
the requests under way that uvicorn makes before the exit is not held for a poll's wait (it
was: a node exited 19 s after SIGTERM with one consumer polling through it, past Docker's 10 s
stop timeout)."""

from __future__ import annotations

import asyncio
import time

from app.main import before_stop
from tests.forward_support import eventually
from tests.test_forward import Pair, pair  # noqa: F401  (fixture)

WAIT_MS = 20_000


async def test_a_stopping_node_answers_its_long_polls_local_and_forwarded_at_once(
    pair: Pair,  # noqa: F811
) -> None:
    await pair.client.put("/channels/near")
    await pair.client.put("/channels/far")
    near = pair.app_a.state.node.engine.channels["near"]
    far = pair.app_b.state.node.engine.channels["far"]
    polls = [
        asyncio.ensure_future(
            pair.client.post(f"/channels/{name}/dequeue", json={"max": 1, "wait_ms": WAIT_MS})
        )
        for name in ("near", "far")
    ]
    waiting = lambda ch: any(not w.done() for w in ch.waiters)  # noqa: E731
    await eventually(lambda: waiting(near) and waiting(far), 5, "both polls waiting")
    began = time.monotonic()
    await before_stop(pair.app_a)
    answers = await asyncio.wait_for(asyncio.gather(*polls), 5)
    assert time.monotonic() - began < 3
    for r in answers:
        assert (r.status_code, r.json()) == (200, {"messages": []}), r.text
    # The owner's poll was cancelled with the forwarded request: nothing is leased to no one.
    await eventually(lambda: not waiting(far), 3, "the owner's poll to end")
    c = pair.client
    r = await c.post(f"{pair.b.url}/channels/far/enqueue", json={"messages": [{"body": 1}]})
    assert r.status_code == 201
    r = await c.post(f"{pair.b.url}/channels/far/dequeue", json={"max": 1})
    assert [m["attempt"] for m in r.json()["messages"]] == [1]
