"""Proxy conformance over real sockets: what the upstream and the client see on the wire.

The upstream is `RawUpstream`, which records the exact bytes the gateway
sends and writes whatever response bytes a test gives it. Most clients are
raw sockets, so no client library normalises framing on the way.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import aiohttp
import httpx
import pytest
import websockets.exceptions
import websockets.sync.client

from tests.support.raw_upstream import RawRequest, RawUpstream, ok_handler, read_response

UPSTREAM_DATE = b"Thu, 01 Jan 2026 00:00:00 GMT"


@pytest.fixture
def start_upstream() -> Iterator[Callable[..., RawUpstream]]:
    started: list[RawUpstream] = []

    def start(handler: Any = ok_handler, **options: Any) -> RawUpstream:
        upstream = RawUpstream(handler, **options).start()
        started.append(upstream)
        return upstream

    yield start
    for upstream in started:
        upstream.stop()


@pytest.fixture
def api_key(seed_user: Any, seed_token: Any) -> str:
    plaintext, _ = seed_token(seed_user())
    return str(plaintext)


@pytest.fixture
def gateway_before(make_config: Any, start_gateway: Any) -> Callable[..., Any]:
    """Start a gateway in front of `upstream_url`; keyword `section__key=value` overrides its config."""

    def start(upstream_url: str, **overrides: Any) -> Any:
        return start_gateway(make_config(upstream_url, **overrides))

    return start


def responder(raw_response: bytes) -> Callable[[RawRequest, socket.socket], None]:
    def handle(request: RawRequest, connection: socket.socket) -> None:
        connection.sendall(raw_response)

    return handle


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=5)


def exchange(port: int, request: bytes, has_body: bool = True) -> tuple[bytes, list[tuple[bytes, bytes]], bytes]:
    with connect(port) as connection:
        connection.sendall(request)
        return read_response(connection, has_body)


def read_until_closed(connection: socket.socket) -> bytes:
    chunks = []
    while chunk := connection.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def values(headers: list[tuple[bytes, bytes]], name: bytes) -> list[bytes]:
    return [value for header, value in headers if header == name]


# Request target.


@pytest.mark.parametrize(
    "target",
    [
        b"/a%2Fb/c",  # an encoded slash stays encoded
        b"/c%20d+e",  # an encoded space and a literal plus
        b"/q?x=1&x=2&x=",  # repeated and empty query parameters
        b"/q?flag&empty=&=value",  # parameters without a value or a name
        b"/q?plus=%2B+y&space=%20",  # encoded plus next to a plus meaning space
        b"/%FF%FE/latin?n=%E9",  # percent-encoded bytes that are not valid UTF-8
        b"/path;matrix=1/x",  # path parameters
        b"/double//slash/./dot/../x",  # dot segments and empty segments are not normalised
    ],
)
def test_request_target_reaches_upstream_unchanged(start_upstream: Any, gateway_before: Any, target: bytes) -> None:
    upstream = start_upstream()
    gateway = gateway_before(upstream.url)

    status, _, _ = exchange(gateway.port, b"GET " + target + b" HTTP/1.1\r\nHost: g\r\n\r\n")

    assert status == b"HTTP/1.1 200 OK"
    assert upstream.requests[-1].target == target


# Methods and request framing.


@pytest.mark.parametrize(
    "method",
    [b"GET", b"POST", b"PUT", b"PATCH", b"DELETE", b"OPTIONS", b"PURGE", b"PROPFIND", b"QUERY", b"M-SEARCH"],
)
def test_request_method_forwarded(start_upstream: Any, gateway_before: Any, method: bytes) -> None:
    upstream = start_upstream()
    gateway = gateway_before(upstream.url)

    status, _, _ = exchange(gateway.port, method + b" /m HTTP/1.1\r\nHost: g\r\nContent-Length: 3\r\n\r\nabc")

    assert status == b"HTTP/1.1 200 OK"
    assert upstream.requests[-1].method == method
    assert upstream.requests[-1].body == b"abc"


def test_request_unknown_method_forwarded_under_h11(start_upstream: Any, make_config: Any, start_gateway: Any) -> None:
    # h11 accepts any token as a method, which shows that the gateway itself
    # has no method list.
    upstream = start_upstream()
    gateway = start_gateway(make_config(upstream.url), http="h11")

    status, _, _ = exchange(gateway.port, b"BREW /pot HTTP/1.1\r\nHost: g\r\nContent-Length: 3\r\n\r\ntea")

    assert status == b"HTTP/1.1 200 OK"
    assert upstream.requests[-1].method == b"BREW"
    assert upstream.requests[-1].body == b"tea"


def test_request_unknown_method_rejected_by_httptools(start_upstream: Any, gateway_before: Any) -> None:
    # httptools, uvicorn's production parser, rejects methods outside
    # llhttp's list before the gateway receives the request.
    upstream = start_upstream()
    gateway = gateway_before(upstream.url)

    with connect(gateway.port) as connection:
        connection.sendall(b"BREW /pot HTTP/1.1\r\nHost: g\r\n\r\n")
        answer = read_until_closed(connection)

    assert answer.startswith(b"HTTP/1.1 400")
    assert upstream.requests == []


def test_request_content_length_kept(start_upstream: Any, gateway_before: Any) -> None:
    upstream = start_upstream()
    gateway = gateway_before(upstream.url)

    exchange(gateway.port, b"POST /u HTTP/1.1\r\nHost: g\r\nContent-Length: 11\r\n\r\nhello world")

    seen = upstream.requests[-1]
    assert seen.header_values(b"content-length") == [b"11"]
    assert seen.header_values(b"transfer-encoding") == []
    assert seen.framed_body == b"hello world"


def test_request_chunked_stays_chunked(start_upstream: Any, gateway_before: Any) -> None:
    upstream = start_upstream()
    gateway = gateway_before(upstream.url)

    exchange(
        gateway.port,
        b"POST /u HTTP/1.1\r\nHost: g\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
    )

    seen = upstream.requests[-1]
    assert seen.header_values(b"transfer-encoding") == [b"chunked"]
    assert seen.header_values(b"content-length") == []
    assert seen.body == b"hello world"


@pytest.mark.parametrize("method", [b"GET", b"HEAD", b"DELETE", b"POST", b"OPTIONS", b"PURGE"])
def test_request_without_body_stays_bodyless(start_upstream: Any, gateway_before: Any, method: bytes) -> None:
    upstream = start_upstream()
    gateway = gateway_before(upstream.url)

    exchange(gateway.port, method + b" /n HTTP/1.1\r\nHost: g\r\n\r\n", has_body=method != b"HEAD")

    seen = upstream.requests[-1]
    assert seen.header_values(b"content-length") == []
    assert seen.header_values(b"transfer-encoding") == []
    assert seen.framed_body == b""


def test_request_empty_content_length_kept(start_upstream: Any, gateway_before: Any) -> None:
    upstream = start_upstream()
    gateway = gateway_before(upstream.url)

    exchange(gateway.port, b"POST /e HTTP/1.1\r\nHost: g\r\nContent-Length: 0\r\n\r\n")

    seen = upstream.requests[-1]
    assert seen.header_values(b"content-length") == [b"0"]
    assert seen.header_values(b"transfer-encoding") == []
    assert seen.framed_body == b""


@pytest.mark.parametrize("is_chunked", [False, True])
def test_request_large_body_streams_intact(start_upstream: Any, gateway_before: Any, is_chunked: bool) -> None:
    upstream = start_upstream()
    gateway = gateway_before(upstream.url)
    block = bytes(range(256)) * 4096
    blocks = 16  # 16 MiB

    def body() -> Iterator[bytes]:
        for _ in range(blocks):
            yield block

    content = body() if is_chunked else block * blocks
    response = httpx.post(f"{gateway.url}/big", content=content, timeout=30)

    assert response.status_code == 200
    seen = upstream.requests[-1]
    assert len(seen.body) == len(block) * blocks
    assert hashlib.sha256(seen.body).digest() == hashlib.sha256(block * blocks).digest()
    framing = b"transfer-encoding" if is_chunked else b"content-length"
    other = b"content-length" if is_chunked else b"transfer-encoding"
    assert seen.header_values(framing) != []
    assert seen.header_values(other) == []


def test_request_hop_by_hop_headers_dropped(start_upstream: Any, gateway_before: Any) -> None:
    upstream = start_upstream()
    gateway = gateway_before(upstream.url)

    exchange(
        gateway.port,
        b"GET /h HTTP/1.1\r\nHost: g\r\n"
        b"Connection: keep-alive, X-Hop\r\nX-Hop: 1\r\nKeep-Alive: timeout=5\r\nTE: trailers\r\n"
        b"Trailer: X-Checksum\r\nProxy-Authorization: Basic dXNlcjpwYXNz\r\nProxy-Connection: keep-alive\r\n"
        b"X-End-To-End: kept\r\n\r\n",
    )

    seen = upstream.requests[-1]
    for name in (b"x-hop", b"keep-alive", b"te", b"trailer", b"proxy-authorization", b"proxy-connection"):
        assert seen.header_values(name) == [], name
    assert b"keep-alive" not in b"".join(seen.header_values(b"connection")).lower()
    assert seen.header_values(b"x-end-to-end") == [b"kept"]


# Responses.


def test_response_repeated_headers_stay_separate(start_upstream: Any, gateway_before: Any) -> None:
    upstream = start_upstream(
        responder(
            b"HTTP/1.1 200 OK\r\nSet-Cookie: a=1; Path=/\r\nSet-Cookie: b=2, c=3; HttpOnly\r\n"
            b'Link: </x>; rel="next"\r\nLink: </y>; rel="prev"\r\nContent-Length: 2\r\n\r\nok'
        )
    )
    gateway = gateway_before(upstream.url)

    _, headers, body = exchange(gateway.port, b"GET / HTTP/1.1\r\nHost: g\r\n\r\n")

    assert values(headers, b"set-cookie") == [b"a=1; Path=/", b"b=2, c=3; HttpOnly"]
    assert values(headers, b"link") == [b'</x>; rel="next"', b'</y>; rel="prev"']
    assert body == b"ok"


def test_response_content_encoding_untouched(start_upstream: Any, gateway_before: Any) -> None:
    compressed = gzip.compress(b"compressed payload " * 100)
    upstream = start_upstream(
        responder(
            b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Type: text/plain\r\n"
            b"Content-Length: " + str(len(compressed)).encode() + b"\r\n\r\n" + compressed
        )
    )
    gateway = gateway_before(upstream.url)

    _, headers, body = exchange(gateway.port, b"GET / HTTP/1.1\r\nHost: g\r\nAccept-Encoding: gzip\r\n\r\n")

    assert values(headers, b"content-encoding") == [b"gzip"]
    assert values(headers, b"content-length") == [str(len(compressed)).encode()]
    assert body == compressed
    assert upstream.requests[-1].header_values(b"accept-encoding") == [b"gzip"]


def _head_or_get(request: RawRequest, connection: socket.socket) -> None:
    body = b"" if request.method == b"HEAD" else b"0123456789"
    connection.sendall(b'HTTP/1.1 200 OK\r\nContent-Length: 10\r\nETag: "v1"\r\n\r\n' + body)


def test_response_head_keeps_headers_without_body(start_upstream: Any, gateway_before: Any) -> None:
    upstream = start_upstream(_head_or_get)
    gateway = gateway_before(upstream.url)

    with connect(gateway.port) as connection:
        connection.sendall(b"HEAD /r HTTP/1.1\r\nHost: g\r\n\r\n")
        status, headers, _ = read_response(connection, has_body=False)
        connection.sendall(b"GET /r HTTP/1.1\r\nHost: g\r\n\r\n")
        next_status, _, next_body = read_response(connection)

    assert status == b"HTTP/1.1 200 OK"
    assert values(headers, b"content-length") == [b"10"]
    assert values(headers, b"etag") == [b'"v1"']
    # Had the HEAD response carried a body, the next response would start with it.
    assert next_status == b"HTTP/1.1 200 OK"
    assert next_body == b"0123456789"


@pytest.mark.parametrize(
    "raw_status, extra_headers",
    [
        (b"204 No Content", b""),
        (b"304 Not Modified", b""),
        (b"304 Not Modified", b"Content-Length: 1234\r\n"),  # RFC 9110 allows the representation's length
    ],
)
def test_response_bodyless_statuses_keep_headers(
    start_upstream: Any, gateway_before: Any, raw_status: bytes, extra_headers: bytes
) -> None:
    def handle(request: RawRequest, connection: socket.socket) -> None:
        if request.target == b"/next":
            connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nnext")
            return
        connection.sendall(
            b"HTTP/1.1 " + raw_status + b'\r\nETag: "v2"\r\nX-Custom: kept\r\n' + extra_headers + b"\r\n"
        )

    upstream = start_upstream(handle)
    gateway = gateway_before(upstream.url)

    with connect(gateway.port) as connection:
        connection.sendall(b"GET /r HTTP/1.1\r\nHost: g\r\n\r\n")
        status, headers, _ = read_response(connection, has_body=False)
        connection.sendall(b"GET /next HTTP/1.1\r\nHost: g\r\n\r\n")
        next_status, _, next_body = read_response(connection)

    assert status == b"HTTP/1.1 " + raw_status
    assert values(headers, b"etag") == [b'"v2"']
    assert values(headers, b"x-custom") == [b"kept"]
    assert values(headers, b"transfer-encoding") == []
    assert next_status == b"HTTP/1.1 200 OK"
    assert next_body == b"next"


@pytest.mark.parametrize(
    "upstream_framing, client_framing",
    [
        (b"Content-Length: 11\r\n\r\nhello world", b"content-length"),
        (b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n", b"transfer-encoding"),
    ],
)
def test_response_framing_kept(
    start_upstream: Any, gateway_before: Any, upstream_framing: bytes, client_framing: bytes
) -> None:
    upstream = start_upstream(responder(b"HTTP/1.1 200 OK\r\n" + upstream_framing))
    gateway = gateway_before(upstream.url)

    _, headers, body = exchange(gateway.port, b"GET / HTTP/1.1\r\nHost: g\r\n\r\n")

    assert body == b"hello world"
    assert values(headers, client_framing) != []
    other = b"transfer-encoding" if client_framing == b"content-length" else b"content-length"
    assert values(headers, other) == []


def test_response_close_delimited_body_delivered_chunked(start_upstream: Any, gateway_before: Any) -> None:
    def handle(request: RawRequest, connection: socket.socket) -> bool:
        connection.sendall(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil the end")
        return False

    upstream = start_upstream(handle)
    gateway = gateway_before(upstream.url)

    _, headers, body = exchange(gateway.port, b"GET / HTTP/1.1\r\nHost: g\r\n\r\n")

    assert body == b"until the end"
    assert values(headers, b"transfer-encoding") == [b"chunked"]
    assert values(headers, b"connection") == []


def test_response_hop_by_hop_headers_dropped(start_upstream: Any, gateway_before: Any) -> None:
    upstream = start_upstream(
        responder(
            b"HTTP/1.1 200 OK\r\nConnection: X-Hop\r\nX-Hop: 1\r\nKeep-Alive: timeout=5\r\nTrailer: X-Checksum\r\n"
            b"Upgrade: h2c\r\nProxy-Authenticate: Basic\r\nTE: trailers\r\nX-End-To-End: kept\r\n"
            b"Content-Length: 2\r\n\r\nok"
        )
    )
    gateway = gateway_before(upstream.url)

    _, headers, _ = exchange(gateway.port, b"GET / HTTP/1.1\r\nHost: g\r\n\r\n")

    for name in (b"x-hop", b"keep-alive", b"trailer", b"upgrade", b"proxy-authenticate", b"te", b"connection"):
        assert values(headers, name) == [], name
    assert values(headers, b"x-end-to-end") == [b"kept"]


def test_response_server_sent_events_not_buffered(start_upstream: Any, gateway_before: Any) -> None:
    first_delivered = threading.Event()

    def handle(request: RawRequest, connection: socket.socket) -> None:
        connection.sendall(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"d\r\ndata: first\n\n\r\n"
        )
        # The second event is written only after the client has received the first.
        first_delivered.wait(10)
        connection.sendall(b"e\r\ndata: second\n\n\r\n0\r\n\r\n")

    upstream = start_upstream(handle)
    gateway = gateway_before(upstream.url)

    with connect(gateway.port) as connection:
        connection.sendall(b"GET /events HTTP/1.1\r\nHost: g\r\nAccept: text/event-stream\r\n\r\n")
        received = b""
        while b"data: first" not in received:
            chunk = connection.recv(65536)
            assert chunk, "the gateway closed the stream before the first event"
            received += chunk
        first_delivered.set()
        while not received.endswith(b"0\r\n\r\n"):
            received += connection.recv(65536)

    assert b"data: second" in received
    assert b"content-type: text/event-stream" in received


# Date and Server headers.


def test_response_upstream_date_kept_once(start_upstream: Any, gateway_before: Any) -> None:
    gateway = gateway_before(start_upstream().url)

    _, headers, _ = exchange(gateway.port, b"GET / HTTP/1.1\r\nHost: g\r\n\r\n")

    assert values(headers, b"date") == [UPSTREAM_DATE]
    assert values(headers, b"server") == []


def test_response_without_date_gets_one(start_upstream: Any, gateway_before: Any) -> None:
    upstream = start_upstream(responder(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"))
    gateway = gateway_before(upstream.url)

    _, headers, _ = exchange(gateway.port, b"GET / HTTP/1.1\r\nHost: g\r\n\r\n")

    assert len(values(headers, b"date")) == 1
    assert values(headers, b"date")[0].endswith(b" GMT")


def test_gateway_own_response_has_one_date(start_upstream: Any, gateway_before: Any) -> None:
    gateway = gateway_before(start_upstream().url)

    status, headers, _ = exchange(gateway.port, b"GET / HTTP/1.1\r\nHost: g\r\nX-API-KEY: udata_unknown\r\n\r\n")

    assert status.startswith(b"HTTP/1.1 401")
    assert len(values(headers, b"date")) == 1
    assert values(headers, b"server") == []


# Expect: 100-continue.


def test_expect_continue_rejected_without_reading_body(start_upstream: Any, gateway_before: Any) -> None:
    upstream = start_upstream()
    gateway = gateway_before(upstream.url)

    with connect(gateway.port) as connection:
        connection.sendall(
            b"POST /u HTTP/1.1\r\nHost: g\r\nX-API-KEY: udata_unknown\r\nExpect: 100-continue\r\n"
            b"Content-Length: 5\r\n\r\n"
        )
        # The body is never sent: the 401 must arrive without it.
        status, headers, body = read_response(connection)
        rest = read_until_closed(connection)

    assert status.startswith(b"HTTP/1.1 401")
    assert b"Invalid API token" in body
    assert values(headers, b"connection") == [b"close"]
    assert rest == b""
    assert upstream.requests == []


def test_expect_continue_authenticated_forwarded(start_upstream: Any, gateway_before: Any, api_key: str) -> None:
    upstream = start_upstream()
    gateway = gateway_before(upstream.url)

    with connect(gateway.port) as connection:
        connection.sendall(
            b"POST /u HTTP/1.1\r\nHost: g\r\nX-API-KEY: " + api_key.encode() + b"\r\nExpect: 100-continue\r\n"
            b"Content-Length: 5\r\n\r\n"
        )
        interim = connection.recv(len(b"HTTP/1.1 100 Continue\r\n\r\n"))
        connection.sendall(b"hello")
        status, _, body = read_response(connection)

    assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
    assert status == b"HTTP/1.1 200 OK"
    assert body == b"ok"
    seen = upstream.requests[-1]
    assert seen.body == b"hello"
    assert seen.header_values(b"expect") == []


@pytest.mark.parametrize("is_valid_key, status", [(True, 200), (False, 401)])
async def test_expect_continue_with_aiohttp_client(
    start_upstream: Any, gateway_before: Any, api_key: str, is_valid_key: bool, status: int
) -> None:
    upstream = start_upstream()
    gateway = gateway_before(upstream.url)
    key = api_key if is_valid_key else "udata_unknown"

    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{gateway.url}/u", data=b"x" * 100_000, headers={"X-API-KEY": key}, expect100=True) as response,
    ):
        await response.read()

    assert response.status == status
    assert len(upstream.requests) == (1 if is_valid_key else 0)


# Client disconnects.


def _endless_stream(request: RawRequest, connection: socket.socket) -> bool | None:
    if request.target == b"/ok":
        return ok_handler(request, connection)
    connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        connection.sendall(b"c\r\ndata: tick\n\n\r\n")
        time.sleep(0.005)
    return False


def test_client_disconnect_frees_upstream_connection(start_upstream: Any, gateway_before: Any) -> None:
    upstream = start_upstream(_endless_stream)
    gateway = gateway_before(upstream.url)

    for _ in range(50):
        with connect(gateway.port) as connection:
            connection.sendall(b"GET /stream HTTP/1.1\r\nHost: g\r\n\r\n")
            received = b""
            while b"data: tick" not in received:
                received += connection.recv(65536)

    assert upstream.wait_for_open_connections(0) == 0
    status, _, body = exchange(gateway.port, b"GET /ok HTTP/1.1\r\nHost: g\r\n\r\n")
    assert status == b"HTTP/1.1 200 OK"
    assert body == b"ok"
    assert upstream.accepted_connections == 51
    assert upstream.open_connections <= 1


def test_client_disconnect_mid_upload_cuts_upstream(
    start_upstream: Any, gateway_before: Any, caplog: pytest.LogCaptureFixture
) -> None:
    upstream = start_upstream()
    gateway = gateway_before(upstream.url)

    with caplog.at_level(logging.INFO, logger="gateway"):
        with connect(gateway.port) as connection:
            connection.sendall(b"POST /u HTTP/1.1\r\nHost: g\r\nContent-Length: 1000000\r\n\r\n" + b"x" * 1000)
            deadline = time.monotonic() + 5
            while upstream.accepted_connections == 0 and time.monotonic() < deadline:
                time.sleep(0.01)
        open_connections = upstream.wait_for_open_connections(0)
        deadline = time.monotonic() + 5
        while "disconnected before sending the whole body" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.01)

    assert open_connections == 0
    # The upstream never receives the truncated body as a complete request.
    assert upstream.requests == []
    assert "disconnected before sending the whole body" in caplog.text
    assert [record.message for record in caplog.records if record.levelno >= logging.ERROR] == []
    status, _, _ = exchange(gateway.port, b"GET /ok HTTP/1.1\r\nHost: g\r\n\r\n")
    assert status == b"HTTP/1.1 200 OK"


def requests_by_outcome(gateway: Any) -> dict[str, float]:
    registry = gateway.app.metrics.registry
    return {
        outcome: registry.get_sample_value("gateway_requests_total", {"outcome": outcome})
        for outcome in ("forwarded", "upstream_interrupted", "client_disconnected")
    }


def wait_for_outcome(gateway: Any, outcome: str) -> dict[str, float]:
    deadline = time.monotonic() + 5
    while not requests_by_outcome(gateway)[outcome] and time.monotonic() < deadline:
        time.sleep(0.01)
    return requests_by_outcome(gateway)


def test_client_disconnect_mid_response_counted(start_upstream: Any, gateway_before: Any) -> None:
    upstream = start_upstream(_endless_stream)
    gateway = gateway_before(upstream.url)

    with connect(gateway.port) as connection:
        connection.sendall(b"GET /stream HTTP/1.1\r\nHost: g\r\n\r\n")
        received = b""
        while b"data: tick" not in received:
            received += connection.recv(65536)
    outcomes = wait_for_outcome(gateway, "client_disconnected")

    # The upstream kept sending: the client cut the response, not the upstream.
    assert outcomes == {"forwarded": 0, "upstream_interrupted": 0, "client_disconnected": 1}
    assert gateway.app.metrics.registry.get_sample_value("gateway_requests_in_flight") == 0


def test_client_disconnect_mid_upload_counted(start_upstream: Any, gateway_before: Any) -> None:
    upstream = start_upstream()
    gateway = gateway_before(upstream.url)

    with connect(gateway.port) as connection:
        connection.sendall(b"POST /u HTTP/1.1\r\nHost: g\r\nContent-Length: 1000000\r\n\r\n" + b"x" * 1000)
        deadline = time.monotonic() + 5
        while upstream.accepted_connections == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
    outcomes = wait_for_outcome(gateway, "client_disconnected")

    assert outcomes == {"forwarded": 0, "upstream_interrupted": 0, "client_disconnected": 1}
    assert gateway.app.metrics.registry.get_sample_value("gateway_requests_in_flight") == 0


# Timeouts and failures.


def test_read_timeout_is_504(start_upstream: Any, gateway_before: Any) -> None:
    release = threading.Event()
    upstream = start_upstream(lambda request, connection: release.wait(10))
    gateway = gateway_before(upstream.url, upstream__read_timeout_seconds=0.3)

    try:
        started = time.monotonic()
        response = httpx.get(f"{gateway.url}/slow", timeout=10)
        elapsed = time.monotonic() - started
    finally:
        release.set()

    assert response.status_code == 504
    assert response.json() == {"message": "The upstream API did not answer in time"}
    assert elapsed < 5


def test_read_timeout_runs_between_header_bytes(start_upstream: Any, gateway_before: Any) -> None:
    # Each header line comes 0.2 s after the one before: 1 s in all, but
    # never 0.5 s without a byte, so the read timeout never passes.
    def handle(request: RawRequest, connection: socket.socket) -> None:
        for line in (b"HTTP/1.1 200 OK\r\n", b"X-One: 1\r\n", b"X-Two: 2\r\n", b"X-Three: 3\r\n"):
            connection.sendall(line)
            time.sleep(0.2)
        connection.sendall(b"Content-Length: 2\r\n\r\nok")

    gateway = gateway_before(start_upstream(handle).url, upstream__read_timeout_seconds=0.5)

    status, headers, body = exchange(gateway.port, b"GET /trickle HTTP/1.1\r\nHost: g\r\n\r\n")

    assert status == b"HTTP/1.1 200 OK"
    assert values(headers, b"x-three") == [b"3"]
    assert body == b"ok"


def _chunk_pause_chunk(pause: float) -> Callable[[RawRequest, socket.socket], bool]:
    def handle(request: RawRequest, connection: socket.socket) -> bool:
        connection.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n")
        time.sleep(pause)
        connection.sendall(b"6\r\nsecond\r\n0\r\n\r\n")
        return False

    return handle


def test_stream_gets_longer_read_timeout(start_upstream: Any, gateway_before: Any) -> None:
    upstream = start_upstream(_chunk_pause_chunk(1.0))
    gateway = gateway_before(
        upstream.url, upstream__read_timeout_seconds=0.3, upstream__stream_read_timeout_seconds=10.0
    )

    _, _, body = exchange(gateway.port, b"GET /s HTTP/1.1\r\nHost: g\r\n\r\n")

    assert body == b"firstsecond"


def test_stream_read_timeout_cuts_client_stream(start_upstream: Any, gateway_before: Any) -> None:
    upstream = start_upstream(_chunk_pause_chunk(3.0))
    gateway = gateway_before(
        upstream.url, upstream__read_timeout_seconds=0.2, upstream__stream_read_timeout_seconds=0.5
    )

    with connect(gateway.port) as connection:
        connection.sendall(b"GET /s HTTP/1.1\r\nHost: g\r\n\r\n")
        received = read_until_closed(connection)

    assert received.startswith(b"HTTP/1.1 200 OK")
    assert b"5\r\nfirst\r\n" in received
    # The closing zero-size chunk never comes, so the client knows the body is incomplete.
    assert not received.endswith(b"0\r\n\r\n")
    assert b"second" not in received


def test_upstream_cut_mid_body_cuts_client(start_upstream: Any, gateway_before: Any) -> None:
    def handle(request: RawRequest, connection: socket.socket) -> bool:
        connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"x" * 40)
        return False

    gateway = gateway_before(start_upstream(handle).url)

    with connect(gateway.port) as connection:
        connection.sendall(b"GET /cut HTTP/1.1\r\nHost: g\r\n\r\n")
        received = read_until_closed(connection)

    head, _, body = received.partition(b"\r\n\r\n")
    assert b"content-length: 100" in head
    assert body == b"x" * 40


def test_connect_timeout_is_504(gateway_before: Any) -> None:
    # A listener that never accepts and whose accept queue is full: Linux
    # drops further SYNs, so the gateway's connect hangs until its timeout.
    listener = socket.create_server(("127.0.0.1", 0), backlog=0)
    port = listener.getsockname()[1]
    fillers = []
    for _ in range(4):
        filler = socket.socket()
        filler.setblocking(False)
        filler.connect_ex(("127.0.0.1", port))
        fillers.append(filler)
    time.sleep(0.2)
    gateway = gateway_before(
        f"http://127.0.0.1:{port}", upstream__connect_timeout_seconds=0.3, upstream__pool_timeout_seconds=0.3
    )

    try:
        started = time.monotonic()
        response = httpx.get(f"{gateway.url}/c", timeout=10)
        elapsed = time.monotonic() - started
    finally:
        for filler in fillers:
            filler.close()
        listener.close()

    assert response.status_code == 504
    assert elapsed < 5


def test_pool_timeout_is_504(start_upstream: Any, gateway_before: Any) -> None:
    release = threading.Event()

    def handle(request: RawRequest, connection: socket.socket) -> None:
        if request.target == b"/hold":
            release.wait(10)
        ok_handler(request, connection)

    upstream = start_upstream(handle)
    gateway = gateway_before(
        upstream.url,
        upstream__max_connections=1,
        upstream__pool_timeout_seconds=0.3,
        upstream__connect_timeout_seconds=0.3,
    )
    holder = threading.Thread(target=httpx.get, args=(f"{gateway.url}/hold",), kwargs={"timeout": 15})
    holder.start()
    try:
        deadline = time.monotonic() + 5
        while not upstream.requests and time.monotonic() < deadline:
            time.sleep(0.01)
        response = httpx.get(f"{gateway.url}/waits", timeout=10)
    finally:
        release.set()
        holder.join(15)

    assert response.status_code == 504
    assert [request.target for request in upstream.requests] == [b"/hold"]


# WebSocket.


def test_websocket_upgrade_rejected_with_501(start_upstream: Any, gateway_before: Any, api_key: str) -> None:
    upstream = start_upstream()
    gateway = gateway_before(upstream.url)

    with pytest.raises(websockets.exceptions.InvalidStatus) as raised:
        websockets.sync.client.connect(
            f"ws://127.0.0.1:{gateway.port}/socket", additional_headers={"X-API-KEY": api_key}
        )

    assert raised.value.response.status_code == 501
    assert b"WebSocket upgrades are not supported" in raised.value.response.body
    assert upstream.requests == []
