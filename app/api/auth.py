"""Bearer-token check for every endpoint but the probes (and the API docs), in constant time."""

from __future__ import annotations

import hmac

from starlette.types import ASGIApp, Receive, Scope, Send

from app.api.docs import ASSETS_URL, DOCS_URL
from app.api.problems import problem
from app.errors import Unauthorized
from app.settings import CLUSTER_SECRET_HEADER

# Probes must answer without a token; the docs carry no data and let a person find the API.
OPEN_PATHS = frozenset({"/health", "/ready", DOCS_URL, "/openapi.json"})
OPEN_PREFIX = ASSETS_URL + "/"
# Cluster routes with credentials of their own (app.api.cluster): ADMIN_TOKEN for set-nodes and
# shard hand-offs (/cluster/shards/{id}/handoff), CLUSTER_SECRET node to node. The API token
# cannot share their Authorization header.
OWN_AUTH_PATHS = frozenset({"/cluster/nodes"})
OWN_AUTH_PREFIXES = ("/cluster/internal/", "/cluster/shards/")


class BearerAuth:
    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app = app
        self.expected = token.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope.get("path", "")
        open_path = (
            path in OPEN_PATHS
            or path in OWN_AUTH_PATHS
            or path.startswith((OPEN_PREFIX, *OWN_AUTH_PREFIXES))
        )
        if scope["type"] in ("http", "websocket") and not open_path:
            given = b""
            for name, value in scope["headers"]:
                if name == b"authorization":
                    given = value
                    break
            # The scheme is case-insensitive (RFC 7235: "bearer" is "Bearer"); the token is not.
            scheme, _, credentials = given.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(
                credentials.lstrip(b" "), self.expected
            ):
                detail = (
                    "this node needs 'Authorization: Bearer <API_TOKEN>'"
                    if not given
                    else "the bearer token is wrong"
                )
                response = problem(401, detail, "Unauthorized", **{"WWW-Authenticate": "Bearer"})
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def check_cluster_secret(expected: str, given: str | None) -> None:
    """The one check of a node-to-node call (every /cluster/internal/ route, a peer's part of
    GET /channels): `given` (the CLUSTER_SECRET_HEADER) equals the CLUSTER_SECRET `expected`,
    compared in constant time; else Unauthorized. A node without a secret takes no such call."""
    if expected and given is not None and hmac.compare_digest(given.encode(), expected.encode()):
        return
    wrong = "" if given is None else "; the one given is wrong"
    raise Unauthorized(
        f"node-to-node calls need the header {CLUSTER_SECRET_HEADER} with the cluster's"
        f" CLUSTER_SECRET{wrong}"
    )
