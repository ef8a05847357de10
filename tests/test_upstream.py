"""The gateway's upstream client over real sockets: pool bounds, reuse, retries and raw header bytes."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from gateway.errors import UpstreamTimeout, UpstreamUnreachable
from gateway.upstream import ConnectionPool
from tests.support.raw_upstream import RawRequest, RawUpstream, ok_handler, read_response


@pytest.fixture
def start_upstream() -> Iterator[Callable[..., RawUpstream]]:
    started: list[RawUpstream] = []

    def start(handler: Any = ok_handler) -> RawUpstream:
        upstream = RawUpstream(handler).start()
        started.append(upstream)
        return upstream

    yield start
    for upstream in started:
        upstream.stop()


def exchange(port: int, request: bytes) -> tuple[bytes, list[tuple[bytes, bytes]], bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as connection:
        connection.sendall(request)
        return read_response(connection)


def _answer_once_per_connection() -> Callable[[RawRequest, socket.socket], bool | None]:
    # Each connection answers its first request, then closes on the second
    # without a response byte: an idle connection the upstream dropped just
    # as the gateway reused it.
    served: set[int] = set()

    def handle(request: RawRequest, connection: socket.socket) -> bool | None:
        if connection.fileno() in served:
            served.discard(connection.fileno())
            return False
        served.add(connection.fileno())
        ok_handler(request, connection)
        return None

    return handle


def test_upstream_stale_connection_retried_for_get(start_upstream: Any, make_config: Any, start_gateway: Any) -> None:
    upstream = start_upstream(_answer_once_per_connection())
    gateway = start_gateway(make_config(upstream.url))

    first, _, _ = exchange(gateway.port, b"GET /a HTTP/1.1\r\nHost: g\r\n\r\n")
    second, _, body = exchange(gateway.port, b"GET /b HTTP/1.1\r\nHost: g\r\n\r\n")

    assert first == b"HTTP/1.1 200 OK"
    assert second == b"HTTP/1.1 200 OK"
    assert body == b"ok"
    assert [request.target for request in upstream.requests] == [b"/a", b"/b", b"/b"]
    assert upstream.accepted_connections == 2


def test_upstream_stale_connection_not_retried_for_post(
    start_upstream: Any, make_config: Any, start_gateway: Any
) -> None:
    upstream = start_upstream(_answer_once_per_connection())
    gateway = start_gateway(make_config(upstream.url))

    exchange(gateway.port, b"GET /a HTTP/1.1\r\nHost: g\r\n\r\n")
    status, _, _ = exchange(gateway.port, b"POST /p HTTP/1.1\r\nHost: g\r\nContent-Length: 3\r\n\r\nabc")

    # The upstream may have acted on the POST, so it is not sent twice.
    assert status == b"HTTP/1.1 502 Bad Gateway"
    assert [request.target for request in upstream.requests] == [b"/a", b"/p"]


def test_upstream_connection_reused(start_upstream: Any, make_config: Any, start_gateway: Any) -> None:
    upstream = start_upstream()
    gateway = start_gateway(make_config(upstream.url))

    for _ in range(5):
        status, _, _ = exchange(gateway.port, b"GET /r HTTP/1.1\r\nHost: g\r\n\r\n")
        assert status == b"HTTP/1.1 200 OK"

    assert upstream.accepted_connections == 1


def test_upstream_connection_close_not_reused(start_upstream: Any, make_config: Any, start_gateway: Any) -> None:
    def handle(request: RawRequest, connection: socket.socket) -> None:
        # The upstream announces the close but leaves the socket open.
        connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")

    upstream = start_upstream(handle)
    gateway = start_gateway(make_config(upstream.url))

    for _ in range(3):
        status, _, _ = exchange(gateway.port, b"GET /c HTTP/1.1\r\nHost: g\r\n\r\n")
        assert status == b"HTTP/1.1 200 OK"

    assert upstream.accepted_connections == 3


def test_upstream_pool_bounded(start_upstream: Any, make_config: Any, start_gateway: Any) -> None:
    def handle(request: RawRequest, connection: socket.socket) -> None:
        time.sleep(0.1)
        ok_handler(request, connection)

    upstream = start_upstream(handle)
    gateway = start_gateway(make_config(upstream.url, upstream__max_connections=2))
    statuses: list[int] = []

    def call() -> None:
        statuses.append(httpx.get(f"{gateway.url}/b", timeout=10).status_code)

    threads = [threading.Thread(target=call) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(15)

    assert statuses == [200] * 6
    assert upstream.accepted_connections == 2


def test_upstream_header_bytes_passed_exactly(start_upstream: Any, make_config: Any, start_gateway: Any) -> None:
    def handle(request: RawRequest, connection: socket.socket) -> None:
        connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Name: \xff caf\xe9 \xc3\xa9\r\n\r\nok")

    upstream = start_upstream(handle)
    gateway = start_gateway(make_config(upstream.url))

    _, headers, _ = exchange(
        gateway.port, b"GET /h HTTP/1.1\r\nHost: g\r\nX-Latin: caf\xe9\r\nX-Utf8: \xc3\xa9\r\n\r\n"
    )

    assert upstream.requests[0].header_values(b"x-latin") == [b"caf\xe9"]
    assert upstream.requests[0].header_values(b"x-utf8") == [b"\xc3\xa9"]
    assert [value for name, value in headers if name == b"x-name"] == [b"\xff caf\xe9 \xc3\xa9"]


def test_upstream_https_verifies_certificate(make_config: Any, start_gateway: Any) -> None:
    # A TLS listener whose certificate no default trust store accepts: the
    # handshake must fail, so the request gets 502 instead of reaching it.
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    gateway = start_gateway(make_config(f"https://127.0.0.1:{port}"))
    accepted = threading.Thread(target=_send_plain_http_on_accept, args=(listener,), daemon=True)
    accepted.start()

    try:
        response = httpx.get(f"{gateway.url}/tls", timeout=10)
    finally:
        listener.close()

    assert response.status_code == 502


def _send_plain_http_on_accept(listener: socket.socket) -> None:
    # Plain HTTP bytes where a TLS server hello is expected fail every handshake.
    try:
        connection, _ = listener.accept()
    except OSError:
        return
    with connection:
        connection.recv(65536)
        connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")


async def test_pool_timeout_raised_when_full(start_upstream: Any) -> None:
    release = threading.Event()
    upstream = start_upstream(lambda request, connection: release.wait(10))
    pool = ConnectionPool("127.0.0.1", upstream.port, None, 1, connect_timeout=1, pool_timeout=0.2)

    try:
        connection, _ = await pool.acquire()
        with pytest.raises(UpstreamTimeout):
            await pool.acquire()
        pool.release(connection, is_reusable=True)
        again, is_reused = await pool.acquire()
        pool.release(again, is_reusable=True)
    finally:
        release.set()
        await pool.close()

    assert again is connection
    assert is_reused


async def test_pool_connect_refused_unreachable() -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    listener.close()
    pool = ConnectionPool("127.0.0.1", port, None, 1, connect_timeout=1, pool_timeout=1)

    with pytest.raises(UpstreamUnreachable):
        await pool.acquire()
    # The failed attempt gave its slot back.
    with pytest.raises(UpstreamUnreachable):
        await asyncio.wait_for(pool.acquire(), 2)


def _answer_after(delays: list[float]) -> Callable[[RawRequest, socket.socket], None]:
    # The upstream responds to its nth request after delays[n] seconds.
    def handle(request: RawRequest, connection: socket.socket) -> None:
        time.sleep(delays.pop(0))
        ok_handler(request, connection)

    return handle


async def _exchange_on(connection: Any, timeout: float) -> None:
    connection.start_exchange(is_head=False)
    connection.write(b"GET / HTTP/1.1\r\nHost: upstream\r\n\r\n")
    await connection.read_head(timeout)
    while not connection.is_message_complete:
        await connection.read_body(timeout)


async def test_connection_timeout_shorter_than_previous(start_upstream: Any) -> None:
    upstream = start_upstream(_answer_after([0.0, 10.0]))
    pool = ConnectionPool("127.0.0.1", upstream.port, None, 1, connect_timeout=1, pool_timeout=1)
    connection, _ = await pool.acquire()

    try:
        await _exchange_on(connection, timeout=30)
        started = time.monotonic()
        with pytest.raises(UpstreamTimeout, match=r"within 0\.3 s"):
            await _exchange_on(connection, timeout=0.3)
        elapsed = time.monotonic() - started
    finally:
        pool.release(connection, is_reusable=False)
        await pool.close()

    # The second wait ends at its own deadline, not at the first wait's.
    assert elapsed < 5


async def test_connection_timeout_longer_than_previous(start_upstream: Any) -> None:
    upstream = start_upstream(_answer_after([0.0, 0.6]))
    pool = ConnectionPool("127.0.0.1", upstream.port, None, 1, connect_timeout=1, pool_timeout=1)
    connection, _ = await pool.acquire()

    try:
        await _exchange_on(connection, timeout=0.2)
        # The timer armed for the first wait fires during this one and must not end it.
        await _exchange_on(connection, timeout=5)
    finally:
        pool.release(connection, is_reusable=True)
        await pool.close()

    assert connection.status == 200


async def test_pool_idle_connection_expires(start_upstream: Any) -> None:
    upstream = start_upstream()
    pool = ConnectionPool("127.0.0.1", upstream.port, None, 2, connect_timeout=1, pool_timeout=1, idle_timeout=0.2)

    try:
        first, _ = await pool.acquire()
        pool.release(first, is_reusable=True)
        await asyncio.sleep(0.4)
        second, is_reused = await pool.acquire()
        pool.release(second, is_reusable=True)
    finally:
        await pool.close()

    assert second is not first
    assert not is_reused
    assert first.is_closed


async def test_pool_oldest_idle_connection_expires_first(start_upstream: Any) -> None:
    upstream = start_upstream()
    pool = ConnectionPool("127.0.0.1", upstream.port, None, 2, connect_timeout=1, pool_timeout=1, idle_timeout=0.5)

    try:
        older, _ = await pool.acquire()
        newer, _ = await pool.acquire()
        pool.release(older, is_reusable=True)
        await asyncio.sleep(0.3)
        pool.release(newer, is_reusable=True)
        await asyncio.sleep(0.3)
        # The older connection has been idle 0.6 s, the newer one 0.3 s.
        taken, is_reused = await pool.acquire()
        pool.release(taken, is_reusable=True)
    finally:
        await pool.close()

    assert taken is newer
    assert is_reused
    assert older.is_closed


async def test_pool_expired_behind_closed_not_reused(start_upstream: Any) -> None:
    upstream = start_upstream()
    pool = ConnectionPool("127.0.0.1", upstream.port, None, 3, connect_timeout=1, pool_timeout=1, idle_timeout=0.5)

    try:
        oldest, _ = await pool.acquire()
        older, _ = await pool.acquire()
        newest, _ = await pool.acquire()
        pool.release(oldest, is_reusable=True)
        pool.release(older, is_reusable=True)
        await asyncio.sleep(0.3)
        pool.release(newest, is_reusable=True)
        newest.close()  # as when the upstream closes it while it is idle
        await asyncio.sleep(0.3)
        # `oldest` and `older` have been idle 0.6 s, past the idle timeout.
        taken = pool.take_idle()
    finally:
        await pool.close()
    if taken is not None:
        taken.close()

    assert taken is None
    assert older.is_closed
    assert pool._count == 0
