"""LionMQ client: `Client` for threaded code, `AsyncClient` for asyncio.

Also the cluster's shared pure parts: channel placement and the topology model.
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
    ClusterInfo,
    ClusterNode,
    ClusterSelf,
    ClusterShard,
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
from lionmq.topology import (
    InvalidTopology,
    SetNodes,
    Shard,
    ShardSpec,
    Topology,
    decode_set_nodes,
    decode_topology,
    next_topology,
    set_nodes_request,
    validate_set_nodes,
    validate_topology,
)

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
    "ClusterInfo",
    "ClusterNode",
    "ClusterSelf",
    "ClusterShard",
    "ConnectionFailed",
    "ConsumeOptions",
    "ExtendResult",
    "InvalidRequest",
    "InvalidTopology",
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
    "SetNodes",
    "Shard",
    "ShardSpec",
    "Topology",
    "Unauthorized",
    "UnexpectedResponse",
    "decode_set_nodes",
    "decode_topology",
    "next_topology",
    "set_nodes_request",
    "shard_for",
    "validate_set_nodes",
    "validate_topology",
]
