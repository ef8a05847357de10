"""Write coalescing: the transport wrapper on real loopback sockets, and uvicorn's protocol on the wire.

The wrapper's tests run under both event loops the gateway meets: asyncio's
(the in-process test servers) and uvloop (`gateway serve`). A recording
transport sits between the wrapper and the real socket transport, so the
tests see each call the wrapper makes as well as the bytes the peer reads.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import os
import re
import socket
import time
from collections.abc import Callable, Coroutine, Iterable, Iterator
from typing import Any

import pytest
import uvloop

from gateway.coalescing import MAX_HEAD_BYTES, MAX_HELD_BYTES, CoalescingHttpToolsProtocol, CoalescingTransport
from tests.support.raw_upstream import read_response
from tests.support.servers import ThreadedServer, raw_request

LOOP_FACTORIES: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop,
    "uvloop": uvloop.new_event_loop,
}
LARGE_BODY_BYTES = 5 * 1024 * 1024
# How long the scripted app's `/busy` path blocks the server's event loop.
BUSY_SECONDS = 0.3


# Transport wrapper.


class RecordingTransport(asyncio.Transport):
    """Forward every call to a real transport, recording writes, write_eof, close and abort."""

    def __init__(self, transport: asyncio.Transport) -> None:
        super().__init__()
        self.transport = transport
        self.calls: list[tuple[Any, ...]] = []

    def write(self, data: Any) -> None:
        self.calls.append(("write", data))
        self.transport.write(data)

    def writelines(self, list_of_data: Iterable[Any]) -> None:
        pieces = list(list_of_data)
        self.calls.append(("writelines", pieces))
        self.transport.writelines(pieces)

    def write_eof(self) -> None:
        self.calls.append(("write_eof",))
        self.transport.write_eof()

    def close(self) -> None:
        self.calls.append(("close",))
        self.transport.close()

    def abort(self) -> None:
        self.calls.append(("abort",))
        self.transport.abort()

    def is_closing(self) -> bool:
        return self.transport.is_closing()

    def can_write_eof(self) -> bool:
        return self.transport.can_write_eof()

    def get_write_buffer_size(self) -> int:
        return self.transport.get_write_buffer_size()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.transport.get_extra_info(name, default)

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self.transport.get_protocol()

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self.transport.set_protocol(protocol)

    def is_reading(self) -> bool:
        return self.transport.is_reading()

    def pause_reading(self) -> None:
        self.transport.pause_reading()

    def resume_reading(self) -> None:
        self.transport.resume_reading()


class Peer(asyncio.Protocol):
    """The reading end of the connection: collects the bytes and notes EOF and connection loss."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.has_eof = False
        self.changed = asyncio.Event()
        self.lost = asyncio.Event()
        self.transport: asyncio.BaseTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.data += data
        self.changed.set()

    def eof_received(self) -> None:
        # Returning None lets the transport close this end too.
        self.has_eof = True
        self.changed.set()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost.set()
        self.changed.set()

    async def read_until(self, size: int) -> bytes:
        while len(self.data) < size and not self.lost.is_set():
            self.changed.clear()
            await self.changed.wait()
        return bytes(self.data)

    async def read_until_eof(self) -> bytes:
        while not self.has_eof and not self.lost.is_set():
            self.changed.clear()
            await self.changed.wait()
        return bytes(self.data)


class Connection:
    """A real TCP connection on loopback: the wrapper writes on one end, `peer` reads the other."""

    def __init__(self, writer: CoalescingTransport, recording: RecordingTransport, peer: Peer) -> None:
        self.writer = writer
        self.recording = recording
        self.peer = peer
        self.errors: list[dict[str, Any]] = []

    @property
    def calls(self) -> list[tuple[Any, ...]]:
        return self.recording.calls

    def abort(self) -> None:
        self.recording.transport.abort()
        if self.peer.transport is not None:
            self.peer.transport.abort()


# Connections of the running test, aborted after it even when it fails,
# so a loop never closes with a socket still open.
open_connections: list[Connection] = []


async def connect() -> Connection:
    loop = asyncio.get_running_loop()
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        accepted, _ = listener.accept()
    real, _ = await loop.connect_accepted_socket(asyncio.Protocol, accepted)
    peer = Peer()
    await loop.create_connection(lambda: peer, sock=client)
    recording = RecordingTransport(real)
    connection = Connection(CoalescingTransport(recording, loop), recording, peer)
    loop.set_exception_handler(lambda _, context: connection.errors.append(context))
    open_connections.append(connection)
    return connection


@pytest.fixture(params=list(LOOP_FACTORIES))
def run(request: pytest.FixtureRequest) -> Callable[[Callable[[], Coroutine[Any, Any, None]]], None]:
    """Run a test coroutine on a fresh event loop of the parametrized kind."""

    async def run_then_abort(test: Callable[[], Coroutine[Any, Any, None]]) -> None:
        try:
            await asyncio.wait_for(test(), 10)
        finally:
            for connection in open_connections:
                connection.abort()
            open_connections.clear()

    def run_on_loop(test: Callable[[], Coroutine[Any, Any, None]]) -> None:
        with asyncio.Runner(loop_factory=LOOP_FACTORIES[request.param]) as runner:
            runner.run(run_then_abort(test))

    return run_on_loop


async def next_iteration() -> None:
    # The wrapper's flush was scheduled before this task's next step.
    await asyncio.sleep(0)


def test_transport_small_writes_joined(run: Any) -> None:
    async def test() -> None:
        connection = await connect()

        connection.writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n")
        connection.writer.write(b"hello")
        calls_before_yield = list(connection.calls)
        await next_iteration()

        assert calls_before_yield == []
        assert connection.calls == [("write", b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello")]
        assert await connection.peer.read_until(43) == b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello"
        connection.writer.close()

    run(test)


def test_transport_large_write_goes_straight_through(run: Any) -> None:
    async def test() -> None:
        connection = await connect()
        body = os.urandom(MAX_HELD_BYTES + 1)

        connection.writer.write(body)

        assert connection.calls == [("write", body)]
        assert await connection.peer.read_until(len(body)) == body
        connection.writer.close()

    run(test)


def test_transport_large_write_after_small_uses_writelines(run: Any) -> None:
    async def test() -> None:
        connection = await connect()
        head = b"HTTP/1.1 200 OK\r\ncontent-length: 5242880\r\n\r\n"
        body = os.urandom(LARGE_BODY_BYTES)

        connection.writer.write(head)
        connection.writer.write(body)

        assert [call[0] for call in connection.calls] == ["writelines"]
        assert connection.calls[0][1] == [head, body]
        assert connection.calls[0][1][1] is body
        assert await connection.peer.read_until(len(head) + len(body)) == head + body
        connection.writer.close()

    run(test)


def test_transport_small_write_past_limit_sends_joined(run: Any) -> None:
    async def test() -> None:
        connection = await connect()
        first = b"a" * (MAX_HELD_BYTES - 10)
        second = b"b" * 20

        connection.writer.write(first)
        connection.writer.write(second)

        assert connection.calls == [("write", first + second)]
        connection.writer.close()

    run(test)


@pytest.mark.parametrize(
    "sizes",
    [
        # Small, large, small: held, sent with the large write, held again.
        [10, 100_000, 10],
        # Exactly the limit is held, and one more byte overflows it.
        [MAX_HELD_BYTES, 1, MAX_HELD_BYTES],
        # Many tiny writes, as a chatty streaming response makes.
        [1] * 200,
        # Large writes with nothing held go straight through between small ones.
        [100_000, 5, 100_000, 5, 0, 7],
    ],
)
@pytest.mark.parametrize("yields_between_writes", [False, True])
def test_transport_keeps_byte_order(run: Any, sizes: list[int], yields_between_writes: bool) -> None:
    async def test() -> None:
        connection = await connect()
        pieces = [os.urandom(size) for size in sizes]

        for piece in pieces:
            connection.writer.write(piece)
            if yields_between_writes:
                await next_iteration()
        connection.writer.close()

        assert await connection.peer.read_until_eof() == b"".join(pieces)
        assert connection.errors == []

    run(test)


def test_transport_writelines_after_held_write(run: Any) -> None:
    async def test() -> None:
        connection = await connect()

        connection.writer.write(b"head")
        connection.writer.writelines([b"one", bytearray(b"two")])
        connection.writer.close()

        assert connection.calls[0] == ("writelines", [b"head", b"one", bytearray(b"two")])
        assert await connection.peer.read_until_eof() == b"headonetwo"

    run(test)


def test_transport_close_sends_held_bytes_first(run: Any) -> None:
    async def test() -> None:
        connection = await connect()

        connection.writer.write(b"HTTP/1.1 400 Bad Request\r\n\r\n")
        connection.writer.close()

        assert connection.calls == [("write", b"HTTP/1.1 400 Bad Request\r\n\r\n"), ("close",)]
        assert await connection.peer.read_until_eof() == b"HTTP/1.1 400 Bad Request\r\n\r\n"
        assert connection.writer.is_closing()

    run(test)


def test_transport_abort_drops_held_bytes(run: Any) -> None:
    async def test() -> None:
        connection = await connect()

        connection.writer.write(b"never sent")
        connection.writer.abort()
        buffer_size_after_abort = connection.writer.get_write_buffer_size()
        await asyncio.wait_for(connection.peer.lost.wait(), 5)

        assert buffer_size_after_abort == 0
        assert connection.calls == [("abort",)]
        assert connection.peer.data == b""
        assert connection.errors == []

    run(test)


def test_transport_write_eof_sends_held_bytes_first(run: Any) -> None:
    async def test() -> None:
        connection = await connect()

        connection.writer.write(b"last bytes")
        connection.writer.write_eof()

        assert connection.calls == [("write", b"last bytes"), ("write_eof",)]
        assert await connection.peer.read_until_eof() == b"last bytes"
        assert connection.peer.has_eof
        connection.writer.close()

    run(test)


def test_transport_flush_after_close_drops_silently(run: Any) -> None:
    async def test() -> None:
        connection = await connect()

        connection.writer.write(b"held")
        # The real transport closes underneath, as when the peer resets the connection.
        connection.recording.close()
        await next_iteration()
        await asyncio.wait_for(connection.peer.lost.wait(), 5)

        assert connection.calls == [("close",)]
        assert connection.peer.data == b""
        assert connection.errors == []

    run(test)


def test_transport_buffer_size_counts_held_bytes(run: Any) -> None:
    async def test() -> None:
        connection = await connect()

        connection.writer.write(b"x" * 100)
        held_size = connection.writer.get_write_buffer_size() - connection.recording.get_write_buffer_size()
        await next_iteration()
        size_after_flush = connection.writer.get_write_buffer_size() - connection.recording.get_write_buffer_size()

        assert held_size == 100
        assert size_after_flush == 0
        connection.writer.close()

    run(test)


def test_transport_copies_reused_bytearray(run: Any) -> None:
    async def test() -> None:
        connection = await connect()
        buffer = bytearray(b"first")

        connection.writer.write(buffer)
        buffer[:] = b"later"
        connection.writer.close()

        assert await connection.peer.read_until_eof() == b"first"

    run(test)


def test_transport_delegates_to_real_transport(run: Any) -> None:
    async def test() -> None:
        connection = await connect()
        writer, real = connection.writer, connection.recording.transport

        writer.pause_reading()
        is_reading_when_paused = real.is_reading()
        writer.resume_reading()

        assert writer.get_extra_info("peername") == real.get_extra_info("peername")
        assert writer.get_extra_info("missing", "default") == "default"
        assert is_reading_when_paused is False
        assert writer.is_reading() is True
        assert writer.get_protocol() is real.get_protocol()
        assert writer.can_write_eof() is True
        assert writer.is_closing() is False
        writer.close()

    run(test)


# uvicorn's protocol on the wire, against uvicorn's own.


class ScriptedApp:
    """An ASGI app whose responses depend only on the request: small, streamed, large and echoed bodies."""

    def __init__(self) -> None:
        self.large_body = hashlib.shake_256(b"large body").digest(LARGE_BODY_BYTES)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await _serve_lifespan(receive, send)
            return

        path = scope["path"]
        if path == "/stream":
            await self._stream(send, [b"first chunk", b"second chunk", b"third chunk"])
        elif path == "/stream-large":
            chunk = 64 * 1024
            await self._stream(send, [self.large_body[at : at + chunk] for at in range(0, LARGE_BODY_BYTES, chunk)])
        elif path == "/large":
            await self._respond(send, self.large_body)
        elif path == "/echo":
            await self._respond(send, await _read_body(receive))
        elif path == "/sleep":
            await asyncio.sleep(BUSY_SECONDS)
            await self._respond(send, b"hello from /sleep")
        elif path == "/busy":
            # Blocks the event loop, as a burst of other requests would.
            time.sleep(BUSY_SECONDS)
            await self._respond(send, b"hello from /busy")
        else:
            await self._respond(send, b"hello from " + path.encode())

    async def _respond(self, send: Any, body: bytes) -> None:
        headers = [
            (b"content-type", b"application/octet-stream"),
            (b"content-length", str(len(body)).encode()),
            (b"date", b"Thu, 01 Jan 2026 00:00:00 GMT"),
        ]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def _stream(self, send: Any, chunks: list[bytes]) -> None:
        headers = [(b"content-type", b"text/plain"), (b"date", b"Thu, 01 Jan 2026 00:00:00 GMT")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        for chunk in chunks:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
            # A real stream waits for its next chunk, so held bytes go out in between.
            await asyncio.sleep(0)
        await send({"type": "http.response.body", "body": b""})


async def _serve_lifespan(receive: Any, send: Any) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        else:
            await send({"type": "lifespan.shutdown.complete"})
            return


async def _read_body(receive: Any) -> bytes:
    chunks = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


@pytest.fixture(scope="module")
def scripted_servers() -> Iterator[dict[str, ThreadedServer]]:
    """The scripted app under uvicorn's httptools protocol and under the coalescing one."""
    app = ScriptedApp()
    servers = {
        "httptools": ThreadedServer(app, http="httptools", timeout_keep_alive=1).start(),
        "coalescing": ThreadedServer(app, http=CoalescingHttpToolsProtocol, timeout_keep_alive=1).start(),
    }
    yield servers
    for server in servers.values():
        server.stop()


def request(method: bytes, path: bytes, *header_lines: bytes, body: bytes = b"") -> bytes:
    lines = [method + b" " + path + b" HTTP/1.1", b"Host: gateway", b"X-Request-ID: fixed-request-id", *header_lines]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


CLOSE = b"Connection: close"
ECHO_BODY = bytes(range(256)) * 40

RAW_EXCHANGES = {
    "small response": request(b"GET", b"/small", CLOSE),
    "head": request(b"HEAD", b"/small", CLOSE),
    "streamed response": request(b"GET", b"/stream", CLOSE),
    "large response": request(b"GET", b"/large", CLOSE),
    "large streamed response": request(b"GET", b"/stream-large", CLOSE),
    "echoed body": request(b"POST", b"/echo", CLOSE, b"Content-Length: %d" % len(ECHO_BODY), body=ECHO_BODY),
    "pipelined requests": request(b"GET", b"/one")
    + request(b"HEAD", b"/small")
    + request(b"GET", b"/stream")
    + request(b"POST", b"/echo", b"Content-Length: 5", body=b"hello")
    + request(b"GET", b"/last", CLOSE),
    "HTTP/1.0 request": b"GET /old HTTP/1.0\r\nHost: gateway\r\n\r\n",
    # uvicorn writes its own 400 and closes the connection.
    "invalid request": b"GET / HTTP/1.1\r\nHost: gateway\r\nBad Header\r\n\r\n",
    # Without Connection: close the server closes after its 1 s keep-alive timeout.
    "keep-alive timeout": request(b"GET", b"/idle"),
}


@pytest.mark.parametrize("exchange", RAW_EXCHANGES)
def test_protocol_bytes_match_uvicorn(scripted_servers: dict[str, ThreadedServer], exchange: str) -> None:
    answers = {name: raw_request(server.port, RAW_EXCHANGES[exchange]) for name, server in scripted_servers.items()}

    assert answers["coalescing"] == answers["httptools"]
    assert answers["coalescing"].startswith(b"HTTP/1.")


def continue_exchange(port: int, path: bytes = b"/echo", extra_header: bytes = b"X-Thing: 1") -> bytes:
    """POST with `Expect: 100-continue`, sending the body only after the interim response."""
    head = request(b"POST", path, b"Expect: 100-continue", b"Content-Length: 4", extra_header, CLOSE)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as connection:
        connection.sendall(head)
        interim = b""
        while not interim.endswith(b"\r\n\r\n"):
            interim += connection.recv(1)
        connection.sendall(b"body")
        rest = b""
        while chunk := connection.recv(65536):
            rest += chunk
    return interim + rest


def test_protocol_continue_matches_uvicorn(scripted_servers: dict[str, ThreadedServer]) -> None:
    answers = {name: continue_exchange(server.port) for name, server in scripted_servers.items()}

    assert answers["coalescing"] == answers["httptools"]
    assert answers["coalescing"].startswith(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\n")
    assert answers["coalescing"].endswith(b"\r\n\r\nbody")


@pytest.fixture(scope="module")
def uvloop_servers() -> Iterator[dict[str, ThreadedServer]]:
    """The scripted app on uvloop, as `gateway serve` runs it, under both protocols."""
    app = ScriptedApp()
    servers = {
        "httptools": ThreadedServer(app, loop_factory=uvloop.new_event_loop, http="httptools").start(),
        "coalescing": ThreadedServer(app, loop_factory=uvloop.new_event_loop, http=CoalescingHttpToolsProtocol).start(),
    }
    yield servers
    for server in servers.values():
        server.stop()


@pytest.mark.parametrize("server", ["httptools", "coalescing"])
def test_protocol_answers_after_client_half_close(uvloop_servers: dict[str, ThreadedServer], server: str) -> None:
    # The client shuts down its sending side while the server's loop is busy
    # with the request, so uvloop reads the FIN right after the response is
    # written, and the transport closes itself once the protocol's
    # eof_received returns.
    with socket.create_connection(("127.0.0.1", uvloop_servers[server].port), timeout=5) as connection:
        connection.sendall(request(b"GET", b"/busy"))
        time.sleep(BUSY_SECONDS / 3)
        connection.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := connection.recv(65536):
            answer += chunk

    assert answer.startswith(b"HTTP/1.1 200 OK\r\n")
    assert answer.endswith(b"\r\n\r\nhello from /busy")


def test_protocol_rejects_endless_head(scripted_servers: dict[str, ThreadedServer]) -> None:
    header_line = b"X-Filler: " + b"a" * 8000 + b"\r\n"
    with socket.create_connection(("127.0.0.1", scripted_servers["coalescing"].port), timeout=5) as connection:
        connection.sendall(b"GET /small HTTP/1.1\r\nHost: gateway\r\n")
        sent = 0
        try:
            # The head never ends, so the server must respond before it does.
            while sent <= 4 * MAX_HEAD_BYTES:
                connection.sendall(header_line * 16)
                sent += len(header_line) * 16
        except (BrokenPipeError, ConnectionResetError):
            pass
        answer = b""
        try:
            while chunk := connection.recv(65536):
                answer += chunk
        except ConnectionResetError:
            pass

    assert answer.startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n")
    assert b"\r\nconnection: close\r\n" in answer
    assert answer.endswith(b'\r\n\r\n{"message":"Request headers too large"}')


def test_protocol_endless_head_behind_response(scripted_servers: dict[str, ThreadedServer]) -> None:
    # The endless head arrives while the response to /sleep is in progress: that
    # response is sent whole, then the connection closes without a 431.
    header_line = b"X-Filler: " + b"a" * 8000 + b"\r\n"
    with socket.create_connection(("127.0.0.1", scripted_servers["coalescing"].port), timeout=5) as connection:
        connection.sendall(request(b"GET", b"/sleep") + b"GET /next HTTP/1.1\r\nHost: gateway\r\n")
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            connection.sendall(header_line * (2 * MAX_HEAD_BYTES // len(header_line)))
        answer = b""
        # The server closes with the rest of the head unread, which resets the connection.
        with contextlib.suppress(ConnectionResetError):
            while chunk := connection.recv(65536):
                answer += chunk

    assert answer.startswith(b"HTTP/1.1 200 OK\r\n")
    assert answer.endswith(b"\r\n\r\nhello from /sleep")
    assert answer.count(b"HTTP/1.1 ") == 1


def test_protocol_pipelined_heads_not_summed(scripted_servers: dict[str, ThreadedServer]) -> None:
    # Together the requests are longer than MAX_HEAD_BYTES, each one far shorter.
    filler = b"X-Filler: " + b"a" * 30_000
    count = MAX_HEAD_BYTES // len(filler) + 10
    pipelined = b"".join(request(b"GET", b"/%d" % number, filler) for number in range(count - 1))
    pipelined += request(b"GET", b"/%d" % (count - 1), filler, CLOSE)

    answer = raw_request(scripted_servers["coalescing"].port, pipelined, timeout=10)

    assert answer.count(b"HTTP/1.1 200 OK\r\n") == count
    assert re.findall(rb"hello from /(\d+)", answer) == [b"%d" % number for number in range(count)]
    assert b" 431 " not in answer


def live_coalescing_protocols() -> int:
    gc.collect()
    return sum(isinstance(item, CoalescingHttpToolsProtocol) for item in gc.get_objects())


def test_protocol_freed_when_client_closes(uvloop_servers: dict[str, ThreadedServer]) -> None:
    # The keep-alive timeout is uvicorn's default 5 s. A timer still armed
    # after the connection closed would keep its protocol alive that long.
    for _ in range(20):
        with socket.create_connection(("127.0.0.1", uvloop_servers["coalescing"].port), timeout=5) as connection:
            connection.sendall(request(b"GET", b"/small"))
            status, _, _ = read_response(connection)
            assert status == b"HTTP/1.1 200 OK"

    deadline = time.monotonic() + 2
    while live_coalescing_protocols() and time.monotonic() < deadline:
        time.sleep(0.05)

    assert live_coalescing_protocols() == 0


def test_protocol_keep_alive_sequential_requests(scripted_servers: dict[str, ThreadedServer]) -> None:
    with socket.create_connection(("127.0.0.1", scripted_servers["coalescing"].port), timeout=5) as connection:
        answers = []
        for path in (b"/first", b"/second", b"/third"):
            connection.sendall(request(b"GET", path))
            answers.append(read_response(connection))

    assert [status for status, _, _ in answers] == [b"HTTP/1.1 200 OK"] * 3
    assert [body for _, _, body in answers] == [b"hello from /first", b"hello from /second", b"hello from /third"]


# Through `gateway serve` (uvloop), against the same gateway under uvicorn's own protocol.


@pytest.fixture
def scripted_upstream() -> Iterator[ThreadedServer]:
    server = ThreadedServer(ScriptedApp(), http="h11").start()
    yield server
    server.stop()


@pytest.fixture
def served_gateway(serve_gateway: Callable[[str, str], int], scripted_upstream: ThreadedServer) -> int:
    """Run `python -m gateway serve` under uvicorn in front of the scripted upstream; return its port."""
    return serve_gateway("uvicorn", scripted_upstream.url)


@pytest.fixture
def both_gateways(
    served_gateway: int, scripted_upstream: ThreadedServer, make_config: Any, start_gateway: Any
) -> dict[str, int]:
    plain = start_gateway(make_config(scripted_upstream.url), http="httptools")
    return {"httptools": plain.port, "gateway serve": served_gateway}


def without_dates(answer: bytes) -> bytes:
    # The gateway dates its own responses, so two runs differ there only.
    return re.sub(rb"\r\ndate: [^\r]*", b"\r\ndate: -", answer, flags=re.IGNORECASE)


def test_serve_bytes_match_uvicorn(both_gateways: dict[str, int], seed_user: Any, seed_token: Any) -> None:
    key, _ = seed_token(seed_user())
    authorized = b"X-API-KEY: " + key.encode()
    # Streamed responses are left out: the gateway re-chunks them as the
    # upstream's bytes arrive, so their chunk sizes differ from run to run.
    exchanges = {
        "pipelined": request(b"GET", b"/one", authorized)
        + request(b"HEAD", b"/small", authorized)
        + request(b"POST", b"/echo", authorized, b"Content-Length: 5", body=b"hello")
        + request(b"GET", b"/missing-key")
        + request(b"GET", b"/last", authorized, CLOSE),
        "large": request(b"GET", b"/large", authorized, CLOSE),
        "invalid request": b"GET / HTTP/1.1\r\nHost: gateway\r\nBad Header\r\n\r\n",
    }

    for name, raw in exchanges.items():
        answers = {server: without_dates(raw_request(port, raw, timeout=10)) for server, port in both_gateways.items()}

        assert answers["gateway serve"] == answers["httptools"], name
        assert answers["gateway serve"].startswith(b"HTTP/1.1 "), name
    large = raw_request(both_gateways["gateway serve"], exchanges["large"], timeout=10)
    assert large.endswith(ScriptedApp().large_body)


@pytest.mark.parametrize(("path", "size"), [("/stream", 34), ("/stream-large", LARGE_BODY_BYTES)])
def test_serve_streamed_body_intact(served_gateway: int, seed_user: Any, seed_token: Any, path: str, size: int) -> None:
    key, _ = seed_token(seed_user())
    with socket.create_connection(("127.0.0.1", served_gateway), timeout=10) as connection:
        connection.sendall(request(b"GET", path.encode(), b"X-API-KEY: " + key.encode()))
        status, headers, body = read_response(connection, timeout=10)
        # The connection stays open for a second request.
        connection.sendall(request(b"GET", b"/after", b"X-API-KEY: " + key.encode()))
        _, _, after = read_response(connection)

    assert status == b"HTTP/1.1 200 OK"
    assert (b"transfer-encoding", b"chunked") in headers
    assert len(body) == size
    if path == "/stream":
        assert body == b"first chunksecond chunkthird chunk"
    else:
        assert body == ScriptedApp().large_body
    assert after == b"hello from /after"


def test_serve_continue_matches_uvicorn(both_gateways: dict[str, int], seed_user: Any, seed_token: Any) -> None:
    key, _ = seed_token(seed_user())
    authorized = b"X-API-KEY: " + key.encode()

    answers = {
        server: without_dates(continue_exchange(port, extra_header=authorized))
        for server, port in both_gateways.items()
    }

    assert answers["gateway serve"] == answers["httptools"]
    assert answers["gateway serve"].startswith(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\n")
    assert answers["gateway serve"].endswith(b"\r\n\r\nbody")


@pytest.mark.parametrize("server", ["httptools", "coalescing"])
def test_protocol_keep_alive_timeout_counts_from_last_response(
    scripted_servers: dict[str, ThreadedServer], server: str
) -> None:
    # The keep-alive timeout is 1 s. The second request comes 1.2 s after the
    # first response, but only 0.6 s after the second one went idle.
    with socket.create_connection(("127.0.0.1", scripted_servers[server].port), timeout=5) as connection:
        statuses = []
        for path in (b"/first", b"/second", b"/third"):
            connection.sendall(request(b"GET", path))
            statuses.append(read_response(connection)[0])
            time.sleep(0.6)
        started = time.monotonic()
        closed_by_server = connection.recv(1) == b""
        idle_seconds = time.monotonic() - started

    assert statuses == [b"HTTP/1.1 200 OK"] * 3
    assert closed_by_server
    # Closed about 1 s after the last response, 0.6 s of which passed before recv.
    assert idle_seconds < 3
