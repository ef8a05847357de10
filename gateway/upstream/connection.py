"""One HTTP/1.1 connection to the upstream: an asyncio protocol with httptools' response parser.

The connection carries one exchange at a time. The caller writes the
request bytes itself, then awaits the response head and the body chunks.
Errors are the gateway's own: `UpstreamTimeout` when the upstream stays
silent too long, `UpstreamUnreachable` when the connection closes or the
response cannot be parsed.

Flow control works both ways. Reading from the upstream pauses while more
than `MAX_BUFFERED_BODY_BYTES` of body wait for the caller, and `drain`
waits while the transport's write buffer is above its high-water mark.
"""

from __future__ import annotations

import asyncio
import typing

import httptools

from gateway.errors import UpstreamTimeout, UpstreamUnreachable

# Maximum body bytes held for a caller that has not taken them yet. Above
# this, the connection stops reading from the socket until the caller catches up.
MAX_BUFFERED_BODY_BYTES = 256 * 1024

_BODYLESS_STATUSES = frozenset({204, 304})


class UpstreamConnection(asyncio.Protocol):
    """An HTTP/1.1 client connection that reads one response at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.is_closed = False
        self._is_writing_paused = False
        self._is_reading_paused = False
        self._waiter: asyncio.Future[None] | None = None
        # The wait in progress ends with UpstreamTimeout at `_deadline` (event loop time).
        self._deadline = 0.0
        self._awaited = ""
        self._timeout = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._parser: httptools.HttpResponseParser | None = None
        self._reset_response(is_head=False)

    def _reset_response(self, is_head: bool) -> None:
        self.status = 0
        self.raw_headers: list[tuple[bytes, bytes]] = []
        self.has_content_length = False
        self.is_head_complete = False
        self.is_message_complete = False
        self.has_received_bytes = False
        self.has_written_bytes = False
        self._is_head_request = is_head
        self._is_close_delimited = False
        self._is_keep_alive = False
        self._has_unexpected_bytes = False
        self._body_chunks: list[bytes] = []
        self._buffered_bytes = 0
        self._error: Exception | None = None

    # Exchange, called by the pool's user.

    def start_exchange(self, is_head: bool) -> None:
        """Prepare for a new response. With `is_head`, the request is a HEAD and no body follows the head."""
        self._reset_response(is_head)
        self._parser = httptools.HttpResponseParser(self)

    def write(self, data: bytes) -> None:
        if self.transport is None or self.is_closed:
            raise UpstreamUnreachable("The upstream closed the connection before the request was sent.")
        self.transport.write(data)
        self.has_written_bytes = True

    async def drain(self, timeout: float) -> None:
        """Wait until the upstream accepts more request bytes, or a response or an error came back."""
        while self._is_writing_paused and not self.is_head_complete:
            self._raise_error()
            await self._wait(timeout, "accept the request body")
        self._raise_error()

    async def read_head(self, timeout: float) -> None:
        """Wait for the response's status line and headers (1xx interim responses are skipped)."""
        while not self.is_head_complete:
            self._raise_error()
            await self._wait(timeout, "send the response headers")

    async def read_body(self, timeout: float) -> bytes:
        """Return the body bytes received so far, waiting for some when none are there.

        Returns `b""` only once the body is complete (`is_message_complete`).
        """
        while not self._body_chunks and not self.is_message_complete:
            self._raise_error()
            await self._wait(timeout, "send the response body")

        return self.take_body()

    def take_body(self) -> bytes:
        """Return the body bytes received so far (maybe none) without waiting."""
        chunks = self._body_chunks
        self._body_chunks = []
        self._buffered_bytes = 0
        if self._is_reading_paused and self.transport is not None:
            self._is_reading_paused = False
            self.transport.resume_reading()
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    @property
    def is_reusable(self) -> bool:
        """Tell whether another request may use this connection: the response was complete and kept alive."""
        return (
            self.is_message_complete and self._is_keep_alive and not self._has_unexpected_bytes and not self.is_closed
        )

    def close(self) -> None:
        """Abort the connection: used when an exchange is abandoned midway."""
        self.is_closed = True
        self._cancel_timer()
        if self.transport is not None:
            self.transport.abort()

    def _raise_error(self) -> None:
        if self._error is not None:
            raise self._error

    async def _wait(self, timeout: float, awaited: str) -> None:
        loop = asyncio.get_running_loop()
        waiter = loop.create_future()
        self._waiter = waiter
        self._deadline = loop.time() + timeout
        self._awaited = awaited
        self._timeout = timeout
        # One timer per connection, moved only when this wait ends before it
        # fires, so a request does not arm and cancel a timer of its own.
        if self._timer is None or self._deadline < self._timer.when():
            self._arm_timer(loop)
        try:
            await waiter
        finally:
            self._waiter = None

    def _arm_timer(self, loop: asyncio.AbstractEventLoop) -> None:
        self._cancel_timer()
        self._timer = loop.call_at(self._deadline, self._check_deadline, loop)

    def _check_deadline(self, loop: asyncio.AbstractEventLoop) -> None:
        self._timer = None
        waiter = self._waiter
        if waiter is None or waiter.done():
            return
        if loop.time() < self._deadline:
            # A later wait moved the deadline since the timer was armed.
            self._arm_timer(loop)
            return
        waiter.set_exception(UpstreamTimeout(f"The upstream did not {self._awaited} within {self._timeout:g} s."))

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # asyncio protocol callbacks.

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = typing.cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self._parser is None or self.is_message_complete:
            # Bytes that no request expects, such as a second response, mean
            # that the connection's framing can no longer be trusted.
            self._has_unexpected_bytes = True
            self.close()
            return
        self.has_received_bytes = True
        waiter = self._waiter
        if waiter is not None:
            # The timeouts run between bytes, so every byte moves the deadline,
            # including header bytes that do not end the wait. The timer
            # follows when it fires.
            self._deadline = waiter.get_loop().time() + self._timeout
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(UpstreamUnreachable(f"The upstream sent an invalid HTTP response: {exc}."))
            self.close()

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.is_closed = True
        self._cancel_timer()
        if self.is_head_complete and self._is_close_delimited and not self.is_message_complete:
            # A body without Content-Length or chunked framing ends when the connection does.
            self.is_message_complete = True
        elif not self.is_message_complete and self._parser is not None:
            reason = f": {exc}" if exc is not None else ""
            self._fail(UpstreamUnreachable(f"The upstream closed the connection before the response ended{reason}."))
        self._is_writing_paused = False
        self._wake()

    def pause_writing(self) -> None:
        self._is_writing_paused = True

    def resume_writing(self) -> None:
        self._is_writing_paused = False
        self._wake()

    def _fail(self, error: Exception) -> None:
        if self._error is None:
            self._error = error
        self._wake()

    # httptools parser callbacks.

    def on_header(self, name: bytes, value: bytes) -> None:
        self.raw_headers.append((name, value))

    def on_headers_complete(self) -> None:
        parser = self._parser
        if parser is None:
            return
        status = parser.get_status_code()
        if 100 <= status < 200:
            # An interim response (such as 103 Early Hints) is dropped, and the final one follows.
            self.raw_headers = []
            return

        self.status = status
        self._is_keep_alive = parser.should_keep_alive()
        is_chunked = False
        for name, value in self.raw_headers:
            lowered = name.lower()
            if lowered == b"content-length":
                self.has_content_length = True
            elif lowered == b"transfer-encoding":
                is_chunked = value.rstrip().lower().endswith(b"chunked")
        is_bodyless = self._is_head_request or status in _BODYLESS_STATUSES
        self._is_close_delimited = not (is_bodyless or self.has_content_length or is_chunked)
        self.is_head_complete = True
        if is_bodyless:
            # httptools has no setting for a response to HEAD, so it
            # would wait for the body its Content-Length announces.
            self.is_message_complete = True
        self._wake()

    def on_body(self, body: bytes) -> None:
        if self.is_message_complete:
            self._has_unexpected_bytes = True
            return
        self._body_chunks.append(body)
        self._buffered_bytes += len(body)
        if self._buffered_bytes > MAX_BUFFERED_BODY_BYTES and not self._is_reading_paused and self.transport:
            self._is_reading_paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if not self.is_head_complete:
            return
        self.is_message_complete = True
        self._wake()
