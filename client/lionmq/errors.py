"""The client's one exception tree, built from the node's problem details (RFC 9457)."""

from __future__ import annotations

import msgspec


class LionMQError(Exception):
    """Base of every error the client raises. `status` is None when no response came."""

    status: int | None = None

    def __init__(
        self,
        title: str,
        detail: str = "",
        *,
        status: int | None = None,
        type: str = "about:blank",
    ) -> None:
        super().__init__(f"{title}: {detail}" if detail else title)
        self.title = title
        self.detail = detail
        self.type = type
        if status is not None:
            self.status = status


class ConnectionFailed(LionMQError):
    """The node could not be reached, or the connection broke before a response came."""


class UnexpectedResponse(LionMQError):
    """The node answered with a body this client cannot read (a version mismatch, a proxy)."""


class BadRequest(LionMQError):
    status = 400


class Unauthorized(LionMQError):
    """401: a missing or wrong token; also 403, a token without the right to the route (a
    cluster change needs the admin token, and a node without ADMIN_TOKEN set refuses it)."""

    status = 401


class ChannelNotFound(LionMQError):
    status = 404


class PayloadTooLarge(LionMQError):
    status = 413


class InvalidRequest(LionMQError):
    status = 422


class ChannelFull(LionMQError):
    status = 429


class ServerError(LionMQError):
    """Any 5xx; retried by the client before it is raised."""

    status = 500


class ServiceUnavailable(ServerError):
    status = 503


_BY_STATUS: dict[int, type[LionMQError]] = {
    cls.status: cls
    for cls in (
        BadRequest,
        Unauthorized,
        ChannelNotFound,
        PayloadTooLarge,
        InvalidRequest,
        ChannelFull,
        ServiceUnavailable,
    )
    if cls.status is not None
}
_BY_STATUS[403] = Unauthorized


class _Problem(msgspec.Struct):
    title: str = ""
    detail: str = ""
    type: str = "about:blank"


def error_for(status: int, content: bytes, reason: str = "") -> LionMQError:
    """The typed exception for an error response; tolerates bodies that are not problem JSON."""
    try:
        problem = msgspec.json.decode(content, type=_Problem)
    except msgspec.MsgspecError:
        # A proxy or a crash page: keep a bounded excerpt so the message stays readable.
        problem = _Problem(detail=content[:200].decode("utf-8", "replace"))
    cls = _BY_STATUS.get(status) or (ServerError if status >= 500 else LionMQError)
    title = problem.title or reason or f"HTTP {status}"
    return cls(title, problem.detail, status=status, type=problem.type)
