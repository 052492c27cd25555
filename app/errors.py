"""The one domain exception tree. `app.api.problems` maps it to HTTP problem details."""

from __future__ import annotations


class LionMQError(Exception):
    """Base of every error the node raises on purpose."""

    status = 500
    title = "Internal error"

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class InvalidInput(LionMQError):
    status = 422
    title = "Invalid request"


class MalformedRequest(LionMQError):
    status = 400
    title = "Malformed request"


class InvalidReceipt(LionMQError):
    status = 400
    title = "Invalid receipt"


class PayloadTooLarge(LionMQError):
    status = 413
    title = "Payload too large"


class ChannelNotFound(LionMQError):
    status = 404
    title = "Channel not found"


class ChannelFull(LionMQError):
    status = 429
    title = "Channel full"


class Unauthorized(LionMQError):
    status = 401
    title = "Unauthorized"


class StoreError(LionMQError):
    """The store failed in a way the caller cannot fix by retrying."""

    status = 500
    title = "Store error"


class StoreUnavailable(StoreError):
    """The store cannot be reached or refused the write; nothing was half-written."""

    status = 503
    title = "Store unavailable"


class NotReady(StoreUnavailable):
    title = "Not ready"


class ConfigError(LionMQError):
    """A setting is wrong; the node refuses to start."""
