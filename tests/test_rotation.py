"""Token secret rotation: old-secret tokens keep working and move to the current secret."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import pytest

from gateway.store import TokenStore
from gateway.token_manager import TokenManager
from gateway.tokens import hash_token
from tests.conftest import TEST_SECRET

NEW_SECRET = "new-secret-9876543210-zyxwvutsrqp"


def secrets_environ(*secrets: str) -> dict[str, str]:
    return {"GATEWAY_TOKENS_SECRET": ",".join(secrets)}


def wait_for_hash(mongo: Any, token_id: Any, expected: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while mongo.api_token.find_one({"_id": token_id})["token_hash"] != expected:
        if time.monotonic() > deadline:
            raise AssertionError(f"Token {token_id} was not re-hashed within {timeout} s.")
        time.sleep(0.02)


def test_rotation_old_secret_token_rehashed(
    make_config: Any, start_gateway: Any, echo_upstream: Any, seed_user: Any, seed_token: Any, mongo: Any
) -> None:
    _, upstream = echo_upstream
    rotating = start_gateway(make_config(upstream.url, environ=secrets_environ(NEW_SECRET, TEST_SECRET)))
    plaintext, document = seed_token(seed_user(), secret=TEST_SECRET)

    first = httpx.get(f"{rotating.url}/x", headers={"X-API-KEY": plaintext})
    wait_for_hash(mongo, document["_id"], hash_token(NEW_SECRET, plaintext))
    second = httpx.get(f"{rotating.url}/x", headers={"X-API-KEY": plaintext})
    new_only = start_gateway(make_config(upstream.url, environ=secrets_environ(NEW_SECRET)))
    after_old_secret_dropped = httpx.get(f"{new_only.url}/x", headers={"X-API-KEY": plaintext})

    assert first.status_code == 200
    assert second.status_code == 200
    assert after_old_secret_dropped.status_code == 200
    assert mongo.api_token.count_documents({}) == 1


def test_rotation_concurrent_gateways_lose_no_request(
    make_config: Any, start_gateway: Any, echo_upstream: Any, seed_user: Any, seed_token: Any, mongo: Any
) -> None:
    _, upstream = echo_upstream
    # A generous store timeout: this test is about lost requests, not latency, on a loaded machine.
    config = make_config(upstream.url, environ=secrets_environ(NEW_SECRET, TEST_SECRET), store__timeout_seconds=10.0)
    gateways = [start_gateway(config), start_gateway(config)]
    user = seed_user()
    tokens = [seed_token(user, secret=TEST_SECRET) for _ in range(5)]

    async def burst() -> list[int]:
        async with httpx.AsyncClient(timeout=30) as client:
            requests = [
                client.get(f"{gateway.url}/x", headers={"X-API-KEY": plaintext})
                for plaintext, _ in tokens
                for gateway in gateways
                for _ in range(3)
            ]
            return [response.status_code for response in await asyncio.gather(*requests)]

    statuses = asyncio.run(burst())
    for plaintext, document in tokens:
        wait_for_hash(mongo, document["_id"], hash_token(NEW_SECRET, plaintext))
    statuses += asyncio.run(burst())

    assert statuses == [200] * 60
    assert mongo.api_token.count_documents({}) == 5


def test_rotation_current_secret_token_not_rewritten(
    make_config: Any, start_gateway: Any, echo_upstream: Any, seed_user: Any, seed_token: Any, mongo: Any
) -> None:
    _, upstream = echo_upstream
    gateway = start_gateway(make_config(upstream.url, environ=secrets_environ(NEW_SECRET, TEST_SECRET)))
    plaintext, document = seed_token(seed_user(), secret=NEW_SECRET)

    response = httpx.get(f"{gateway.url}/x", headers={"X-API-KEY": plaintext})
    time.sleep(0.3)

    assert response.status_code == 200
    assert gateway.counter.commands.count(("update", "api_token")) == 0
    assert mongo.api_token.find_one({"_id": document["_id"]})["token_hash"] == document["token_hash"]


async def test_rotation_new_token_uses_first_secret(make_config: Any, mongo: Any) -> None:
    config = make_config(environ=secrets_environ(NEW_SECRET, TEST_SECRET))
    store = TokenStore.connect(config.store.uri, config.store)
    try:
        plaintext, document = await TokenManager(store, config.tokens).create("user-1")
    finally:
        await store.close()

    assert document["token_hash"] == hash_token(NEW_SECRET, plaintext)
    assert mongo.api_token.find_one({"_id": document["_id"]})["token_hash"] == hash_token(NEW_SECRET, plaintext)


@pytest.mark.parametrize(
    "current_hash, expected_changed",
    [
        ("old", True),  # still under the old secret: moved
        ("elsewhere", False),  # changed meanwhile (revoked and re-issued, or moved by another process): untouched
    ],
)
async def test_rotation_rehash_conditional_on_old_hash(
    make_config: Any, mongo: Any, current_hash: str, expected_changed: bool
) -> None:
    config = make_config()
    token_id = mongo.api_token.insert_one({"token_hash": current_hash, "user": "u"}).inserted_id
    store = TokenStore.connect(config.store.uri, config.store)
    try:
        changed = await store.replace_token_hash(token_id, "old", "new")
    finally:
        await store.close()

    assert changed is expected_changed
    expected = "new" if expected_changed else current_hash
    assert mongo.api_token.find_one({"_id": token_id})["token_hash"] == expected
