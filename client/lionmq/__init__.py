"""LionMQ client: `Client` for threaded code, `AsyncClient` for asyncio.

Also the cluster's shared pure parts: channel placement.
"""

from lionmq._async import AsyncClient
from lionmq._sync import Client
from lionmq.errors import (
    BadRequest,
    ChannelFull,
    ChannelNotFound,
    ConnectionFailed,
    InvalidRequest,
    LionMQError,
    PayloadTooLarge,
    ServerError,
    ServiceUnavailable,
    Unauthorized,
    UnexpectedResponse,
)
from lionmq.message import AsyncMessage, Message
from lionmq.models import (
    AckResult,
    ChannelCounts,
    ChannelInfo,
    ChannelSettings,
    ChannelTotals,
    ExtendResult,
    NackResult,
    NewMessage,
)
from lionmq.options import (
    ChannelOptions,
    ClientOptions,
    ConsumeOptions,
    MessageOptions,
    OneMessageOptions,
)
from lionmq.placement import Ring, shard_for
from lionmq.retry import RetryPolicy

__all__ = [
    "AckResult",
    "AsyncClient",
    "AsyncMessage",
    "BadRequest",
    "ChannelCounts",
    "ChannelFull",
    "ChannelInfo",
    "ChannelNotFound",
    "ChannelOptions",
    "ChannelSettings",
    "ChannelTotals",
    "Client",
    "ClientOptions",
    "ConnectionFailed",
    "ConsumeOptions",
    "ExtendResult",
    "InvalidRequest",
    "LionMQError",
    "Message",
    "MessageOptions",
    "NackResult",
    "NewMessage",
    "OneMessageOptions",
    "PayloadTooLarge",
    "RetryPolicy",
    "Ring",
    "ServerError",
    "ServiceUnavailable",
    "Unauthorized",
    "UnexpectedResponse",
    "shard_for",
]
