"""The one domain exception tree. `app.api.problems` maps it to HTTP problem details."""

from __future__ import annotations


class LionMQError(Exception):
    """Base of every error the node raises on purpose."""

    status = 500
    title = "Internal error"
    # Seconds a client should wait before trying again (sent as Retry-After); None: retrying
    # the same request will not help.
    retry_after: int | None = None

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


class MessageNotFound(LionMQError):
    status = 404
    title = "Message not found"


class ChannelFull(LionMQError):
    status = 429
    title = "Channel full"
    retry_after = 1  # consumers drain channels continuously; a second is a fair first wait


class Unauthorized(LionMQError):
    status = 401
    title = "Unauthorized"


class Forbidden(LionMQError):
    status = 403
    title = "Forbidden"


class StoreError(LionMQError):
    """The store failed for good: retrying the same request will not help (a constraint, a
    misuse, corrupt data, a rejected configuration). Nothing was half-written."""

    status = 500
    title = "Store error"


class StoreTooLarge(StoreError):
    """The store cannot hold a message this large (past its `max_message_bytes`)."""

    status = 413
    title = "Payload too large"


class StoreUnavailable(StoreError):
    """A failure a retry can fix: the store is unreachable, timed out, full, read-only or busy,
    or lost its file. Nothing was half-written."""

    status = 503
    title = "Store unavailable"
    retry_after = 1


class NotReady(StoreUnavailable):
    title = "Not ready"


class Fenced(StoreUnavailable):
    """A write by a node that no longer owns the shard: its lease's epoch moved on (another node
    took the shard over). Nothing of the write was applied; the client refreshes its routing and
    retries at the owner."""

    title = "Not the owner"


class ShardUnavailable(LionMQError):
    """No node serves the channel's shard right now (a failover or a hand-off is under way), or
    this node cannot reach the one that does. Nothing was done; retry after `retry_after`."""

    status = 503
    title = "Shard unavailable"

    def __init__(self, detail: str, retry_after: int = 1) -> None:
        super().__init__(detail)
        self.retry_after = retry_after


class OwnerUnreachable(ShardUnavailable):
    """The owner of the channel's shard did not answer a forwarded request (refused, timed
    out, reset). Whether a forwarded write was applied is unknown, as with any lost answer:
    an enqueue retried with its dedup id is safe."""

    title = "Owner unreachable"


class ShardNotFound(LionMQError):
    status = 404
    title = "Shard not found"


class HandoffRefused(LionMQError):
    """No hand-off of the shard was made (no up-to-date backup, or this node does not own
    it): the shard stays where it was."""

    status = 409
    title = "Hand-off refused"


class ConfigError(LionMQError):
    """A setting is wrong; the node refuses to start."""
