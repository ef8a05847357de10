"""Usage tracking: last_used_at and User-Agent records, batched off the request path."""

from __future__ import annotations

import datetime
import socket
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from bson import ObjectId

from gateway.store import MAX_USER_AGENTS, TokenStore
from gateway.usage import UsageRecorder

LONG_FLUSH_SECONDS = 3600.0


@pytest.fixture
async def store(make_config: Any, mongo: Any) -> AsyncIterator[TokenStore]:
    config = make_config()
    token_store = TokenStore.connect(config.store.uri, config.store)
    yield token_store
    await token_store.close()


@pytest.fixture
def refused_address() -> Iterator[str]:
    """A loopback port bound by this test and never listened on, so connections are refused."""
    with socket.socket() as bound:
        bound.bind(("127.0.0.1", 0))
        host, port = bound.getsockname()
        yield f"mongodb://{host}:{port}/?directConnection=true"


def test_usage_survives_clean_shutdown(
    make_config: Any, start_gateway: Any, echo_upstream: Any, seed_user: Any, seed_token: Any, mongo: Any
) -> None:
    _, upstream_server = echo_upstream
    gateway = start_gateway(make_config(upstream_server.url, management__usage_flush_seconds=LONG_FLUSH_SECONDS))
    key, document = seed_token(seed_user())
    before = datetime.datetime.now(datetime.UTC)
    response = httpx.get(f"{gateway.url}/x", headers={"X-API-KEY": key, "User-Agent": "shutdown-test/1"})
    assert response.status_code == 200
    assert mongo.api_token.find_one({"_id": document["_id"]})["last_used_at"] is None  # not flushed yet

    gateway.server.stop()

    stored = mongo.api_token.find_one({"_id": document["_id"]})
    assert stored["last_used_at"] >= before.replace(microsecond=before.microsecond // 1000 * 1000)
    assert stored["user_agents"] == ["shutdown-test/1"]


def test_usage_not_written_on_request_path(
    make_config: Any, start_gateway: Any, echo_upstream: Any, seed_user: Any, seed_token: Any
) -> None:
    _, upstream_server = echo_upstream
    gateway = start_gateway(make_config(upstream_server.url, management__usage_flush_seconds=LONG_FLUSH_SECONDS))
    key, _ = seed_token(seed_user())

    for number in range(5):
        httpx.get(f"{gateway.url}/x", headers={"X-API-KEY": key, "User-Agent": f"agent/{number}"})

    writes = [name for name, _ in gateway.counter.commands if name in ("update", "insert", "bulkWrite")]
    assert writes == []


def test_usage_listed_with_at_most_20_agents(
    make_config: Any, start_gateway: Any, echo_upstream: Any, seed_user: Any, seed_token: Any, mongo: Any
) -> None:
    _, upstream_server = echo_upstream
    gateway = start_gateway(make_config(upstream_server.url, management__usage_flush_seconds=0.05))
    user = seed_user()
    owner_key, _ = seed_token(user, name="owner")
    key, document = seed_token(user, name="busy")

    for number in range(MAX_USER_AGENTS + 5):
        httpx.get(f"{gateway.url}/x", headers={"X-API-KEY": key, "User-Agent": f"agent/{number}"})
    gateway.server.stop()  # flushes what is pending
    restarted = start_gateway(make_config(upstream_server.url))
    listed = httpx.get(f"{restarted.url}/api/1/me/tokens/", headers={"X-API-KEY": owner_key}).json()

    busy = next(item for item in listed if item["name"] == "busy")
    assert len(busy["user_agents"]) == MAX_USER_AGENTS
    assert set(busy["user_agents"]) <= {f"agent/{number}" for number in range(MAX_USER_AGENTS + 5)}
    assert busy["last_used_at"] is not None
    assert len(mongo.api_token.find_one({"_id": document["_id"]})["user_agents"]) == MAX_USER_AGENTS


async def test_user_agent_cap_holds_across_recorders(store: TokenStore, mongo: Any) -> None:
    # Two gateway processes share the store, and each alone stays under the cap.
    token_id = mongo.api_token.insert_one({"token_hash": "a" * 64, "user": "u", "user_agents": []}).inserted_id
    first, second = UsageRecorder(store, LONG_FLUSH_SECONDS), UsageRecorder(store, LONG_FLUSH_SECONDS)
    for number in range(15):
        first.record(token_id, f"first/{number}", frozenset())
        second.record(token_id, f"second/{number}", frozenset())

    await first.flush()
    await second.flush()

    assert len(mongo.api_token.find_one({"_id": token_id})["user_agents"]) == MAX_USER_AGENTS


async def test_last_used_at_only_moves_forward(store: TokenStore, mongo: Any) -> None:
    token_id = mongo.api_token.insert_one({"token_hash": "b" * 64, "user": "u", "last_used_at": None}).inserted_id
    newer = datetime.datetime(2026, 6, 1, 12, 0, tzinfo=datetime.UTC)
    older = datetime.datetime(2026, 6, 1, 11, 0, tzinfo=datetime.UTC)

    await store.record_usage([(token_id, newer, [])])
    await store.record_usage([(token_id, older, [])])

    assert mongo.api_token.find_one({"_id": token_id})["last_used_at"] == newer


async def test_failed_flush_keeps_records(
    make_config: Any, store: TokenStore, mongo: Any, refused_address: str
) -> None:
    token_id = mongo.api_token.insert_one({"token_hash": "c" * 64, "user": "u", "user_agents": []}).inserted_id
    dead_config = make_config(store__timeout_seconds=0.5)
    dead_store = TokenStore.connect(refused_address, dead_config.store)
    recorder = UsageRecorder(dead_store, LONG_FLUSH_SECONDS)
    recorder.record(token_id, "kept/1", frozenset())

    started = time.monotonic()
    await recorder.flush()
    assert time.monotonic() - started < 10
    recorder.record(token_id, "kept/2", frozenset())
    recorder.store = store
    await recorder.flush()
    await dead_store.close()

    stored = mongo.api_token.find_one({"_id": token_id})
    assert sorted(stored["user_agents"]) == ["kept/1", "kept/2"]
    assert stored["last_used_at"] is not None


async def test_flush_never_creates_documents(store: TokenStore, mongo: Any) -> None:
    # A record for a token deleted meanwhile must not bring a document back.
    recorder = UsageRecorder(store, LONG_FLUSH_SECONDS)
    recorder.record(ObjectId(), "ghost/1", frozenset())

    await recorder.flush()

    assert mongo.api_token.count_documents({}) == 0
