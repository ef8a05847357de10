"""Change streams: token and user evictions, resumption, fallback to the TTL, two processes on one store."""

from __future__ import annotations

import asyncio
import datetime
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from bson import ObjectId
from prometheus_client.parser import text_string_to_metric_families

from gateway.authenticator import Authenticator
from gateway.store import OWNER_FIELD
from tests.conftest import TEST_SECRET
from tests.support.faults import StoreProcess, running_gateways

# The documented bound with change streams. Measured on loopback, the lag is
# a few milliseconds; the rest is headroom for a loaded test machine.
WATCH_BOUND_SECONDS = 1.0
LONG_TTL = {"cache__ttl_seconds": 60.0, "cache__negative_ttl_seconds": 60.0}


def status_of(url: str, key: str) -> int:
    return httpx.get(f"{url}/x", headers={"X-API-KEY": key}, timeout=30).status_code


def seconds_until_rejected(url: str, key: str, timeout: float = 15) -> float:
    started = time.monotonic()
    while status_of(url, key) == 200:
        if time.monotonic() - started > timeout:
            raise AssertionError(f"{url} still accepted the key {timeout} s after the change.")
        time.sleep(0.005)
    return time.monotonic() - started


def wait_until(condition: Any, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"The condition did not hold within {timeout} s.")
        time.sleep(0.02)


def sample_value(gateway: Any, name: str, stream: str = "tokens") -> Any:
    return gateway.app.metrics.registry.get_sample_value(name, {"stream": stream})


def watching(gateway: Any, stream: str = "tokens") -> bool:
    return bool(sample_value(gateway, "gateway_change_stream_active", stream) == 1)


def scraped(url: str) -> dict[tuple[str, str], float]:
    """Return every sample by name and `stream` label, "" for metrics without that label."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return {
        (sample.name, sample.labels.get("stream", "")): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


@pytest.fixture
def proxy(make_config: Any, start_gateway: Any, echo_upstream: Any) -> Any:
    _, upstream = echo_upstream
    gateway = start_gateway(make_config(upstream.url, **LONG_TTL))
    wait_until(lambda: watching(gateway))
    return gateway


@pytest.mark.parametrize(
    "change",
    [
        {"$set": {"revoked_at": now()}},  # revoked through the API or udata
        {"$set": {"expires_at": datetime.datetime(2020, 1, 1, tzinfo=datetime.UTC)}},  # expiry moved to the past
        {"$set": {"token_hash": "0" * 64}},  # hash replaced
        None,  # document deleted
    ],
)
def test_watcher_change_evicts_token(proxy: Any, seed_user: Any, seed_token: Any, mongo: Any, change: Any) -> None:
    plaintext, document = seed_token(seed_user())
    assert status_of(proxy.url, plaintext) == 200

    if change is None:
        mongo.api_token.delete_one({"_id": document["_id"]})
    else:
        mongo.api_token.update_one({"_id": document["_id"]}, change)
    elapsed = seconds_until_rejected(proxy.url, plaintext)

    assert elapsed < WATCH_BOUND_SECONDS
    assert sample_value(proxy, "gateway_revocation_lag_seconds_count") >= 1


@pytest.fixture
def user_proxy(make_config: Any, start_gateway: Any, echo_upstream: Any) -> Any:
    _, upstream = echo_upstream
    gateway = start_gateway(make_config(upstream.url, **LONG_TTL))
    wait_until(lambda: watching(gateway) and watching(gateway, "users"))
    return gateway


@pytest.mark.parametrize(
    "change",
    [
        {"$set": {"active": False}},  # deactivated by an administrator
        {"$set": {"deleted": now()}},  # deleted the way udata does, keeping the document
        "replace",  # document rewritten without the fields
        None,  # document removed
    ],
)
def test_watcher_user_change_evicts_keys(
    user_proxy: Any, seed_user: Any, seed_token: Any, mongo: Any, change: Any
) -> None:
    user = seed_user()
    first, _ = seed_token(user)
    second, _ = seed_token(user)
    assert [status_of(user_proxy.url, key) for key in (first, second)] == [200, 200]
    assert user_proxy.counter.token_lookups() == 2

    if change is None:
        mongo.user.delete_one({"_id": user})
    elif change == "replace":
        mongo.user.replace_one({"_id": user}, {"first_name": "Ada"})
    else:
        mongo.user.update_one({"_id": user}, change)
    elapsed = seconds_until_rejected(user_proxy.url, first)

    assert elapsed < WATCH_BOUND_SECONDS
    assert status_of(user_proxy.url, second) == 401
    assert sample_value(user_proxy, "gateway_revocation_lag_seconds_count", "users") >= 1


def test_watcher_user_other_field_keeps_cache(user_proxy: Any, seed_user: Any, seed_token: Any, mongo: Any) -> None:
    kept_user, deactivated_user = seed_user(), seed_user()
    kept_key, _ = seed_token(kept_user)
    deactivated_key, _ = seed_token(deactivated_user)
    assert [status_of(user_proxy.url, key) for key in (kept_key, deactivated_key)] == [200, 200]

    mongo.user.update_one({"_id": kept_user}, {"$set": {"last_login_at": now()}})
    # Events arrive in order, so once the second change is applied the first one was too.
    mongo.user.update_one({"_id": deactivated_user}, {"$set": {"active": False}})
    seconds_until_rejected(user_proxy.url, deactivated_key)
    kept_status = status_of(user_proxy.url, kept_key)

    assert kept_status == 200
    # One lookup per key, then one for the deactivated key after its eviction.
    assert user_proxy.counter.token_lookups() == 3


def test_watcher_user_stream_off_without_users_collection(
    make_config: Any, start_gateway: Any, echo_upstream: Any
) -> None:
    _, upstream = echo_upstream
    gateway = start_gateway(make_config(upstream.url, store__users_collection="", **LONG_TTL))
    wait_until(lambda: watching(gateway))

    assert gateway.app.user_watcher is None
    assert not watching(gateway, "users")


def test_watcher_usage_write_keeps_cache(
    make_config: Any, start_gateway: Any, echo_upstream: Any, seed_user: Any, seed_token: Any, mongo: Any
) -> None:
    _, upstream = echo_upstream
    gateway = start_gateway(make_config(upstream.url, management__usage_flush_seconds=0.1, **LONG_TTL))
    wait_until(lambda: watching(gateway))
    plaintext, document = seed_token(seed_user())

    first = status_of(gateway.url, plaintext)
    wait_until(lambda: mongo.api_token.find_one({"_id": document["_id"]})["last_used_at"] is not None)
    time.sleep(0.3)
    second = status_of(gateway.url, plaintext)

    assert (first, second) == (200, 200)
    assert gateway.counter.token_lookups() == 1


def test_watcher_created_token_clears_negative_answer(proxy: Any, seed_user: Any, seed_token: Any) -> None:
    plaintext = "udata_" + "n" * 64
    assert status_of(proxy.url, plaintext) == 401

    seed_token(seed_user(), plaintext=plaintext)

    wait_until(lambda: status_of(proxy.url, plaintext) == 200, timeout=WATCH_BOUND_SECONDS * 5)


@pytest.fixture
def store_process(tmp_path: Path) -> Iterator[StoreProcess]:
    store = StoreProcess(tmp_path / "store").start()
    yield store
    store.stop()


def test_watcher_idle_stream_stays_open(
    make_config: Any, start_gateway: Any, echo_upstream: Any, caplog: pytest.LogCaptureFixture
) -> None:
    _, upstream = echo_upstream
    gateway = start_gateway(make_config(upstream.url, store__timeout_seconds=0.5, **LONG_TTL))
    wait_until(lambda: watching(gateway))

    with caplog.at_level(logging.WARNING, logger="gateway.watcher"):
        time.sleep(2.0)  # four store timeouts without a change

    failures = [record.getMessage() for record in caplog.records if record.name == "gateway.watcher"]
    assert failures == []
    assert watching(gateway)


def test_watcher_resumes_after_store_restart(
    store_process: StoreProcess, make_config: Any, start_gateway: Any, echo_upstream: Any, database_name: str
) -> None:
    import pymongo

    _, upstream = echo_upstream
    environ = {"GATEWAY_STORE_URI": store_process.uri}
    gateway = start_gateway(make_config(upstream.url, environ=environ, store__timeout_seconds=1.0, **LONG_TTL))
    wait_until(lambda: watching(gateway))
    client: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(store_process.uri, timeoutMS=10_000)
    tokens = client[database_name].api_token
    user = client[database_name].user.insert_one({"active": True}).inserted_id
    plaintext = "udata_" + "r" * 64
    from gateway.tokens import hash_token

    token_id = tokens.insert_one({"token_hash": hash_token(TEST_SECRET, plaintext), "user": user}).inserted_id
    try:
        assert status_of(gateway.url, plaintext) == 200

        store_process.stop()
        wait_until(lambda: not watching(gateway))
        store_process.start()
        wait_until(lambda: watching(gateway))
        assert status_of(gateway.url, plaintext) == 200
        tokens.update_one({"_id": token_id}, {"$set": {"revoked_at": now()}})
        elapsed = seconds_until_rejected(gateway.url, plaintext)
    finally:
        client.close()

    assert elapsed < WATCH_BOUND_SECONDS


def test_watcher_unsupported_store_falls_back_to_ttl(
    make_config: Any,
    start_gateway: Any,
    echo_upstream: Any,
    tmp_path: Path,
    database_name: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    import pymongo

    from gateway.tokens import hash_token

    caplog.set_level(logging.INFO, logger="gateway.watcher")
    standalone = StoreProcess(tmp_path / "standalone", None, "--standalone").start()
    client: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(standalone.uri, timeoutMS=10_000)
    _, upstream = echo_upstream
    environ = {"GATEWAY_STORE_URI": standalone.uri}
    gateway = start_gateway(make_config(upstream.url, environ=environ, cache__ttl_seconds=1.0))
    try:
        tokens = client[database_name].api_token
        user = client[database_name].user.insert_one({"active": True}).inserted_id
        plaintext = "udata_" + "s" * 64
        token_id = tokens.insert_one({"token_hash": hash_token(TEST_SECRET, plaintext), "user": user}).inserted_id
        wait_until(lambda: gateway.app.watcher is not None and not gateway.app.watcher.is_supported)

        assert status_of(gateway.url, plaintext) == 200
        tokens.update_one({"_id": token_id}, {"$set": {"revoked_at": now()}})
        right_after = status_of(gateway.url, plaintext)
        elapsed = seconds_until_rejected(gateway.url, plaintext)
    finally:
        # The gateway stops first, so its client never outlives its store.
        gateway.server.stop()
        client.close()
        standalone.stop()

    assert right_after == 200
    assert elapsed < 1.0 + 2.0
    unsupported = [record.getMessage() for record in caplog.records if "does not support" in record.getMessage()]
    assert len([message for message in unsupported if "token changes" in message]) == 1
    assert len([message for message in unsupported if "user deactivations" in message]) == 1


def gateway_environ(mongodb_uri: str, database_name: str, upstream_url: str, **settings: str) -> dict[str, str]:
    return {
        "GATEWAY_TOKENS_SECRET": TEST_SECRET,
        "GATEWAY_STORE_URI": mongodb_uri,
        "GATEWAY_STORE_DATABASE": database_name,
        "GATEWAY_UPSTREAM_URL": upstream_url,
        "GATEWAY_LOGGING_LEVEL": "warning",
        **settings,
    }


def test_watcher_two_gateways_revocation_within_bound(
    mongodb_uri: str, database_name: str, echo_upstream: Any, seed_user: Any, seed_token: Any, mongo: Any
) -> None:
    _, upstream = echo_upstream
    environ = gateway_environ(mongodb_uri, database_name, upstream.url, GATEWAY_CACHE_TTL_SECONDS="60")
    with running_gateways(environ, environ) as (first, second):
        active = ("gateway_change_stream_active", "tokens")
        wait_until(lambda: all(scraped(g.url)[active] == 1 for g in (first, second)))
        plaintext, document = seed_token(seed_user())
        assert [status_of(g.url, plaintext) for g in (first, second)] == [200, 200]

        # The management routes revoke with this same write; revoking through
        # the store directly also covers udata and operators' scripts.
        mongo.api_token.update_one({"_id": document["_id"]}, {"$set": {"revoked_at": now()}})
        elapsed = seconds_until_rejected(second.url, plaintext)
        first_status = status_of(first.url, plaintext)
        metrics = scraped(second.url)

    assert elapsed < WATCH_BOUND_SECONDS
    assert first_status == 401
    assert metrics[("gateway_revocation_lag_seconds_count", "tokens")] >= 1
    assert metrics[("gateway_revocation_lag_seconds_sum", "tokens")] < WATCH_BOUND_SECONDS


def test_watcher_two_gateways_without_streams_ttl_bound(
    mongodb_uri: str, database_name: str, echo_upstream: Any, seed_user: Any, seed_token: Any, mongo: Any
) -> None:
    _, upstream = echo_upstream
    environ = gateway_environ(
        mongodb_uri, database_name, upstream.url, GATEWAY_CACHE_TTL_SECONDS="1", GATEWAY_STORE_WATCH_CHANGES="false"
    )
    with running_gateways(environ, environ) as (first, second):
        plaintext, document = seed_token(seed_user())
        assert [status_of(g.url, plaintext) for g in (first, second)] == [200, 200]

        mongo.api_token.update_one({"_id": document["_id"]}, {"$set": {"revoked_at": now()}})
        elapsed = seconds_until_rejected(second.url, plaintext)

    assert elapsed < 1.0 + 2.0


@pytest.mark.parametrize(
    "description, expected",
    [
        ({"updatedFields": {"last_used_at": now()}}, True),  # the usage flush
        ({"updatedFields": {"user_agents.3": "curl/8"}}, True),  # $addToSet reported per element
        ({"updatedFields": {"last_used_at": now(), "revoked_at": now()}}, False),  # usage and a revocation at once
        ({"updatedFields": {}, "removedFields": ["expires_at"]}, False),  # expiry removed
        ({}, False),  # no description: treated as a real change
    ],
)
def test_watcher_usage_only_updates_recognised(description: dict[str, Any], expected: bool) -> None:
    from gateway.watcher import _touches_usage_only

    assert _touches_usage_only(description) is expected


@pytest.mark.parametrize(
    "description, expected",
    [
        ({"updatedFields": {"active": False}}, True),  # deactivated
        ({"updatedFields": {"deleted": now()}}, True),  # deleted
        ({"updatedFields": {}, "removedFields": ["deleted"]}, True),  # undeleted: evicting is harmless
        ({"updatedFields": {"last_login_at": now(), "active": False}}, True),  # login and deactivation at once
        ({"updatedFields": {"last_login_at": now()}}, False),  # a login
        ({"updatedFields": {"metrics.datasets": 3}}, False),  # a nested field elsewhere
        ({}, True),  # no description: treated as a real change
    ],
)
def test_watcher_user_status_changes_recognised(description: dict[str, Any], expected: bool) -> None:
    from gateway.watcher import _may_change_status

    assert _may_change_status(description) is expected


class PausedLookupStore:
    """A store stand-in whose one token waits for `resume` after it is read, to interleave a cache clear."""

    users = object()  # not None: the authenticator checks owners

    def __init__(self, document: dict[str, Any]) -> None:
        self.document = document
        self.read_done = asyncio.Event()
        self.resume = asyncio.Event()

    async def find_token(self, token_hashes: list[str]) -> dict[str, Any]:
        self.read_done.set()
        await self.resume.wait()
        return {**self.document, "token_hash": token_hashes[0]}


async def test_watcher_clear_during_lookup_not_cached(make_config: Any) -> None:
    config = make_config()
    user_id = ObjectId()
    store = PausedLookupStore({"_id": ObjectId(), "user": user_id, OWNER_FIELD: [{"_id": user_id, "active": True}]})
    authenticator = Authenticator(store, config.tokens.secret, config.cache)  # type: ignore[arg-type]

    lookup = asyncio.ensure_future(authenticator.authenticate("key-read-before-the-clear"))
    await store.read_done.wait()
    # A change stream (re)opened or reported a drop while the lookup was in flight.
    authenticator.clear()
    store.resume.set()
    await lookup

    assert len(authenticator.positive) == 0
