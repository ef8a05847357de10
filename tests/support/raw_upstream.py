"""A socket-level HTTP/1.1 upstream for framing tests: it records the bytes the gateway sends.

In-process or framework servers normalise framing before the application
sees it, so this server parses requests itself, keeps the raw head and body
of each, and lets a test write any response bytes it wants.
"""

from __future__ import annotations

import contextlib
import dataclasses
import socket
import threading
import time
from collections.abc import Callable

from gateway.embedded import free_port


@dataclasses.dataclass
class RawRequest:
    """One request as it arrived: the head and the body bytes exactly as framed on the wire."""

    method: bytes
    target: bytes
    headers: list[tuple[bytes, bytes]]
    head: bytes
    framed_body: bytes
    body: bytes

    def header_values(self, name: bytes) -> list[bytes]:
        return [value for header, value in self.headers if header.lower() == name.lower()]


# A handler writes the whole response for one request on the connection.
# Returning False closes the connection afterwards.
Handler = Callable[[RawRequest, socket.socket], bool | None]


def ok_handler(request: RawRequest, connection: socket.socket) -> None:
    connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nDate: Thu, 01 Jan 2026 00:00:00 GMT\r\n\r\nok")


class RawUpstream:
    """Serve HTTP/1.1 on a free loopback port, one thread per connection, with keep-alive."""

    def __init__(self, handler: Handler = ok_handler, backlog: int = 64) -> None:
        self.handler = handler
        self.requests: list[RawRequest] = []
        self.accepted_connections = 0
        self._open_connections = 0
        self._lock = threading.Lock()
        self.listener = socket.create_server(("127.0.0.1", free_port("127.0.0.1")), backlog=backlog)
        self.port = self.listener.getsockname()[1]
        self._is_stopping = False
        self.thread = threading.Thread(target=self._accept_loop, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def open_connections(self) -> int:
        with self._lock:
            return self._open_connections

    def start(self) -> RawUpstream:
        self.thread.start()
        return self

    def stop(self) -> None:
        self._is_stopping = True
        # Closing alone does not wake a thread blocked in accept() on Linux; shutting down does.
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        self.thread.join(5)

    def wait_for_open_connections(self, count: int, timeout: float = 10) -> int:
        """Wait until at most `count` connections are open; return the number open at the end."""
        deadline = time.monotonic() + timeout
        while self.open_connections > count and time.monotonic() < deadline:
            time.sleep(0.02)
        return self.open_connections

    def _accept_loop(self) -> None:
        while not self._is_stopping:
            try:
                connection, _ = self.listener.accept()
            except OSError:
                return
            with self._lock:
                self.accepted_connections += 1
                self._open_connections += 1
            threading.Thread(target=self._serve, args=(connection,), daemon=True).start()

    def _serve(self, connection: socket.socket) -> None:
        reader = _Reader(connection)
        try:
            while True:
                request = read_request(reader)
                if request is None:
                    return
                self.requests.append(request)
                if self.handler(request, connection) is False:
                    return
        except (OSError, EOFError):
            # The peer reset or closed the connection, possibly mid-request;
            # an incomplete request is never recorded.
            return
        finally:
            connection.close()
            with self._lock:
                self._open_connections -= 1


class _Reader:
    def __init__(self, connection: socket.socket) -> None:
        self.connection = connection
        self.buffer = b""

    def _fill(self) -> None:
        data = self.connection.recv(65536)
        if not data:
            raise EOFError
        self.buffer += data

    def read_until(self, marker: bytes) -> bytes:
        while marker not in self.buffer:
            self._fill()
        data, _, self.buffer = self.buffer.partition(marker)
        return data + marker

    def read_exactly(self, size: int) -> bytes:
        while len(self.buffer) < size:
            self._fill()
        data, self.buffer = self.buffer[:size], self.buffer[size:]
        return data


def read_request(reader: _Reader) -> RawRequest | None:
    """Read one request, or return None when the peer closed the connection between requests."""
    try:
        head = reader.read_until(b"\r\n\r\n")
    except EOFError:
        return None
    request_line, *lines = head[:-4].split(b"\r\n")
    method, target, _ = request_line.split(b" ", 2)
    headers = [(name.strip(), value.strip()) for name, _, value in (line.partition(b":") for line in lines)]
    framed_body, body = _read_body(reader, headers)
    return RawRequest(method, target, headers, head, framed_body, body)


def _read_body(reader: _Reader, headers: list[tuple[bytes, bytes]]) -> tuple[bytes, bytes]:
    names = {name.lower(): value for name, value in headers}
    if names.get(b"transfer-encoding", b"").lower() == b"chunked":
        return _read_chunked(reader)
    size = int(names.get(b"content-length", b"0"))
    body = reader.read_exactly(size)
    return body, body


def _read_chunked(reader: _Reader) -> tuple[bytes, bytes]:
    framed = []
    body = []
    while True:
        size_line = reader.read_until(b"\r\n")
        framed.append(size_line)
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            framed.append(reader.read_until(b"\r\n"))
            return b"".join(framed), b"".join(body)
        chunk = reader.read_exactly(size + 2)
        framed.append(chunk)
        body.append(chunk[:-2])


def read_response(
    connection: socket.socket, has_body: bool = True, timeout: float = 5
) -> tuple[bytes, list[tuple[bytes, bytes]], bytes]:
    """Read one response from a client socket: status line, headers, and the body decoded from its framing.

    With `has_body` false (responses to HEAD, 204, 304) no body is read whatever
    the headers say, so the connection can carry the next request.
    """
    connection.settimeout(timeout)
    reader = _Reader(connection)
    head = reader.read_until(b"\r\n\r\n")
    status_line, *lines = head[:-4].split(b"\r\n")
    headers = [(name.strip().lower(), value.strip()) for name, _, value in (line.partition(b":") for line in lines)]
    if not has_body:
        return status_line, headers, b""
    _, body = _read_body(reader, headers)
    return status_line, headers, body
