"""End-to-end: a real gateway between real sockets, a real store and a real upstream."""

from __future__ import annotations

import asyncio
import datetime
import logging
import os
import time
from typing import Any

import httpx
import pytest

from tests.support.servers import raw_request
from tests.support.upstream import header_values


@pytest.fixture
def proxy(make_config: Any, start_gateway: Any, echo_upstream: Any) -> Any:
    upstream_app, upstream_server = echo_upstream
    gateway = start_gateway(make_config(upstream_server.url))
    return gateway, upstream_app


def test_udata_token_authenticates_and_forwards_owner(proxy: Any, seed_user: Any, seed_token: Any) -> None:
    gateway, upstream = proxy
    user = seed_user()
    plaintext, _ = seed_token(user)

    response = httpx.get(f"{gateway.url}/api/1/datasets/", headers={"X-API-KEY": plaintext})

    assert response.status_code == 200
    seen = upstream.requests[-1]
    assert header_values(seen, "X-Authenticated-User") == [str(user)]
    assert header_values(seen, "X-API-KEY") == []
    assert plaintext not in response.text


def test_anonymous_request_forwarded_without_identity(proxy: Any) -> None:
    gateway, upstream = proxy

    response = httpx.get(f"{gateway.url}/public", headers={"X-Authenticated-User": "spoofed"})

    assert response.status_code == 200
    assert header_values(upstream.requests[-1], "X-Authenticated-User") == []


def test_anonymous_request_rejected_when_key_required(make_config: Any, start_gateway: Any, echo_upstream: Any) -> None:
    upstream, server = echo_upstream
    gateway = start_gateway(make_config(server.url, auth__require_key=True))

    response = httpx.get(f"{gateway.url}/public")

    assert response.status_code == 401
    assert response.json() == {"message": "API token required"}
    assert upstream.requests == []


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"revoked_at": datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)}, "Revoked API token"),
        ({"expires_at": datetime.datetime(2020, 1, 1, tzinfo=datetime.UTC)}, "Expired API token"),
    ],
)
def test_rejected_token_gets_reference_message(
    proxy: Any, seed_user: Any, seed_token: Any, fields: Any, message: str
) -> None:
    gateway, upstream = proxy
    plaintext, _ = seed_token(seed_user(), **fields)

    response = httpx.get(f"{gateway.url}/private", headers={"X-API-KEY": plaintext})

    assert response.status_code == 401
    assert response.json() == {"message": message}
    assert response.headers["content-type"] == "application/json"
    assert upstream.requests == []


def test_unknown_key_is_invalid(proxy: Any) -> None:
    gateway, upstream = proxy

    response = httpx.get(f"{gateway.url}/private", headers={"X-API-KEY": "udata_unknown"})

    assert response.status_code == 401
    assert response.json() == {"message": "Invalid API token"}
    assert response.headers["x-auth-error"] == "invalid"
    assert upstream.requests == []


@pytest.mark.parametrize(
    "owner",
    [
        "inactive",  # active is false
        "deleted",  # deleted is set
        "missing",  # no user document at all
    ],
)
def test_owner_not_active_is_rejected(proxy: Any, seed_user: Any, seed_token: Any, owner: str) -> None:
    gateway, upstream = proxy
    from bson import ObjectId

    user = {
        "inactive": lambda: seed_user(active=False),
        "deleted": lambda: seed_user(deleted=datetime.datetime(2025, 1, 1, tzinfo=datetime.UTC)),
        "missing": ObjectId,
    }[owner]()
    plaintext, _ = seed_token(user)

    response = httpx.get(f"{gateway.url}/private", headers={"X-API-KEY": plaintext})

    assert response.status_code == 401
    assert response.json() == {"message": "Inactive user"}
    assert upstream.requests == []


def test_user_check_off_accepts_string_owner(
    make_config: Any, start_gateway: Any, echo_upstream: Any, seed_token: Any
) -> None:
    upstream, server = echo_upstream
    gateway = start_gateway(make_config(server.url, store__users_collection=""))
    plaintext, _ = seed_token("service-account-7")

    response = httpx.get(f"{gateway.url}/x", headers={"X-API-KEY": plaintext})

    assert response.status_code == 200
    assert header_values(upstream.requests[-1], "X-Authenticated-User") == ["service-account-7"]


@pytest.mark.parametrize(
    "key_lines",
    [
        [b"X-API-KEY: KEY", b"X-API-KEY: KEY"],  # the same key twice
        [b"X-API-KEY: KEY", b"x-api-key: other"],  # two different keys
        [b"X-API-KEY: KEY, other"],  # two values joined by a comma
        [b"X-API-KEY: KEY other"],  # two values joined by a space
        [b"X-API-KEY: KEY\x01"],  # a control character
    ],
)
def test_more_than_one_key_is_rejected(proxy: Any, seed_user: Any, seed_token: Any, key_lines: list[bytes]) -> None:
    gateway, upstream = proxy
    plaintext, _ = seed_token(seed_user())
    lines = [line.replace(b"<key>", plaintext.encode()) for line in key_lines]
    request = b"\r\n".join([b"GET /x HTTP/1.1", b"Host: gateway", *lines, b"Connection: close", b"", b""])

    answer = raw_request(gateway.port, request)

    assert answer.startswith(b"HTTP/1.1 401") or answer.startswith(b"HTTP/1.1 400")
    assert upstream.requests == []


@pytest.mark.parametrize(
    "spelling",
    [
        "X-Authenticated-User",
        "x-authenticated-user",
        "X_Authenticated_User",
        "X.Authenticated.User",
        "X-Authenticated_User",
        "XAuthenticatedUser",
    ],
)
def test_spoofed_user_header_spellings_stripped(proxy: Any, seed_user: Any, seed_token: Any, spelling: str) -> None:
    gateway, upstream = proxy
    user = seed_user()
    plaintext, _ = seed_token(user)
    request = (
        f"GET /x HTTP/1.1\r\nHost: gateway\r\nX-API-KEY: {plaintext}\r\n{spelling}: admin\r\nConnection: close\r\n\r\n"
    ).encode()

    answer = raw_request(gateway.port, request)

    assert answer.startswith(b"HTTP/1.1 200")
    seen = upstream.requests[-1]
    folded = [
        value
        for name, value in seen["headers"]
        if name.lower().replace("_", "-").replace(".", "-") == "x-authenticated-user"
    ]
    assert folded == [str(user)]
    assert all(value != "admin" for _, value in seen["headers"])


def test_key_spellings_never_forwarded(proxy: Any, seed_user: Any, seed_token: Any) -> None:
    gateway, upstream = proxy
    plaintext, _ = seed_token(seed_user())

    httpx.get(f"{gateway.url}/x", headers={"X-API-KEY": plaintext, "X_API_KEY": plaintext})

    forwarded = repr(upstream.requests[-1])
    assert plaintext not in forwarded


def test_key_forwarded_when_configured(
    make_config: Any, start_gateway: Any, echo_upstream: Any, seed_user: Any, seed_token: Any
) -> None:
    upstream, server = echo_upstream
    gateway = start_gateway(make_config(server.url, upstream__forward_api_key=True))
    plaintext, _ = seed_token(seed_user())

    httpx.get(f"{gateway.url}/x", headers={"X-API-KEY": plaintext})

    assert header_values(upstream.requests[-1], "X-API-KEY") == [plaintext]


def test_forwarded_headers_set_and_client_copies_replaced(proxy: Any) -> None:
    gateway, upstream = proxy

    httpx.get(
        f"{gateway.url}/x",
        headers={"X-Forwarded-For": "203.0.113.9", "X-Forwarded-Host": "evil.example", "X-Forwarded-Proto": "https"},
    )

    seen = upstream.requests[-1]
    assert header_values(seen, "X-Forwarded-For") == ["127.0.0.1"]
    assert header_values(seen, "X-Forwarded-Proto") == ["http"]
    assert header_values(seen, "X-Forwarded-Host") == [f"127.0.0.1:{gateway.port}"]


def test_request_target_forwarded_byte_for_byte(proxy: Any) -> None:
    gateway, upstream = proxy
    target = b"/a%2Fb/c%20d+e/%FF?q=1&q=&empty&x=%2B+y"

    answer = raw_request(gateway.port, b"GET " + target + b" HTTP/1.1\r\nHost: g\r\nConnection: close\r\n\r\n")

    assert answer.startswith(b"HTTP/1.1 200")
    seen = upstream.requests[-1]
    assert seen["raw_path"] + "?" + seen["query_string"] == target.decode()


@pytest.mark.parametrize("method", [b"OPTIONS", b"GET"])
def test_asterisk_target_rejected_not_forwarded(proxy: Any, method: bytes) -> None:
    gateway, upstream = proxy

    answer = raw_request(gateway.port, method + b" * HTTP/1.1\r\nHost: g\r\nConnection: close\r\n\r\n")

    assert answer.startswith(b"HTTP/1.1 400")
    assert b"request target" in answer
    assert upstream.requests == []


def test_response_headers_and_body_unchanged(proxy: Any) -> None:
    gateway, _ = proxy

    response = httpx.post(f"{gateway.url}/upload", content=b"x" * 100_000)

    assert response.status_code == 200
    assert response.headers.get_list("set-cookie") == ["first=1; Path=/", "second=2; Path=/"]
    assert response.json()["body_size"] == 100_000


def test_cache_hit_makes_no_store_query(proxy: Any, seed_user: Any, seed_token: Any) -> None:
    gateway, _ = proxy
    plaintext, _ = seed_token(seed_user())
    with httpx.Client() as client:
        client.get(f"{gateway.url}/x", headers={"X-API-KEY": plaintext})
        lookups = gateway.counter.token_lookups()

        for _ in range(20):
            assert client.get(f"{gateway.url}/x", headers={"X-API-KEY": plaintext}).status_code == 200

    assert lookups == 1
    assert gateway.counter.token_lookups() == 1


def test_concurrent_misses_share_one_query(proxy: Any, seed_user: Any, seed_token: Any) -> None:
    gateway, _ = proxy
    plaintext, _ = seed_token(seed_user())

    async def burst() -> list[int]:
        limits = httpx.Limits(max_connections=100)
        async with httpx.AsyncClient(limits=limits, timeout=30) as client:
            requests = [client.get(f"{gateway.url}/x", headers={"X-API-KEY": plaintext}) for _ in range(100)]
            return [response.status_code for response in await asyncio.gather(*requests)]

    statuses = asyncio.run(burst())

    assert statuses == [200] * 100
    assert gateway.counter.token_lookups() == 1


def test_expiry_holds_on_cache_hit(proxy: Any, seed_user: Any, seed_token: Any) -> None:
    gateway, _ = proxy
    expires_at = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=1.5)
    plaintext, _ = seed_token(seed_user(), expires_at=expires_at)

    first = httpx.get(f"{gateway.url}/x", headers={"X-API-KEY": plaintext})
    time.sleep(max(0.0, (expires_at - datetime.datetime.now(datetime.UTC)).total_seconds()) + 0.1)
    second = httpx.get(f"{gateway.url}/x", headers={"X-API-KEY": plaintext})

    assert first.status_code == 200
    assert second.status_code == 401
    assert second.json() == {"message": "Expired API token"}


@pytest.mark.parametrize("zone", ["Pacific/Kiritimati", "America/Anchorage"])
def test_expiry_independent_of_time_zone(proxy: Any, seed_user: Any, seed_token: Any, zone: str) -> None:
    gateway, _ = proxy
    in_an_hour = datetime.datetime.now(datetime.UTC) + datetime.timedelta(hours=1)
    hour_ago = datetime.datetime.now(datetime.UTC) - datetime.timedelta(hours=1)
    valid, _ = seed_token(seed_user(), expires_at=in_an_hour)
    expired, _ = seed_token(seed_user(), expires_at=hour_ago)
    previous = os.environ.get("TZ")
    os.environ["TZ"] = zone
    time.tzset()
    try:
        assert httpx.get(f"{gateway.url}/x", headers={"X-API-KEY": valid}).status_code == 200
        assert httpx.get(f"{gateway.url}/x", headers={"X-API-KEY": expired}).status_code == 401
    finally:
        if previous is None:
            os.environ.pop("TZ", None)
        else:
            os.environ["TZ"] = previous
        time.tzset()


def test_unreachable_upstream_is_502(make_config: Any, start_gateway: Any) -> None:
    gateway = start_gateway(make_config("http://127.0.0.1:1"))

    response = httpx.get(f"{gateway.url}/x")

    assert response.status_code == 502
    assert response.json() == {"message": "The upstream API is unreachable"}


def test_store_down_is_503_quickly(make_config: Any, start_gateway: Any, echo_upstream: Any) -> None:
    upstream, server = echo_upstream
    config = make_config(server.url, environ={"GATEWAY_STORE_URI": "mongodb://127.0.0.1:1/?directConnection=true"})
    gateway = start_gateway(config)

    started = time.monotonic()
    response = httpx.get(f"{gateway.url}/x", headers={"X-API-KEY": "udata_whatever"}, timeout=30)
    elapsed = time.monotonic() - started

    assert response.status_code == 503
    assert elapsed < 4
    assert upstream.requests == []


def test_key_never_logged(proxy: Any, seed_user: Any, seed_token: Any, caplog: pytest.LogCaptureFixture) -> None:
    gateway, _ = proxy
    plaintext, document = seed_token(seed_user())
    caplog.set_level(logging.DEBUG)

    httpx.get(f"{gateway.url}/x", headers={"X-API-KEY": plaintext})
    httpx.get(f"{gateway.url}/x", headers={"X-API-KEY": plaintext + "wrong"})

    assert plaintext not in caplog.text
    assert document["token_hash"] not in caplog.text


def test_oversized_headers_rejected_431(proxy: Any) -> None:
    gateway, upstream = proxy

    response = httpx.get(f"{gateway.url}/x", headers={"X-Big": "a" * 40_000})

    assert response.status_code == 431
    assert response.json() == {"message": "Request headers too large"}
    assert upstream.requests == []


def test_headers_under_limit_forwarded(make_config: Any, start_gateway: Any, echo_upstream: Any) -> None:
    upstream, server = echo_upstream
    gateway = start_gateway(make_config(server.url, server__max_header_bytes=1_000))

    accepted = httpx.get(f"{gateway.url}/x", headers={"X-Small": "a" * 500})
    rejected = httpx.get(f"{gateway.url}/x", headers={"X-Small": "a" * 1_000})

    assert accepted.status_code == 200
    assert header_values(upstream.requests[-1], "X-Small") == ["a" * 500]
    assert rejected.status_code == 431
    assert len(upstream.requests) == 1
