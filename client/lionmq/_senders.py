"""How requests travel: a sender sends one `Call` and hands back the whole `Reply`.

`AsyncClient` talks straight to one `aiohttp.ClientSession` (`AiohttpSender`): httpx's async
pool loses most of its throughput under concurrent requests (encode/httpx#3215), and stacking
httpx's request model on aiohttp cost more client CPU per request than the node spent serving
it. An injected httpx transport (`ASGITransport`, `MockTransport` in tests) goes through
`HttpxSender`; `Client` (threads) sends through `SyncHttpxSender`.

A sender sends a call to the node whose base URL it is given (`lionmq.protocol.Router` picks
it) and raises `ConnectionFailed` (chained to the underlying error) when no response came;
everything else about a call (statuses, parsing, retries) is the caller's.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

import aiohttp
import httpx
from yarl import URL

from lionmq.errors import ConnectionFailed
from lionmq.protocol import Call, Reply

KEEPALIVE_S = 15.0
"""How long an idle pooled connection is kept."""


class AsyncSender(Protocol):
    async def send(self, url: str, call: Call[Any]) -> Reply:
        """Sends `call` to the node whose base URL is `url`."""

    async def aclose(self) -> None: ...


class AiohttpSender:
    """Sends calls through one `aiohttp.ClientSession`, opened on the first request (inside
    the running event loop, to which it then belongs) and closed by `aclose()`.

    Everything that does not change between requests is prepared once: the default headers
    live in the session, URLs are parsed once per path, timeouts built once, and the session
    keeps no cookies."""

    _MAX_URLS = 1024
    """URLs kept parsed; past that the cache starts over (many channels)."""

    def __init__(
        self,
        headers: Mapping[str, str],
        timeout: float,
        max_connections: int,
    ) -> None:
        self._headers = dict(headers)
        self._timeout = timeout
        self._max_connections = max_connections
        self._plain = self._timeouts(0.0)
        self._urls: dict[str, URL] = {}
        self._session: aiohttp.ClientSession | None = None
        self._closed = False

    def _timeouts(self, long_poll_s: float) -> aiohttp.ClientTimeout:
        # `connect` bounds waiting for a pooled connection plus connecting, as httpx's `pool`.
        t = self._timeout
        return aiohttp.ClientTimeout(
            total=None, connect=t, sock_connect=t, sock_read=t + long_poll_s
        )

    def _open(self) -> aiohttp.ClientSession:
        if self._closed:
            raise RuntimeError("Cannot send a request, as the client has been closed.")
        connector = aiohttp.TCPConnector(limit=self._max_connections, keepalive_timeout=KEEPALIVE_S)
        # No await between the caller's test and the assignment: concurrent first requests
        # cannot open two sessions.
        self._session = aiohttp.ClientSession(
            connector=connector,
            headers=self._headers,
            # User-Agent and Content-Type are ours; no compression for small JSON replies.
            skip_auto_headers=("Accept-Encoding",),
            cookie_jar=aiohttp.DummyCookieJar(),
            timeout=self._plain,
        )
        return self._session

    def _url(self, full: str) -> URL:
        url = self._urls.get(full)
        if url is None:
            if len(self._urls) >= self._MAX_URLS:
                self._urls.clear()
            # The protocol layer quotes every path segment it builds.
            url = self._urls[full] = URL(full, encoded=True)
        return url

    async def send(self, url: str, call: Call[Any]) -> Reply:
        session = self._session or self._open()
        timeout = self._timeouts(call.long_poll_s) if call.long_poll_s else self._plain
        try:
            async with session.request(
                call.method,
                self._url(url + call.path),
                data=call.content,
                headers=call.headers,
                timeout=timeout,
                allow_redirects=False,
            ) as response:
                content = await response.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise ConnectionFailed(_kind(exc), f"{url}: {str(exc) or repr(exc)}") from exc
        return Reply(response.status, response.headers, content, response.reason or "")

    async def aclose(self) -> None:
        self._closed = True
        session, self._session = self._session, None
        if session is not None:
            await session.close()


def _kind(exc: Exception) -> str:
    """The name httpx gives the same failure, so `ConnectionFailed.title` reads the same
    whichever way the request went."""
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return "ConnectTimeout"
    if isinstance(exc, TimeoutError):
        return "ReadTimeout"
    if isinstance(exc, aiohttp.ClientConnectorError):
        return "ConnectError"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "RemoteProtocolError"
    return "ReadError"


class HttpxSender:
    """Sends calls through an `httpx.AsyncClient` over the transport the caller injected."""

    def __init__(
        self,
        headers: Mapping[str, str],
        timeout: float,
        transport: httpx.AsyncBaseTransport,
    ) -> None:
        self._timeout = timeout
        self._http = httpx.AsyncClient(headers=headers, timeout=timeout, transport=transport)

    async def send(self, url: str, call: Call[Any]) -> Reply:
        request = _request(self._http, self._timeout, url, call)
        try:
            return _reply(await self._http.send(request))
        except httpx.TransportError as exc:
            raise _failed(url, exc) from exc

    async def aclose(self) -> None:
        await self._http.aclose()


class SyncHttpxSender:
    """The blocking sender of `Client`: an `httpx.Client` that keeps every pooled connection
    alive (consumer threads would otherwise reconnect)."""

    def __init__(
        self,
        headers: Mapping[str, str],
        timeout: float,
        max_connections: int,
        transport: httpx.BaseTransport | None,
    ) -> None:
        self._timeout = timeout
        size = max_connections
        self._http = httpx.Client(
            headers=headers,
            timeout=timeout,
            transport=transport,
            limits=httpx.Limits(max_connections=size, max_keepalive_connections=size),
        )

    def send(self, url: str, call: Call[Any]) -> Reply:
        request = _request(self._http, self._timeout, url, call)
        try:
            return _reply(self._http.send(request))
        except httpx.TransportError as exc:
            raise _failed(url, exc) from exc

    def close(self) -> None:
        self._http.close()


def _request(
    http: httpx.Client | httpx.AsyncClient, timeout: float, url: str, call: Call[Any]
) -> httpx.Request:
    return http.build_request(
        call.method,
        url + call.path,
        content=call.content,
        headers=call.headers,
        # A long poll answers only after its wait: the read timeout must cover it.
        timeout=httpx.Timeout(timeout, read=timeout + call.long_poll_s)
        if call.long_poll_s
        else httpx.USE_CLIENT_DEFAULT,
    )


def _reply(response: httpx.Response) -> Reply:
    return Reply(response.status_code, response.headers, response.content, response.reason_phrase)


def _failed(url: str, exc: httpx.TransportError) -> ConnectionFailed:
    """Named with the node it could not reach: with several seeds, which one matters."""
    return ConnectionFailed(type(exc).__name__, f"{url}: {str(exc) or repr(exc)}")
