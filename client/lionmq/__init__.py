"""LionMQ client: `Client` for threaded code, `AsyncClient` for asyncio."""

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
    "ServerError",
    "ServiceUnavailable",
    "Unauthorized",
    "UnexpectedResponse",
]
