"""The authenticator against token documents that other tools wrote, through a real gateway."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.support.upstream import header_values


@pytest.fixture
def gateway_without_user_check(make_config: Any, start_gateway: Any, echo_upstream: Any) -> Any:
    # With a users collection, an owner id that matches no user is rejected as
    # inactive anyway; without one, the owner id itself must be checked.
    upstream_app, upstream_server = echo_upstream
    gateway = start_gateway(make_config(upstream_server.url, store__users_collection=""))
    return gateway, upstream_app


@pytest.mark.parametrize(
    "owner",
    [
        "",  # an empty id would reach the API as an empty identity header
        "   ",
        "robot\r\nX-Admin: 1",  # not a valid header value
        "robot\x00",
        None,
    ],
)
def test_unusable_owner_id_rejected_as_invalid(gateway_without_user_check: Any, seed_token: Any, owner: Any) -> None:
    gateway, upstream = gateway_without_user_check
    plaintext, _ = seed_token(owner)

    proxied = httpx.get(f"{gateway.url}/x", headers={"X-API-KEY": plaintext})
    checked = httpx.get(f"{gateway.url}/_auth", headers={"X-API-KEY": plaintext})

    assert proxied.status_code == 401
    assert proxied.json() == {"message": "Invalid API token"}
    assert checked.status_code == 401
    assert "x-authenticated-user" not in checked.headers
    assert upstream.requests == []


def test_owner_field_missing_rejected_as_invalid(gateway_without_user_check: Any, seed_token: Any, mongo: Any) -> None:
    gateway, upstream = gateway_without_user_check
    plaintext, document = seed_token("robot")
    mongo.api_token.update_one({"_id": document["_id"]}, {"$unset": {"user": ""}})

    response = httpx.get(f"{gateway.url}/x", headers={"X-API-KEY": plaintext})

    assert response.status_code == 401
    assert response.json() == {"message": "Invalid API token"}
    assert upstream.requests == []


def test_string_owner_id_with_punctuation_accepted(gateway_without_user_check: Any, seed_token: Any) -> None:
    gateway, upstream = gateway_without_user_check
    plaintext, _ = seed_token("service:robot-7@example.org")

    response = httpx.get(f"{gateway.url}/x", headers={"X-API-KEY": plaintext})

    assert response.status_code == 200
    assert header_values(upstream.requests[-1], "X-Authenticated-User") == ["service:robot-7@example.org"]


@pytest.mark.parametrize("expires_at", ["2020-01-01T00:00:00Z", "2999-01-01", 1893456000, True])
def test_non_date_expiry_rejected_as_invalid(gateway_without_user_check: Any, seed_token: Any, expires_at: Any) -> None:
    gateway, upstream = gateway_without_user_check
    plaintext, _ = seed_token("robot", expires_at=expires_at)

    proxied = httpx.get(f"{gateway.url}/x", headers={"X-API-KEY": plaintext})
    checked = httpx.get(f"{gateway.url}/_auth", headers={"X-API-KEY": plaintext})

    assert proxied.status_code == 401
    assert proxied.json() == {"message": "Invalid API token"}
    assert checked.status_code == 401
    assert "x-authenticated-user" not in checked.headers
    assert upstream.requests == []
