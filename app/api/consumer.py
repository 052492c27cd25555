"""Who dequeued: the consumer address a traced channel records with each delivery.

The owner sees the ASGI scope's client: the TCP peer (the node runs uvicorn without proxy
headers, so X-Forwarded-For is never believed; a reverse proxy in front shows as itself). A
request forwarded by another node of the cluster comes from that node, so the forwarder passes
the client's address on in `X-LionMQ-Client: <address> <tag>`, the tag an HMAC of the address
under CLUSTER_SECRET: the owner believes the address only with a valid tag, so a client cannot
make the history name someone else, and a node without a secret (nothing tells a peer from a
client) never believes it. The forwarder drops any such header a client sent.

Read only by a dequeue of a traced channel: an untraced one never looks at the headers.
"""

from __future__ import annotations

import hashlib
import hmac

from starlette.types import Scope

CLIENT_HEADER = "x-lionmq-client"
_CLIENT = CLIENT_HEADER.encode()
_TAG_CHARS = 32  # 128 bits of HMAC-SHA256, in hex


def client_address(scope: Scope) -> str:
    """The peer of the connection as "ip:port" ("[ip]:port" for IPv6), or "unknown"."""
    client = scope.get("client")
    if not client:
        return "unknown"
    host, port = client[0], client[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def tag(secret: str, address: str) -> str:
    return hmac.new(secret.encode(), address.encode(), hashlib.sha256).hexdigest()[:_TAG_CHARS]


def forwarded_client(scope: Scope, secret: str) -> bytes:
    """The X-LionMQ-Client value a forwarding node sends for this request's client."""
    address = client_address(scope)
    return f"{address} {tag(secret, address)}".encode("latin-1")


def consumer_of(scope: Scope, secret: str) -> str:
    """The consumer's address: the one a cluster member forwarded with a valid tag, else the
    connection's peer."""
    if secret:
        for name, value in scope["headers"]:
            if name == _CLIENT:
                given_value: bytes = value
                address, _, given = given_value.decode("latin-1").rpartition(" ")
                if address and hmac.compare_digest(given, tag(secret, address)):
                    return address
                break
    return client_address(scope)
