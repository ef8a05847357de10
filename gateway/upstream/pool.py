"""A bounded keep-alive pool of HTTP/1.1 connections to one upstream host.

At most `max_connections` connections exist at once, idle or busy. A
request that finds none free waits up to `pool_timeout` for one, then
raises `UpstreamTimeout`. Connections are reused last-in first-out, so the
warmest connection serves the next request and surplus ones go idle. A
connection idle for longer than `idle_timeout` is closed instead of reused:
when taking a connection and when one comes back, the oldest idle one is checked.
"""

from __future__ import annotations

import asyncio
import collections
import ssl

from gateway.errors import UpstreamTimeout, UpstreamUnreachable
from gateway.upstream.connection import UpstreamConnection


class ConnectionPool:
    """Connections to `host`:`port`, over TLS when `ssl_context` is given."""

    def __init__(
        self,
        host: str,
        port: int,
        ssl_context: ssl.SSLContext | None,
        max_connections: int,
        connect_timeout: float,
        pool_timeout: float,
        idle_timeout: float = 4.0,
    ) -> None:
        self.host = host
        self.port = port
        self.ssl_context = ssl_context
        self.max_connections = max_connections
        self.connect_timeout = connect_timeout
        self.pool_timeout = pool_timeout
        self.idle_timeout = idle_timeout
        # Idle connections with the event loop time they went idle, the oldest first.
        self._idle: list[tuple[UpstreamConnection, float]] = []
        self._count = 0
        # Each waiter receives an idle connection, or None when it may open one.
        self._waiters: collections.deque[asyncio.Future[UpstreamConnection | None]] = collections.deque()
        self._is_closed = False

    async def acquire(self, is_new_required: bool = False) -> tuple[UpstreamConnection, bool]:
        """Return a connection and whether it served an earlier request.

        With `is_new_required`, idle connections are passed over and a new
        one is opened once the pool has room for it. Raises `UpstreamTimeout`
        when no connection frees up within the pool timeout or the connect
        timeout passes, `UpstreamUnreachable` when the connection fails.
        """
        if not is_new_required:
            connection = self.take_idle()
            if connection is not None:
                return connection, True

        if self._count >= self.max_connections:
            handed = await self._wait_for_connection()
            if handed is not None and not is_new_required:
                return handed, True
            if handed is not None:
                # The slot of the handed connection is taken over by the new one.
                handed.close()
                self._count -= 1
        self._count += 1
        try:
            return await self._connect(), False
        except BaseException:
            self._forget_one()
            raise

    def take_idle(self) -> UpstreamConnection | None:
        """Return the most recently used idle connection that is open and not expired, or None; never waits."""
        if not self._idle:
            return None
        now = asyncio.get_running_loop().time()
        self._close_expired(now)
        while self._idle:
            connection, idle_since = self._idle.pop()
            if connection.is_closed:
                self._count -= 1
            elif now - idle_since > self.idle_timeout:
                # Expired, so every older idle connection expired too.
                connection.close()
                self._count -= 1
                self._close_idle()
            else:
                return connection
        return None

    def release(self, connection: UpstreamConnection, is_reusable: bool) -> None:
        """Take a connection back: kept for reuse when `is_reusable`, else closed."""
        if not is_reusable or self._is_closed or connection.is_closed:
            connection.close()
            self._forget_one()
            return
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(connection)
                return
        now = asyncio.get_running_loop().time()
        self._close_expired(now)
        self._idle.append((connection, now))

    async def close(self) -> None:
        """Close the idle connections; busy ones are closed when released."""
        self._is_closed = True
        self._close_idle()

    def _close_idle(self) -> None:
        for connection, _ in self._idle:
            connection.close()
        self._count -= len(self._idle)
        self._idle.clear()

    def _close_expired(self, now: float) -> None:
        # The oldest idle connection is first. Only it is checked, so each call costs one comparison.
        if self._idle and now - self._idle[0][1] > self.idle_timeout:
            connection, _ = self._idle.pop(0)
            connection.close()
            self._count -= 1

    def _forget_one(self) -> None:
        # A connection slot is free again: a waiter may open a new connection.
        self._count -= 1
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    async def _wait_for_connection(self) -> UpstreamConnection | None:
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[UpstreamConnection | None] = loop.create_future()
        self._waiters.append(waiter)
        timer = loop.call_later(self.pool_timeout, self._expire, waiter)
        try:
            return await waiter
        except asyncio.CancelledError:
            self._return_unclaimed(waiter)
            raise
        finally:
            timer.cancel()

    def _expire(self, waiter: asyncio.Future[UpstreamConnection | None]) -> None:
        if not waiter.done():
            waiter.set_exception(
                UpstreamTimeout(
                    f"No upstream connection of {self.max_connections} became free within {self.pool_timeout:g} s."
                )
            )

    def _return_unclaimed(self, waiter: asyncio.Future[UpstreamConnection | None]) -> None:
        # The task was cancelled after a connection or a slot was handed to
        # it: pass it on so that the pool does not lose it.
        if not waiter.done() or waiter.cancelled() or waiter.exception() is not None:
            return
        handed = waiter.result()
        if handed is None:
            self._count += 1
            self._forget_one()
        else:
            self.release(handed, is_reusable=True)

    async def _connect(self) -> UpstreamConnection:
        loop = asyncio.get_running_loop()
        server_hostname = self.host if self.ssl_context is not None else None
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, connection = await loop.create_connection(
                    UpstreamConnection, self.host, self.port, ssl=self.ssl_context, server_hostname=server_hostname
                )
        except TimeoutError as exc:
            raise UpstreamTimeout(
                f"Connecting to the upstream {self.host}:{self.port} took more than {self.connect_timeout:g} s."
            ) from exc
        except OSError as exc:
            raise UpstreamUnreachable(f"Connecting to the upstream {self.host}:{self.port} failed: {exc}.") from exc
        return connection
