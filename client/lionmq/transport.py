"""An httpx transport over an aiohttp session: the AsyncClient's default.

httpx's own async connection pool loses most of its throughput under concurrent requests
(encode/httpx#3215); aiohttp's does not. This keeps httpx's request/response API, so injected
transports (ASGITransport, MockTransport) work unchanged, and only swaps the wire underneath.
Run `client/scripts/transport_bench.py` to see the difference.
"""

from __future__ import annotations

import aiohttp
import httpx


class AiohttpTransport(httpx.AsyncBaseTransport):
    """Sends httpx requests through one lazily opened `aiohttp.ClientSession`.

    The session is opened on the first request, inside the running event loop, and belongs to
    that loop; `aclose()` (called by `AsyncClient.aclose`) closes it.
    """

    def __init__(self, *, max_connections: int = 100, keepalive_s: float = 15.0) -> None:
        self._max_connections = max_connections
        self._keepalive_s = keepalive_s
        self._session: aiohttp.ClientSession | None = None

    def _open(self) -> aiohttp.ClientSession:
        connector = aiohttp.TCPConnector(
            limit=self._max_connections, keepalive_timeout=self._keepalive_s
        )
        # httpx already decodes content and owns the headers; a cookie jar is pure overhead.
        return aiohttp.ClientSession(
            connector=connector, cookie_jar=aiohttp.DummyCookieJar(), auto_decompress=False
        )

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self._session is None:
            # No await between the test and the assignment, so concurrent first requests
            # cannot open two sessions.
            self._session = self._open()
        timeout = request.extensions.get("timeout", {})
        body = await request.aread()
        try:
            async with self._session.request(
                request.method,
                str(request.url),
                headers=request.headers.multi_items(),
                data=body or None,
                allow_redirects=False,
                timeout=aiohttp.ClientTimeout(
                    total=None,
                    connect=timeout.get("pool"),
                    sock_connect=timeout.get("connect"),
                    sock_read=timeout.get("read"),
                ),
            ) as response:
                # The node's responses are small JSON documents: read them whole, here, so the
                # connection goes back to the pool before httpx sees the response.
                content = await response.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise _httpx_error(exc, request) from exc
        return httpx.Response(
            response.status,
            headers=response.raw_headers,
            content=content,
            request=request,
            extensions={
                "http_version": b"HTTP/1.1",
                "reason_phrase": (response.reason or "").encode(),
            },
        )

    async def aclose(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()


def _httpx_error(exc: Exception, request: httpx.Request) -> httpx.TransportError:
    """Maps an aiohttp failure to the httpx exception a native transport would raise."""
    message = str(exc) or type(exc).__name__
    kind: type[httpx.TransportError]
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        kind = httpx.ConnectTimeout
    elif isinstance(exc, TimeoutError):
        kind = httpx.ReadTimeout
    elif isinstance(exc, aiohttp.ClientConnectorError):
        kind = httpx.ConnectError
    elif isinstance(exc, aiohttp.ServerDisconnectedError):
        kind = httpx.RemoteProtocolError
    else:
        kind = httpx.ReadError
    return kind(message, request=request)
