"""Join the small writes of one event-loop iteration into one socket write, under uvicorn.

uvicorn 0.55's httptools protocol calls `transport.write` once for a
response's status line and headers and once more for each body message, so
a small response costs two `send` system calls. `CoalescingTransport` holds
small writes and hands them to the real transport joined, either when a
write would take the held bytes past `MAX_HELD_BYTES` or from a
`loop.call_soon` callback, which runs once the code running now has yielded
to the event loop. Bytes are never reordered.

On a shared 2-core machine, joining the two writes cut the CPU time per
request of a trivial ASGI app under uvicorn (uvloop, httptools) from 24.8 to
21.7 us (wrk -t1 -c32 -d3s, five alternating rounds, with a prototype of
this wrapper). For the gateway, one paired run of `python -m bench.compare
BASELINE --rounds 5` measured 0.92 of the baseline's CPU time per request
with a cached key and 0.88 for anonymous requests.

`CoalescingHttpToolsProtocol` is uvicorn's httptools protocol with its
transport wrapped; `gateway.server` passes it to uvicorn as the `http`
protocol class.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from gateway.config import DEFAULT_SEND_TIMEOUT_SECONDS, MAX_HEADER_BYTES_LIMIT

# Response heads and small bodies fit. Copying 16 KiB to join it with the next
# write takes roughly a microsecond (an estimate), less than the 3 us per
# request that joining saved in the measurement above.
MAX_HELD_BYTES = 16 * 1024

# Largest request head (request line and header section, as received) that
# the protocol buffers before it sends 431 and closes the connection. httptools
# sets no limit of its own, and uvicorn keeps each header as its own objects:
# a 1 MiB head of tiny headers took about 24 MiB. So the limit is the largest
# `server.max_header_bytes` allowed plus 16 KiB for the request line. Heads
# over `server.max_header_bytes` but within this get the application's 431.
MAX_HEAD_BYTES = MAX_HEADER_BYTES_LIMIT + 16 * 1024

_HEAD_TOO_LARGE_BODY = b'{"message":"Request headers too large"}'
_HEAD_TOO_LARGE_RESPONSE = (
    b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
    b"content-type: application/json\r\n"
    b"content-length: %d\r\n"
    b"connection: close\r\n"
    b"\r\n%b" % (len(_HEAD_TOO_LARGE_BODY), _HEAD_TOO_LARGE_BODY)
)

WritableData = bytes | bytearray | memoryview


class CoalescingTransport(asyncio.Transport):
    """A transport wrapper that sends the small writes of one loop iteration in one write.

    A write is held while the bytes held stay within `MAX_HELD_BYTES`. The
    held bytes go out, joined with the write that overflows the limit, in a
    single `write` (or `writelines`, so that a large write is not copied),
    or on their own from a `loop.call_soon` callback. A
    large write with nothing held goes straight through. `close()` and
    `write_eof()` send the held bytes first; `abort()` drops them, as it
    drops the real transport's buffer. Held bytes are dropped silently when
    the real transport is already closing: asyncio's transport ignores a
    write after `close()`, and uvloop's raises `RuntimeError` once the
    connection is lost. Every other method delegates to the real transport.
    """

    __slots__ = ("_held_size", "_held_writes", "_is_flush_scheduled", "_loop", "_transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__()
        self._transport = transport
        self._loop = loop
        self._held_writes: list[bytes] = []
        self._held_size = 0
        self._is_flush_scheduled = False

    # Writing.

    def write(self, data: WritableData) -> None:
        size = len(data)
        if not size:
            return

        if self._held_size + size <= MAX_HELD_BYTES:
            # bytes() copies a bytearray or memoryview that the caller may reuse.
            self._held_writes.append(bytes(data))
            self._held_size += size
            self._schedule_flush()
            return

        if not self._held_writes:
            self._transport.write(data)
            return

        pieces: list[WritableData] = [*self._take_held(), data]
        if size <= MAX_HELD_BYTES:
            self._transport.write(b"".join(pieces))
        else:
            self._transport.writelines(pieces)

    def writelines(self, list_of_data: Iterable[WritableData]) -> None:
        if not self._held_writes:
            self._transport.writelines(list_of_data)
            return

        pieces: list[WritableData] = [*self._take_held(), *list_of_data]
        self._transport.writelines(pieces)

    def flush(self) -> None:
        """Send the held bytes now in one write, or drop them if the transport is closing."""
        if not self._held_writes:
            return

        pieces = self._take_held()
        if self._transport.is_closing():
            return
        self._transport.write(b"".join(pieces))

    def write_eof(self) -> None:
        self.flush()
        self._transport.write_eof()

    def can_write_eof(self) -> bool:
        return self._transport.can_write_eof()

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() + self._held_size

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._transport.get_write_buffer_limits()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._transport.set_write_buffer_limits(high, low)

    def _schedule_flush(self) -> None:
        if not self._is_flush_scheduled:
            self._is_flush_scheduled = True
            self._loop.call_soon(self._run_scheduled_flush)

    def _run_scheduled_flush(self) -> None:
        self._is_flush_scheduled = False
        self.flush()

    def _take_held(self) -> list[bytes]:
        pieces = self._held_writes
        self._held_writes = []
        self._held_size = 0
        return pieces

    # Closing.

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def abort(self) -> None:
        self._take_held()
        self._transport.abort()

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    # Everything else belongs to the real transport.

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._transport.get_extra_info(name, default)

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._transport.set_protocol(protocol)

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._transport.get_protocol()

    def is_reading(self) -> bool:
        return self._transport.is_reading()

    def pause_reading(self) -> None:
        self._transport.pause_reading()

    def resume_reading(self) -> None:
        self._transport.resume_reading()


class CoalescingHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools HTTP/1.1 protocol, writing through a `CoalescingTransport`.

    Everything that uvicorn's protocol writes goes through the wrapper: response
    heads and bodies, `100 Continue`, its own 400 and 500 responses, and, after
    a WebSocket upgrade, the WebSocket protocol's frames, so their order holds.
    Flow control is unchanged, because the real transport still calls this
    protocol's `pause_writing` and `resume_writing`.

    The keep-alive timeout uses one timer per connection. uvicorn arms a
    timer after each response and cancels it when the next request arrives.
    Here the timer stays armed. When it fires before the connection has been
    idle for the whole timeout, it is moved to the end of the current idle period. `on_response_complete` is
    uvicorn 0.55's, apart from that timer, so pyproject.toml keeps uvicorn
    below 0.56 until a newer one is checked against it.

    A request head longer than `MAX_HEAD_BYTES` gets 431 and the connection
    closes, or, behind a response still in progress, the connection closes
    after that response.

    When a client reads so little that the transport's write buffer stays
    full for `send_timeout` seconds, its connection is aborted, as nginx's
    `send_timeout` does. uvicorn alone would wait forever, and a proxied
    response would hold its upstream connection all that time.
    """

    def __init__(self, *args: Any, send_timeout: float = DEFAULT_SEND_TIMEOUT_SECONDS, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.send_timeout = send_timeout
        # Armed while the transport's write buffer is full: the client is not reading.
        self._send_timer: asyncio.TimerHandle | None = None
        # The event loop time when the connection last went idle, or None while a request is in progress.
        self._idle_since: float | None = None
        self._idle_timer: asyncio.TimerHandle | None = None
        # Bytes received since the last request ended, while no head is
        # complete, or None while a body is read. A chunk's bytes after the
        # end of a request are not counted, so the count may fall short by
        # less than one read.
        self._head_bytes: int | None = 0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._coalescing_transport = CoalescingTransport(transport, self.loop)
        super().connection_made(self._coalescing_transport)

    def eof_received(self) -> None:
        # Returning None makes the real transport close itself, without the
        # wrapper's close() and its flush, so the held bytes of a response
        # written before the client's FIN are sent now or never.
        self._coalescing_transport.flush()

    def data_received(self, data: bytes) -> None:
        if self._head_bytes is not None:
            self._head_bytes += len(data)
        super().data_received(data)
        if self._head_bytes is not None and self._head_bytes > MAX_HEAD_BYTES and not self.transport.is_closing():
            self._reject_large_head()

    def on_headers_complete(self) -> None:
        self._head_bytes = None
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._head_bytes = 0

    def _reject_large_head(self) -> None:
        self.logger.warning(
            "Rejected a request head of over %d bytes from %s with 431.", MAX_HEAD_BYTES, self._client_label()
        )
        if self.cycle is not None and not self.cycle.response_complete:
            # A pipelined head arrived behind a response still being sent. The
            # head is dropped unread and uvicorn closes the connection after that response.
            self.cycle.keep_alive = False
            self.flow.pause_reading()
            return
        self.transport.write(_HEAD_TOO_LARGE_RESPONSE)
        self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        # An armed timer references this protocol, which would otherwise stay
        # in memory, with its last request, until the timer fires.
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        self._stop_send_timer()

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._send_timer is None:
            self._send_timer = self.loop.call_later(self.send_timeout, self._abort_stalled_client)

    def resume_writing(self) -> None:
        super().resume_writing()
        self._stop_send_timer()

    def _stop_send_timer(self) -> None:
        if self._send_timer is not None:
            self._send_timer.cancel()
            self._send_timer = None

    def _abort_stalled_client(self) -> None:
        self._send_timer = None
        self.logger.warning(
            "Aborted the connection of %s: its response could not be written for %g s.",
            self._client_label(),
            self.send_timeout,
        )
        self.transport.abort()

    def _client_label(self) -> str:
        return f"{self.client[0]}:{self.client[1]}" if self.client else "an unknown client"

    def _unset_keepalive_if_required(self) -> None:
        # uvicorn calls this when bytes arrive, a response completes or the connection closes.
        self._idle_since = None

    def on_response_complete(self) -> None:
        self.server_state.total_requests += 1
        if self.transport.is_closing():
            return

        self._unset_keepalive_if_required()
        self.flow.resume_reading()
        if self.pipeline:
            cycle, app = self.pipeline.pop()
            self._start_asgi_task(cycle, app)
            return

        self._idle_since = self.loop.time()
        if self._idle_timer is None:
            self._idle_timer = self.loop.call_at(self._idle_since + self.timeout_keep_alive, self._check_idle)

    def _check_idle(self) -> None:
        self._idle_timer = None
        if self._idle_since is None:
            # Busy: the end of the current response arms the timer again.
            return
        deadline = self._idle_since + self.timeout_keep_alive
        if self.loop.time() < deadline:
            self._idle_timer = self.loop.call_at(deadline, self._check_idle)
            return
        self.timeout_keep_alive_handler()
