"""Refuse what a web page, rather than a client, would make a browser send to the node.

A node often runs without API_TOKEN on a developer's machine, where any page the developer visits
can make the browser send it requests: a form or `fetch` in "no-cors" mode can POST `text/plain`
without asking first (cross-site request forgery), and a page on a domain that re-resolves to
127.0.0.1 can even read the answers (DNS rebinding). One ASGI layer in front of everything, the
hot path included, refuses in one pass over the headers:

- a `Host` that is not one of the node's names (403): rebinding keeps the attacker's name there;
  more than one `Host` (400, as RFC 9112 requires): layers that read the first and layers that
  read the last would disagree about which host was asked;
- a request a browser marks as coming from another site (`Sec-Fetch-Site: cross-site` or
  `same-site`) or with an `Origin` whose host is not one of the node's names (403), but for a
  person following a link (a GET or HEAD navigation);
- a body that is not declared JSON (415): `application/json` (or `+json`) is not a CORS-safelisted
  type, so a page must ask first (a preflight), which the node never grants.

Clients other than browsers send no `Origin` or `Sec-Fetch-*`, and the bundled client sends JSON.
"""

from __future__ import annotations

from collections.abc import Iterable

from starlette.types import ASGIApp, Receive, Scope, Send

from app.api.problems import problem
from app.settings import host_name

# Orchestrators probe with the Host they dialled (a pod's IP); the probes tell nothing worth a
# rebinding attack and must answer anyway.
PROBES = frozenset({"/health", "/ready"})
_FOREIGN_SITES = frozenset({b"cross-site", b"same-site"})
_SAFE = frozenset({"GET", "HEAD"})


class Guard:
    def __init__(self, app: ASGIApp, names: Iterable[str], *, any_host: bool = False) -> None:
        """`names`: the hosts the node answers to (see Settings.allowed_host_names); `any_host`
        lets any Host through (ALLOWED_HOSTS=*), while pages must still come from `names`."""
        self.app = app
        self.names = frozenset(names)
        self.any_host = any_host

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        host = origin = site = mode = content_type = None
        has_body = False
        hosts = types = 0
        for name, value in scope["headers"]:
            if name == b"host":
                host = value
                hosts += 1
            elif name == b"content-type":
                content_type = value
                types += 1
            elif name == b"content-length":
                has_body = value.strip() != b"0"
            elif name == b"transfer-encoding":
                has_body = True
            elif name == b"origin":
                origin = value
            elif name == b"sec-fetch-site":
                site = value.lower()
            elif name == b"sec-fetch-mode":
                mode = value
        if hosts > 1 or types > 1:
            which = "Host" if hosts > 1 else "Content-Type"
            status, detail = 400, f"the request has more than one {which} header"
        else:
            status, detail = self._refusal(scope, host, origin, site, mode, content_type, has_body)
        if not status:
            await self.app(scope, receive, send)
        else:  # a WebSocket handshake is refused with the same HTTP answer
            await problem(status, detail)(scope, receive, send)

    def _refusal(
        self,
        scope: Scope,
        host: bytes | None,
        origin: bytes | None,
        site: bytes | None,
        mode: bytes | None,
        content_type: bytes | None,
        has_body: bool,
    ) -> tuple[int, str]:
        """(status, detail) of the refusal, or (0, "") to let the request through."""
        if (
            host is not None
            and not self.any_host
            and host_name(host.decode("latin-1")) not in self.names
            and scope["path"] not in PROBES
        ):
            return 403, (
                f"this node does not answer to the host {_text(host)!r}; add that name to"
                " ALLOWED_HOSTS if clients reach the node by it"
            )
        if origin is not None:
            if not self._same_origin(origin, host):
                return 403, (
                    f"requests from pages of {_text(origin)!r} are refused: the node serves"
                    " clients, not other sites' pages"
                )
        elif site in _FOREIGN_SITES and not (mode == b"navigate" and scope.get("method") in _SAFE):
            return 403, "requests from other sites' pages (Sec-Fetch-Site) are refused"
        if has_body and scope["type"] == "http" and not _is_json(content_type):
            given = _text(content_type) if content_type is not None else "none"
            return (
                415,
                f"send the body as JSON, with 'Content-Type: application/json' (not {given!r})",
            )
        return 0, ""

    def _same_origin(self, origin: bytes, host: bytes | None) -> bool:
        """A page's requests count only from the node's own origin: one of its names, and the
        very host and port the request is sent to (a page on another local port, say a dev
        server, is another site)."""
        authority = origin.decode("latin-1").partition("://")[2]
        if host_name(authority) not in self.names:
            return False
        return host is None or _authority(authority) == _authority(host.decode("latin-1"))


def _authority(value: str) -> str:
    """`host[:port]` compared as browsers do: lower case, the scheme's default port left out."""
    value = value.strip().lower()
    for default in (":80", ":443"):
        value = value.removesuffix(default)
    return value


def _is_json(content_type: bytes | None) -> bool:
    media = (content_type or b"").partition(b";")[0].strip().lower()
    return media == b"application/json" or (
        media.startswith(b"application/") and media.endswith(b"+json")
    )


def _text(value: bytes) -> str:
    return value.decode("latin-1")[:100]
