"""The gateway's own HTTP/1.1 client for the upstream: a connection pool over asyncio protocols."""

from gateway.upstream.connection import UpstreamConnection
from gateway.upstream.pool import ConnectionPool

__all__ = ["ConnectionPool", "UpstreamConnection"]
