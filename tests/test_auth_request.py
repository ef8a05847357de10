"""The auth_request endpoint against a real gateway on loopback, without nginx."""

from __future__ import annotations

import datetime
import logging
import re
import socket
import time
from typing import Any

import httpx
import pytest

PAST = datetime.datetime(2020, 1, 1, tzinfo=datetime.UTC)
STORE_DOWN = {"GATEWAY_STORE_URI": "mongodb://127.0.0.1:1/?directConnection=true"}


@pytest.fixture
def gateway(make_config: Any, start_gateway: Any) -> Any:
    return start_gateway(make_config(""))


def read_response_head(port: int, request: bytes, timeout: float = 5) -> bytes:
    """Send `request` and return the bytes received up to the end of the first non-1xx response head."""
    received = b""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as connection:
        connection.sendall(request)
        while True:
            chunk = connection.recv(65536)
            if not chunk:
                return received
            received += chunk
            heads = received.split(b"\r\n\r\n")
            if any(head.startswith(b"HTTP/1.1 2") or head.startswith(b"HTTP/1.1 4") for head in heads[:-1]):
                return received


@pytest.mark.parametrize("method", ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"])
def test_auth_request_any_method_returns_owner(gateway: Any, seed_user: Any, seed_token: Any, method: str) -> None:
    user = seed_user()
    plaintext, _ = seed_token(user)

    response = httpx.request(method, f"{gateway.url}/_auth", headers={"X-API-KEY": plaintext})

    assert response.status_code == 204
    assert response.headers["x-authenticated-user"] == str(user)
    assert response.content == b""


def test_auth_request_anonymous_allowed_without_user(gateway: Any) -> None:
    response = httpx.get(f"{gateway.url}/_auth", headers={"X-Authenticated-User": "spoofed"})

    assert response.status_code == 204
    assert "x-authenticated-user" not in response.headers


def test_auth_request_anonymous_rejected_when_key_required(make_config: Any, start_gateway: Any) -> None:
    gateway = start_gateway(make_config("", auth__require_key=True))

    response = httpx.get(f"{gateway.url}/_auth")

    assert response.status_code == 401
    assert response.json() == {"message": "API token required"}
    assert response.headers["x-auth-error"] == "missing"


@pytest.mark.parametrize(
    "token_fields, owner_active, reason",
    [
        (None, True, "invalid"),  # a key that is in no document
        ({"revoked_at": PAST}, True, "revoked"),
        ({"expires_at": PAST}, True, "expired"),
        ({}, False, "inactive_user"),
    ],
)
def test_auth_request_rejection_has_reason(
    gateway: Any,
    seed_user: Any,
    seed_token: Any,
    token_fields: dict[str, Any] | None,
    owner_active: bool,
    reason: str,
) -> None:
    user = seed_user(active=owner_active)
    plaintext = "udata_" + "u" * 64 if token_fields is None else seed_token(user, **token_fields)[0]

    response = httpx.get(f"{gateway.url}/_auth", headers={"X-API-KEY": plaintext})

    assert response.status_code == 401
    assert response.headers["x-auth-error"] == reason
    assert response.headers["www-authenticate"] == f'ApiKey header="X-API-KEY", error="{reason}"'
    assert response.headers["content-type"] == "application/json"
    assert "x-authenticated-user" not in response.headers


@pytest.mark.parametrize(
    "body_headers",
    [
        b"Content-Length: 10000000\r\n",  # a length whose body never comes
        b"Transfer-Encoding: chunked\r\n",  # a chunked body that never comes
        b"Content-Length: 10000000\r\nExpect: 100-continue\r\n",  # a client waiting for permission to send
    ],
)
def test_auth_request_never_reads_body(gateway: Any, seed_user: Any, seed_token: Any, body_headers: bytes) -> None:
    user = seed_user()
    plaintext, _ = seed_token(user)
    request = b"POST /_auth HTTP/1.1\r\nHost: gateway\r\nX-API-KEY: " + plaintext.encode() + b"\r\n" + body_headers
    request += b"\r\n"

    started = time.monotonic()
    head = read_response_head(gateway.port, request)
    elapsed = time.monotonic() - started

    assert head.startswith(b"HTTP/1.1 204")
    assert b"x-authenticated-user: " + str(user).encode() in head.lower()
    assert b"100 Continue" not in head
    assert elapsed < 4


def test_auth_request_store_down_is_401_unavailable(make_config: Any, start_gateway: Any) -> None:
    gateway = start_gateway(make_config("", environ=STORE_DOWN))

    started = time.monotonic()
    response = httpx.get(f"{gateway.url}/_auth", headers={"X-API-KEY": "udata_" + "k" * 64}, timeout=30)
    elapsed = time.monotonic() - started

    assert response.status_code == 401
    assert response.json() == {"message": "Authentication is temporarily unavailable, retry later"}
    assert response.headers["x-auth-error"] == "unavailable"
    assert response.headers["www-authenticate"] == 'ApiKey header="X-API-KEY", error="unavailable"'
    assert response.headers["retry-after"] == "1"
    assert elapsed < 4


def test_auth_request_store_down_anonymous_allowed(make_config: Any, start_gateway: Any) -> None:
    gateway = start_gateway(make_config("", environ=STORE_DOWN))

    response = httpx.get(f"{gateway.url}/_auth")

    assert response.status_code == 204


@pytest.mark.parametrize(
    "scopes, status",
    [
        (["admin"], 204),  # the required scope
        (["read", "admin"], 204),  # the required scope among others
        (["read"], 403),  # another scope only
        ([], 403),  # no scope
    ],
)
def test_auth_request_required_scopes(
    make_config: Any, start_gateway: Any, seed_user: Any, seed_token: Any, scopes: list[str], status: int
) -> None:
    gateway = start_gateway(make_config("", auth__required_scopes=["admin"]))
    plaintext, _ = seed_token(seed_user(), scopes=scopes)

    response = httpx.get(f"{gateway.url}/_auth", headers={"X-API-KEY": plaintext})

    assert response.status_code == status
    if status == 403:
        assert response.json() == {"message": "API token lacks a required scope"}
        assert "x-authenticated-user" not in response.headers


def test_proxy_mode_required_scopes_forbid(
    make_config: Any, start_gateway: Any, echo_upstream: Any, seed_user: Any, seed_token: Any
) -> None:
    upstream, server = echo_upstream
    gateway = start_gateway(make_config(server.url, auth__required_scopes=["admin"]))
    plaintext, _ = seed_token(seed_user(), scopes=["read"])

    refused = httpx.get(f"{gateway.url}/private", headers={"X-API-KEY": plaintext})
    anonymous = httpx.get(f"{gateway.url}/public")

    assert refused.status_code == 403
    assert refused.json() == {"message": "API token lacks a required scope"}
    assert anonymous.status_code == 200
    assert [seen["raw_path"] for seen in upstream.requests] == ["/public"]


def test_auth_request_uses_cache(gateway: Any, seed_user: Any, seed_token: Any) -> None:
    plaintext, _ = seed_token(seed_user())

    with httpx.Client() as client:
        statuses = [client.get(f"{gateway.url}/_auth", headers={"X-API-KEY": plaintext}).status_code for _ in range(20)]

    assert statuses == [204] * 20
    assert gateway.counter.token_lookups() == 1


def test_auth_request_records_usage(
    make_config: Any, start_gateway: Any, mongo: Any, seed_user: Any, seed_token: Any
) -> None:
    gateway = start_gateway(make_config("", management__usage_flush_seconds=0.1))
    plaintext, document = seed_token(seed_user())

    httpx.get(f"{gateway.url}/_auth", headers={"X-API-KEY": plaintext, "User-Agent": "nginx-client/1.0"})

    deadline = time.monotonic() + 10
    stored = mongo.api_token.find_one({"_id": document["_id"]})
    while stored["last_used_at"] is None and time.monotonic() < deadline:
        time.sleep(0.05)
        stored = mongo.api_token.find_one({"_id": document["_id"]})
    assert stored["last_used_at"] is not None
    assert stored["user_agents"] == ["nginx-client/1.0"]


def test_auth_request_path_configurable(make_config: Any, start_gateway: Any, seed_user: Any, seed_token: Any) -> None:
    gateway = start_gateway(make_config("", auth__auth_request_path="/internal/check"))
    plaintext, _ = seed_token(seed_user())

    configured = httpx.get(f"{gateway.url}/internal/check", headers={"X-API-KEY": plaintext})
    default = httpx.get(f"{gateway.url}/_auth", headers={"X-API-KEY": plaintext})

    assert configured.status_code == 204
    assert default.status_code == 404


@pytest.mark.parametrize(
    "trusted_proxies, client, method, path",
    [
        ([], "127.0.0.1", "GET", "/_auth"),  # the peer is not trusted: its headers are ignored
        (["127.0.0.0/8"], "198.51.100.1", "DELETE", "/datasets/7"),  # the peer is trusted
    ],
)
def test_auth_request_believes_forwarded_headers_only_from_trusted(
    make_config: Any,
    start_gateway: Any,
    caplog: pytest.LogCaptureFixture,
    trusted_proxies: list[str],
    client: str,
    method: str,
    path: str,
) -> None:
    gateway = start_gateway(make_config("", server__trusted_proxies=trusted_proxies))
    caplog.set_level(logging.INFO, logger="gateway.audit")
    headers = {
        "X-API-KEY": "udata_unknown",
        "X-Forwarded-For": "6.6.6.6, 198.51.100.1",
        "X-Original-URI": "/datasets/7?page=1",
        "X-Original-Method": "DELETE",
    }

    response = httpx.get(f"{gateway.url}/_auth", headers=headers)

    assert response.status_code == 401
    lines = [record.getMessage() for record in caplog.records if record.name == "gateway.audit"]
    assert len(lines) == 1
    assert re.fullmatch(
        rf"Authentication failed: request_id=[0-9a-f]{{32}} reason=invalid client={client} method={method} "
        rf"path={re.escape(path)}",
        lines[0],
    )
