"""Conformance against httpbin: what it reports through the gateway equals what it reports directly.

httpbin (Flask, served by Werkzeug) runs as a subprocess on loopback. Each
case sends the same request, key included, to httpbin directly and through
the gateway. Through the gateway httpbin must see the same request minus the
key, plus `X-Authenticated-User` and the `X-Forwarded-*` headers, and the
client must get the same response.
"""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from gateway.embedded import free_port

# Headers that legitimately differ: the gateway adds the forwarding ones and
# `Connection` is hop-by-hop, so each side's client and server set their own.
HOP_HEADERS = {"connection", "keep-alive"}
FORWARDING_HEADERS = {"x-forwarded-for", "x-forwarded-proto", "x-forwarded-host"}


# A fixed boundary, so that both calls send the same bytes.
MULTIPART_OPTIONS = {
    "content": (
        b'--boundary\r\nContent-Disposition: form-data; name="upload"; filename="a.bin"\r\n'
        b"Content-Type: application/octet-stream\r\n\r\n\x00\x01binary\xff\r\n--boundary--\r\n"
    ),
    "headers": {"Content-Type": "multipart/form-data; boundary=boundary"},
}


@pytest.fixture(scope="module")
def httpbin_url() -> Iterator[str]:
    port = free_port("127.0.0.1")
    process = subprocess.Popen(
        [sys.executable, "-m", "httpbin.core", "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            httpx.get(f"{url}/get", timeout=1)
            break
        except httpx.TransportError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                raise RuntimeError(f"httpbin did not start on port {port}.") from None
            time.sleep(0.1)
    yield url
    process.terminate()
    process.wait(10)


@pytest.fixture
def through(make_config: Any, start_gateway: Any, httpbin_url: str, seed_user: Any, seed_token: Any) -> Any:
    """A gateway in front of httpbin and a valid key for it."""
    user = seed_user()
    plaintext, _ = seed_token(user)
    gateway = start_gateway(make_config(httpbin_url))
    return gateway, plaintext, str(user)


def call(base_url: str, method: str, path: str, key: str, **options: Any) -> httpx.Response:
    headers = {"X-API-KEY": key, "User-Agent": "conformance/1", **options.pop("headers", {})}
    return httpx.request(method, base_url + path, headers=headers, follow_redirects=False, timeout=10, **options)


def expected_headers(direct: dict[str, str], user: str) -> dict[str, str]:
    """Return the headers httpbin saw directly, as they should look through the gateway."""
    headers = {name.lower(): value for name, value in direct.items() if name.lower() not in HOP_HEADERS}
    headers.pop("x-api-key")
    headers["x-authenticated-user"] = user
    return headers


def seen_headers(through_gateway: dict[str, str]) -> dict[str, str]:
    return {
        name.lower(): value
        for name, value in through_gateway.items()
        if name.lower() not in HOP_HEADERS | FORWARDING_HEADERS
    }


def assert_same_report(direct: dict[str, Any], proxied: dict[str, Any], user: str) -> None:
    if "headers" in direct:
        assert seen_headers(proxied.pop("headers")) == expected_headers(direct.pop("headers"), user)
    assert proxied == direct


@pytest.mark.parametrize(
    "method, path, options",
    [
        ("GET", "/get?a=1&a=2&empty=&plus=%2B&space=%20", {}),  # repeated, empty and encoded parameters
        ("POST", "/post", {"json": {"name": "x", "list": [1, 2]}}),  # JSON body
        ("POST", "/post?q=1", {"data": {"field": "value", "other": "é"}}),  # urlencoded form
        ("POST", "/post", MULTIPART_OPTIONS),  # multipart file
        ("PUT", "/put", {"content": bytes(range(256))}),  # bytes that are not UTF-8
        ("PATCH", "/patch", {"content": b"patch body", "headers": {"Content-Type": "text/plain"}}),
        ("DELETE", "/delete", {}),
        ("GET", "/anything/a%2Fb/c%20d?x=1", {}),  # encoded slash and space in the path
        ("GET", "/cookies", {"headers": {"Cookie": "session=abc; theme=dark"}}),
        ("GET", "/headers", {"headers": {"X-Custom": "one", "Accept": "application/json"}}),
    ],
)
def test_httpbin_request_report_matches(through: Any, httpbin_url: str, method: str, path: str, options: Any) -> None:
    gateway, key, user = through

    direct = call(httpbin_url, method, path, key, **options)
    proxied = call(gateway.url, method, path, key, **options)

    assert proxied.status_code == direct.status_code == 200
    assert_same_report(direct.json(), proxied.json(), user)


def test_httpbin_forwarding_headers_set(through: Any) -> None:
    gateway, key, user = through

    # httpbin hides X-Forwarded-* headers unless `show_env` is set.
    headers = call(gateway.url, "GET", "/headers?show_env=1", key).json()["headers"]

    assert headers["X-Authenticated-User"] == user
    assert "X-Api-Key" not in headers
    assert headers["X-Forwarded-For"] == "127.0.0.1"
    assert headers["X-Forwarded-Proto"] == "http"
    assert headers["X-Forwarded-Host"] == f"127.0.0.1:{gateway.port}"


def fetch_raw(url: str, key: str) -> tuple[httpx.Headers, bytes]:
    """GET `url` and return the headers and the body as sent, without decoding it."""
    with httpx.Client(timeout=10) as client:
        request = client.build_request("GET", url, headers={"X-API-KEY": key, "Accept-Encoding": "gzip"})
        response = client.send(request, stream=True)
        raw = b"".join(response.iter_raw())
        response.close()
    return response.headers, raw


def test_httpbin_gzip_passes_encoded(through: Any, httpbin_url: str) -> None:
    gateway, key, user = through

    direct_headers, direct_raw = fetch_raw(f"{httpbin_url}/gzip", key)
    headers, raw = fetch_raw(f"{gateway.url}/gzip", key)

    assert headers["content-encoding"] == direct_headers["content-encoding"] == "gzip"
    assert int(headers["content-length"]) == len(raw)
    report = json.loads(gzip.decompress(raw))
    direct_report = json.loads(gzip.decompress(direct_raw))
    assert report["gzipped"] is True
    assert_same_report(direct_report, report, user)


def test_httpbin_stream_lines_match(through: Any, httpbin_url: str) -> None:
    gateway, key, user = through

    direct = [json.loads(line) for line in call(httpbin_url, "GET", "/stream/5", key).text.splitlines()]
    proxied_response = call(gateway.url, "GET", "/stream/5", key)
    proxied = [json.loads(line) for line in proxied_response.text.splitlines()]

    assert len(proxied) == len(direct) == 5
    assert proxied_response.headers.get("transfer-encoding") == "chunked"
    for direct_line, proxied_line in zip(direct, proxied, strict=True):
        assert_same_report(direct_line, proxied_line, user)


@pytest.mark.parametrize(
    "path",
    [
        "/stream-bytes/200000?seed=7&chunk_size=1000",  # chunked binary stream
        "/bytes/50000?seed=3",  # binary body with Content-Length
        "/range/1000",  # plain text with Content-Length
    ],
)
def test_httpbin_binary_body_identical(through: Any, httpbin_url: str, path: str) -> None:
    gateway, key, _ = through

    direct = call(httpbin_url, "GET", path, key)
    proxied = call(gateway.url, "GET", path, key)

    assert proxied.status_code == direct.status_code == 200
    assert proxied.content == direct.content
    assert proxied.headers.get("content-length") == direct.headers.get("content-length")


@pytest.mark.parametrize(
    "path",
    [
        "/redirect/2",  # relative redirect chain
        "/absolute-redirect/1",
        "/redirect-to?url=http%3A%2F%2F127.0.0.1%3A1%2Fnowhere&status_code=307",
    ],
)
def test_httpbin_redirect_returned_not_followed(through: Any, httpbin_url: str, path: str) -> None:
    gateway, key, _ = through

    direct = call(httpbin_url, "GET", path, key)
    proxied = call(gateway.url, "GET", path, key)

    assert proxied.status_code == direct.status_code
    assert proxied.status_code in (302, 307)
    assert proxied.headers["location"] == direct.headers["location"]


@pytest.mark.parametrize("status", [200, 201, 204, 304, 400, 404, 418, 500, 503])
def test_httpbin_status_codes_pass(through: Any, httpbin_url: str, status: int) -> None:
    gateway, key, _ = through

    direct = call(httpbin_url, "GET", f"/status/{status}", key)
    proxied = call(gateway.url, "GET", f"/status/{status}", key)

    assert proxied.status_code == direct.status_code == status
    assert proxied.content == direct.content


def test_httpbin_repeated_response_headers(through: Any, httpbin_url: str) -> None:
    gateway, key, _ = through
    path = "/response-headers?Set-Cookie=a%3D1&Set-Cookie=b%3D2&Link=%3C%2Fx%3E&Link=%3C%2Fy%3E"

    direct = call(httpbin_url, "GET", path, key)
    proxied = call(gateway.url, "GET", path, key)

    assert proxied.headers.get_list("set-cookie") == direct.headers.get_list("set-cookie") == ["a=1", "b=2"]
    assert proxied.headers.get_list("link") == direct.headers.get_list("link")
    assert len(proxied.headers.get_list("link")) == 2


def test_httpbin_conditional_request_304(through: Any, httpbin_url: str) -> None:
    gateway, key, _ = through
    headers = {"If-Modified-Since": "Thu, 01 Jan 2026 00:00:00 GMT"}

    direct = call(httpbin_url, "GET", "/cache", key, headers=headers)
    proxied = call(gateway.url, "GET", "/cache", key, headers=headers)

    assert proxied.status_code == direct.status_code == 304
    assert proxied.content == b""


def test_httpbin_head_matches(through: Any, httpbin_url: str) -> None:
    gateway, key, _ = through

    direct = call(httpbin_url, "HEAD", "/bytes/1234?seed=1", key)
    proxied = call(gateway.url, "HEAD", "/bytes/1234?seed=1", key)

    assert proxied.status_code == direct.status_code == 200
    assert proxied.headers["content-length"] == direct.headers["content-length"] == "1234"
    assert proxied.content == b""


def test_httpbin_options_matches(through: Any, httpbin_url: str) -> None:
    gateway, key, _ = through

    direct = call(httpbin_url, "OPTIONS", "/anything", key)
    proxied = call(gateway.url, "OPTIONS", "/anything", key)

    assert proxied.status_code == direct.status_code == 200
    assert sorted(proxied.headers["allow"].split(", ")) == sorted(direct.headers["allow"].split(", "))
    assert proxied.content == direct.content


def test_httpbin_set_cookie_not_kept_by_gateway(through: Any) -> None:
    gateway, key, _ = through

    with httpx.Client(timeout=10) as first, httpx.Client(timeout=10) as second:
        first.get(f"{gateway.url}/cookies/set?session=mine", headers={"X-API-KEY": key}, follow_redirects=False)
        cookies = second.get(f"{gateway.url}/cookies", headers={"X-API-KEY": key}).json()["cookies"]

    # A cookie set for one client must never reach another through the gateway's pool.
    assert cookies == {}
