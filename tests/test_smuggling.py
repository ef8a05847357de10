"""Request-smuggling shapes sent over raw sockets to a real gateway that requires a key.

Each shape's first request carries a valid key; any request hidden behind
it carries none. Whatever the server makes of the bytes, no request may
reach the upstream without the gateway's `X-Authenticated-User`, and a
hidden request never reaches it at all.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pytest

from tests.support.gateways import shared_gateway
from tests.support.servers import raw_request
from tests.support.upstream import header_values

KEY = b"<key>"
SMUGGLED = b"GET /smuggled HTTP/1.1\r\nHost: g\r\nConnection: close\r\n\r\n"


def post(*header_lines: bytes, body: bytes = b"") -> bytes:
    lines = [b"POST /first HTTP/1.1", b"Host: g", b"X-API-KEY: " + KEY, *header_lines]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def get(*header_lines: bytes, line_end: bytes = b"\r\n") -> bytes:
    lines = [b"GET /first HTTP/1.1", b"Host: g", b"X-API-KEY: " + KEY, *header_lines, b"Connection: close"]
    return line_end.join(lines) + line_end + line_end


# Shapes that uvicorn's httptools parser (llhttp) rejects with 400 before the
# gateway sees them. Measured with uvicorn 0.55 and httptools 0.9.
REJECTED_SHAPES = {
    "content-length then chunked": post(
        b"Content-Length: 4", b"Transfer-Encoding: chunked", body=b"0\r\n\r\n" + SMUGGLED
    ),
    "chunked then content-length": post(
        b"Transfer-Encoding: chunked", b"Content-Length: 4", body=b"0\r\n\r\n" + SMUGGLED
    ),
    "two different content-lengths": post(b"Content-Length: 0", b"Content-Length: 56", body=SMUGGLED),
    "two equal content-lengths": post(b"Content-Length: 5", b"Content-Length: 5", body=b"hello" + SMUGGLED),
    "content-length list": post(b"Content-Length: 5, 5", body=b"hello"),
    "content-length with plus sign": post(b"Content-Length: +5", body=b"hello"),
    "negative content-length": post(b"Content-Length: -1", body=b"hello"),
    "transfer-encoding identity": post(b"Transfer-Encoding: identity", b"Content-Length: 5", body=b"hello"),
    "chunked not last": post(b"Transfer-Encoding: chunked, gzip", body=b"0\r\n\r\n"),
    "unknown transfer-encoding": post(b"Transfer-Encoding: xchunked", body=b"0\r\n\r\n" + SMUGGLED),
    "space before colon": post(b"Transfer-Encoding : chunked", body=b"0\r\n\r\n" + SMUGGLED),
    "folded transfer-encoding": post(b"Transfer-Encoding:\r\n chunked", body=b"0\r\n\r\n" + SMUGGLED),
    "chunk size overflow": post(b"Transfer-Encoding: chunked", body=b"FFFFFFFFFFFFFFFFF1\r\nhello\r\n0\r\n\r\n"),
    "bare LF in chunk line": post(b"Transfer-Encoding: chunked", body=b"5;x\nhello\r\n0\r\n\r\n" + SMUGGLED),
    "obsolete line folding": get(b"X-Thing: one\r\n two"),
    "obsolete line folding with tab": get(b"X-Thing: one\r\n\ttwo"),
    "folded user header": get(b"X-Thing: one\r\n X-Authenticated-User: admin"),
    "bare LF everywhere": get(b"X-Thing: one", line_end=b"\n"),
    "bare LF in one header": get(b"X-Thing: one\nX-Authenticated-User: admin"),
    "bare CR": get(b"X-Thing: one\rX-Authenticated-User: admin"),
    "NUL in value": get(b"X-Thing: a\x00b"),
    "NUL in name": get(b"X-Th\x00ing: ab"),
    "NUL after key": b"GET /first HTTP/1.1\r\nHost: g\r\nX-API-KEY: <key>\x00\r\nConnection: close\r\n\r\n",
    "control characters in value": get(b"X-Thing: a\x01\x7fb"),
    "control character in name": get(b"X-Th\x01ing: ab"),
    "DEL in name": get(b"X-Th\x7fing: ab"),
    "space in name": get(b"X Thing: ab"),
    "escape in value": get(b"X-Thing: \x1b[31mred"),
}

# Shapes that HTTP allows: forwarded once, with the bytes the gateway owns re-framed.
ACCEPTED_SHAPES = {
    "tab in value": get(b"X-Thing: a\tb"),
    "obs-text in value": get(b"X-Thing: caf\xe9"),
    "HTTP/1.0 with chunked": b"POST /first HTTP/1.0\r\nHost: g\r\nX-API-KEY: <key>\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    "pipelined second request without key": get(b"X-Thing: 1")[: -len(b"Connection: close\r\n\r\n")]
    + b"\r\n"
    + SMUGGLED,
}


@pytest.fixture(scope="module", params=["httptools", "h11"])
def guarded(request: Any, mongodb_uri: str) -> Iterator[Any]:
    """One gateway per server implementation, shared by every shape; requires a key."""
    with shared_gateway(mongodb_uri, http=request.param, auth_require_key="true") as gateway:
        yield gateway.server, gateway.upstream, gateway.plaintext, request.param


@pytest.fixture
def fresh_upstream(guarded: Any) -> Any:
    guarded[1].requests.clear()
    return guarded


def statuses(answer: bytes) -> list[bytes]:
    # Response bodies do not end with CRLF, so status lines are found anywhere.
    return re.findall(rb"HTTP/1\.[01] (\d{3}) ", answer)


def assert_only_authenticated_requests_forwarded(upstream: Any) -> None:
    for seen in upstream.requests:
        assert seen["raw_path"] != "/smuggled"
        assert len(header_values(seen, "X-Authenticated-User")) == 1
        assert header_values(seen, "X-API-KEY") == []


@pytest.mark.parametrize("shape", REJECTED_SHAPES)
def test_smuggling_shape_rejected(fresh_upstream: Any, shape: str) -> None:
    gateway, upstream, plaintext, server = fresh_upstream
    request = REJECTED_SHAPES[shape].replace(KEY, plaintext.encode())

    answer = raw_request(gateway.port, request, timeout=1)

    assert b"500" not in statuses(answer)
    assert_only_authenticated_requests_forwarded(upstream)
    if server == "httptools":
        assert statuses(answer) == [b"400"]
        assert upstream.requests == []


@pytest.mark.parametrize("shape", ACCEPTED_SHAPES)
def test_lawful_shape_forwarded_once(fresh_upstream: Any, shape: str) -> None:
    gateway, upstream, plaintext, _ = fresh_upstream
    request = ACCEPTED_SHAPES[shape].replace(KEY, plaintext.encode())

    answer = raw_request(gateway.port, request, timeout=1)

    assert statuses(answer)[0] == b"200"
    assert [seen["raw_path"] for seen in upstream.requests] == ["/first"]
    assert_only_authenticated_requests_forwarded(upstream)
    if shape == "pipelined second request without key":
        assert statuses(answer) == [b"200", b"401"]


def test_tab_in_value_forwarded_unchanged(fresh_upstream: Any) -> None:
    gateway, upstream, plaintext, _ = fresh_upstream

    raw_request(gateway.port, get(b"X-Thing: a\tb").replace(KEY, plaintext.encode()), timeout=1)

    assert header_values(upstream.requests[-1], "X-Thing") == ["a\tb"]
