"""A TCP proxy on a loopback port that a test can cut and restore.

Placed in front of a node (the node's SERVER_HOST is the proxy's URL), every peer that reaches
the node by its topology URL goes through it: a primary's heartbeats to its backup, forwards,
snapshots. `cut()` closes every open connection and then refuses new ones (`"refuse"`) or
accepts them and lets them hang, swallowing what they send (`"blackhole"`, what a dead link
looks like to a sender). The node itself still reaches the store directly.

It runs its own asyncio loop in a daemon thread; connections are capped, and `close()` stops
everything within a bounded time.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Coroutine
from typing import Any, Literal

from tests.conftest import free_port

CutMode = Literal["refuse", "blackhole"]
MAX_CONNECTIONS = 256
CHUNK = 65536


class TcpProxy:
    def __init__(self, target_port: int, port: int | None = None) -> None:
        self.target_port = target_port
        self.port = port or free_port()
        self.bytes_up = 0  # client -> target
        self.bytes_down = 0
        self.connections = 0  # accepted and relayed, since start
        self._cut: CutMode | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.Server | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def is_cut(self) -> bool:
        return self._cut is not None

    def start(self) -> TcpProxy:
        self._thread.start()
        self._call(self._listen())
        return self

    def cut(self, mode: CutMode = "refuse") -> None:
        self._call(self._set_cut(mode))

    def restore(self) -> None:
        self._call(self._set_cut(None))

    def close(self) -> None:
        if not self._thread.is_alive():
            return
        self._call(self._shutdown())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        self._loop.close()

    def __enter__(self) -> TcpProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, coro: Coroutine[Any, Any, None]) -> None:
        asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=5)

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)

    async def _set_cut(self, mode: CutMode | None) -> None:
        self._cut = mode
        if mode is not None:
            for writer in list(self._writers):
                writer.transport.abort()  # a reset, as a link that died would give

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._cut == "refuse" or len(self._writers) >= MAX_CONNECTIONS:
            writer.transport.abort()
            return
        self._writers.add(writer)
        try:
            if self._cut == "blackhole":
                while await reader.read(CHUNK):
                    pass
                return
            try:
                up_r, up_w = await asyncio.open_connection("127.0.0.1", self.target_port)
            except OSError:
                return
            self._writers.add(up_w)
            self.connections += 1
            try:
                await asyncio.gather(
                    self._pump(reader, up_w, True), self._pump(up_r, writer, False)
                )
            finally:
                self._writers.discard(up_w)
                up_w.transport.abort()
        finally:
            self._writers.discard(writer)
            writer.transport.abort()

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, up: bool
    ) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while data := await reader.read(CHUNK):
                if self._cut is not None:
                    break
                if up:
                    self.bytes_up += len(data)
                else:
                    self.bytes_down += len(data)
                writer.write(data)
                await writer.drain()
            if writer.can_write_eof():
                writer.write_eof()
