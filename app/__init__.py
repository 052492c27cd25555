"""LionMQ node: a durable HTTP message queue."""

__version__ = "0.1.0"
