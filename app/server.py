"""Serving over HTTP: uvicorn with a connection cap and header/body deadlines, one log format.

uvicorn times out idle keep-alive connections but not a request whose headers or body never
arrive, and its `limit_concurrency` is checked only once a request's headers are complete: a
client that connects and sends nothing holds a file descriptor forever, and enough of them leave
the node unable to accept anyone (or to open a file). `GuardedHttpProtocol` closes such
connections at a deadline and refuses connections beyond `max_connections`, which stays below
the open-file limit so the store and the node's own sockets always have descriptors left.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import resource
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any, ClassVar, NoReturn

import uvicorn
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from app.errors import ConfigError

log = logging.getLogger("lionmq.server")

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# Descriptors kept out of the connection cap: the store's files (SQLite's database, WAL and
# shared memory; MongoDB's connection pool), the watcher's socket, the listening socket, logs.
FD_RESERVE_MIN = 64
FD_RESERVE_SHARE = 8  # or 1/8 of the limit, when that is more
REFUSAL_LOG_EVERY_S = 10.0
# Largest request line plus headers. httptools sets no bound: a client could send headers at
# line rate until the header deadline and the node would keep every byte (1 GB in a few seconds).
MAX_HEADER_BYTES = 64 * 1024


def log_config(level: str, loggers: tuple[str, ...]) -> dict[str, Any]:
    """A `logging.config.dictConfig` for the process and uvicorn alike: one format, on stderr.

    `loggers` (ours and uvicorn's) log at `level`; other libraries stay at info or above, so
    `debug` does not print every MongoDB command. httpx logs every request it makes at info:
    the node's own calls (heartbeats to backups twice a second) would fill the log, so it
    speaks only of warnings; the node logs the failures of its calls itself.
    """
    level = level.upper()
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"plain": {"format": LOG_FORMAT}},
        "handlers": {
            "stderr": {
                "class": "logging.StreamHandler",
                "formatter": "plain",
                "stream": "ext://sys.stderr",
            }
        },
        "root": {"handlers": ["stderr"], "level": "INFO" if level == "DEBUG" else level},
        "loggers": {
            "httpx": {"level": "WARNING", "handlers": [], "propagate": True},
            **{name: {"level": level, "handlers": [], "propagate": True} for name in loggers},
        },
    }


class AccessLog:
    """One debug line per request: method, path, status, milliseconds.

    Wrapped around the app only when the level is debug, so at info a request pays nothing.
    """

    def __init__(self, app: ASGIApp, logger: logging.Logger) -> None:
        self.app = app
        self.log = logger

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 0

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            ms = (time.perf_counter() - started) * 1000
            self.log.debug("%s %s %d %.1f ms", scope["method"], scope["path"], status, ms)


def connection_cap(configured: int | None) -> int:
    """How many connections may be open: MAX_CONNECTIONS, or what the open-file limit allows
    once the reserve is kept. A MAX_CONNECTIONS above that is refused at start."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        soft = 1 << 20
    reserve = max(FD_RESERVE_MIN, soft // FD_RESERVE_SHARE)
    allowed = soft - reserve
    if allowed < 16:
        raise ConfigError(
            f"the open-file limit ({soft}) leaves no room for connections once {reserve} are "
            "kept for the store and the node; raise it (ulimit -n)"
        )
    if configured is None:
        return allowed
    if configured > allowed:
        raise ConfigError(
            f"invalid setting MAX_CONNECTIONS: {configured} is more than the open-file limit "
            f"({soft}) allows once {reserve} are kept for the store and the node ({allowed}); "
            "raise ulimit -n or lower MAX_CONNECTIONS"
        )
    return configured


class ConnectionGuard:
    """The limits one server's connections share, and the count of connections it refused."""

    def __init__(
        self,
        max_connections: int,
        header_timeout_s: float,
        body_timeout_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_connections = max_connections
        self.header_timeout_s = header_timeout_s
        self.body_timeout_s = body_timeout_s
        self.clock = clock
        self.refused = 0
        self._unlogged = 0
        self._logged_at: float | None = None

    def refuse(self) -> None:
        """Count a refused connection; say so at most once every REFUSAL_LOG_EVERY_S."""
        self.refused += 1
        self._unlogged += 1
        now = self.clock()
        if self._logged_at is None or now - self._logged_at >= REFUSAL_LOG_EVERY_S:
            log.warning(
                "connection limit reached (MAX_CONNECTIONS=%d): refused %d connection(s) since "
                "the last such line; raise ulimit -n and MAX_CONNECTIONS, or find the idle clients",
                self.max_connections,
                self._unlogged,
            )
            self._logged_at = now
            self._unlogged = 0


def _plain_response(status: bytes, detail: str, *extra: bytes) -> bytes:
    code, _, title = status.partition(b" ")
    body = (
        (b'{"type":"about:blank","title":"' + title + b'","status":' + code + b',"detail":"')
        + detail.encode()
        + b'"}'
    )
    head = [
        b"HTTP/1.1 " + status,
        b"content-type: application/problem+json",
        b"connection: close",
        *extra,
        b"content-length: " + str(len(body)).encode(),
    ]
    return b"\r\n".join(head) + b"\r\n\r\n" + body


_REFUSED = _plain_response(
    b"503 Service Unavailable",
    "the server has as many connections open as it allows; retry shortly",
    b"retry-after: 1",
)
_HEADERS_LATE = _plain_response(
    b"408 Request Timeout", "the request's headers did not arrive within HEADER_TIMEOUT_MS"
)
_BODY_LATE = _plain_response(
    b"408 Request Timeout", "the request's body did not arrive within BODY_TIMEOUT_MS"
)
_MALFORMED = _plain_response(
    b"400 Bad Request",
    "the request is not valid HTTP/1.1 (request line, a header, Content-Length or chunking)",
)
_HEADERS_TOO_LARGE = _plain_response(
    b"431 Request Header Fields Too Large",
    f"the request line and headers pass {MAX_HEADER_BYTES} bytes",
)


class GuardedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a connection cap and two deadlines.

    The header deadline starts when the connection opens, or when a later request's first
    bytes arrive (between requests uvicorn's keep-alive timeout applies); the body deadline
    when the headers are complete. Neither is moved by further bytes, so a client trickling
    one byte at a time gains nothing. A request that arrives in one read arms no timer at all.
    Headers that keep coming past MAX_HEADER_BYTES are refused with 431.
    """

    guard: ClassVar[ConnectionGuard]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._deadline: asyncio.TimerHandle | None = None
        self._waiting = ""  # what the armed deadline waits for: "headers", "body" or nothing
        self._headers_due = False  # a request has begun and its headers are not complete
        self._body_due = False  # a request's headers are complete and its body is not
        self._header_bytes = 0  # read so far of headers not yet complete
        self._begun_in_read = False  # a request began in the read being parsed

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        if len(self.connections) >= self.guard.max_connections:
            # Accepted only to be refused at once: a clean, fast answer instead of a hang.
            self.transport = transport
            transport.write(_REFUSED)
            transport.close()
            self.guard.refuse()
            return
        super().connection_made(transport)
        self._arm("headers")

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self._begun_in_read = False
        super().data_received(data)
        if self._begun_in_read:
            # The read that starts a request may end a previous one (pipelining: its body, up
            # to a whole read); which of its bytes are the new headers the parser does not
            # say, so the count starts with the next read (the bound is one read higher).
            self._header_bytes = 0
        elif self._headers_due:
            self._header_bytes += len(data)
            if self._header_bytes > MAX_HEADER_BYTES and not self.transport.is_closing():
                self.transport.write(_HEADERS_TOO_LARGE)
                self.transport.close()
                return
        want = "headers" if self._headers_due else "body" if self._body_due else ""
        if want != self._waiting and not self.transport.is_closing():
            self._disarm()
            if want:
                self._arm(want)

    def send_400_response(self, msg: str) -> None:
        # uvicorn's own answer to a request its parser refuses is text/plain; every error of
        # the node is problem details (its warning line is still logged).
        self.transport.write(_MALFORMED)
        self.transport.close()

    def on_message_begin(self) -> None:
        self._headers_due = True
        self._begun_in_read = True
        super().on_message_begin()

    def on_headers_complete(self) -> None:
        self._headers_due = False
        self._header_bytes = 0
        self._body_due = True
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._body_due = False
        super().on_message_complete()

    def handle_websocket_upgrade(self) -> None:
        # The WebSocket protocol takes the connection over; its own pings watch it from here.
        self._headers_due = self._body_due = False
        self._disarm()
        super().handle_websocket_upgrade()

    def _arm(self, what: str) -> None:
        timeout = self.guard.header_timeout_s if what == "headers" else self.guard.body_timeout_s
        self._waiting = what
        self._deadline = self.loop.call_later(timeout, self._expired)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        self._waiting = ""

    def _expired(self) -> None:
        what, self._deadline, self._waiting = self._waiting, None, ""
        if self.transport.is_closing():
            return
        if what == "headers" and self._headers_due:
            log.debug("closing a connection: its request's headers were late (%s)", self.client)
            self.transport.write(_HEADERS_LATE)
        elif what == "body" and self.cycle is not None and not self.cycle.response_started:
            log.debug("closing a connection: its request's body was late (%s)", self.client)
            # The app reading the body sees the client leave; whatever it answers is dropped.
            self.cycle.disconnected = True
            self.cycle.message_event.set()
            self.transport.write(_BODY_LATE)
        self.transport.close()


def guarded_protocol(guard: ConnectionGuard) -> type[GuardedHttpProtocol]:
    """The protocol class for one server (uvicorn builds a protocol per connection)."""
    return type("GuardedHttpProtocol", (GuardedHttpProtocol,), {"guard": guard})


# The hot path makes a few objects a message (its lease, a heap entry, a delivery) that live until
# it is acked. With the collector's defaults (a young collection every 700 allocations, older ones
# more and more often as they survive), collections took about a tenth of a drain's event loop, in
# pauses that stall every request. Collections come 70 times less often; what the process holds
# once started (modules, the app) is left out of them. Reference counting frees everything
# acyclic at once, as before; only cycles wait longer.
GC_THRESHOLDS = (50_000, 20, 10)


def tune_gc() -> None:
    """Called by `python -m app` once the app is built, before serving."""
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


class NodeServer(uvicorn.Server):
    """uvicorn's server with one step before it stops: on SIGTERM (or SIGINT), `before_stop`
    runs while the server still accepts and serves, so a cluster node hands its shards to
    backups and forwards their requests to the new owners meanwhile. uvicorn's own shutdown
    follows: it stops accepting, lets the requests under way finish, then the lifespan exits
    (by then the node owns nothing, and the clients went to the new owners)."""

    def __init__(self, config: uvicorn.Config, before_stop: Callable[[], Awaitable[None]]) -> None:
        super().__init__(config)
        self.before_stop = before_stop

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        if not self.force_exit:  # a second Ctrl-C: out at once
            try:
                await self.before_stop()
            except Exception:  # the lifespan's exit still releases what is held
                log.exception("the hand-off before stopping failed; stopping anyway")
        await super().shutdown(sockets)


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one line on stderr and exit status 2, like a bad setting."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see --help)\n")


def flag_overrides(args: argparse.Namespace) -> dict[str, object]:
    """The settings given as flags (those left out fall back to the environment and .env)."""
    return {name: value for name, value in vars(args).items() if value is not None}
