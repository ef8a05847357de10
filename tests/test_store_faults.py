"""Store faults seen through a real gateway: stopped, hung and slow stores, stale-if-error and recovery.

Each test runs its own SecantusDB process, so it can stop it and start it
again on the same port and data folder.
"""

from __future__ import annotations

import datetime
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.faults import Relay, StoreProcess, TcpServer, never_answer

STORE_TIMEOUT_SECONDS = 1.0
# A 503 must come within the store timeout; the margin absorbs a loaded test machine.
BOUND_SECONDS = STORE_TIMEOUT_SECONDS + 2.0


@pytest.fixture
def store_process(tmp_path: Path) -> Iterator[StoreProcess]:
    store = StoreProcess(tmp_path / "store").start()
    yield store
    store.stop()


@pytest.fixture
def mongodb_uri(store_process: StoreProcess) -> str:
    return store_process.uri


def get(gateway: Any, key: str) -> tuple[int, float]:
    started = time.monotonic()
    response = httpx.get(f"{gateway.url}/x", headers={"X-API-KEY": key}, timeout=30)
    return response.status_code, time.monotonic() - started


def wait_for_status(gateway: Any, key: str, status: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while get(gateway, key)[0] != status:
        if time.monotonic() > deadline:
            raise AssertionError(f"The gateway did not answer {status} within {timeout} s.")
        time.sleep(0.05)


def wait_until_rejected(gateway: Any, key: str, timeout: float = 10) -> int:
    deadline = time.monotonic() + timeout
    while (status := get(gateway, key)[0]) == 200:
        if time.monotonic() > deadline:
            raise AssertionError(f"The gateway still accepted the key after {timeout} s.")
        time.sleep(0.05)
    return status


def stale_answers(gateway: Any) -> float:
    return gateway.app.metrics.registry.get_sample_value("gateway_cache_lookups_total", {"result": "stale"}) or 0.0


@pytest.fixture
def gateway_for(make_config: Any, start_gateway: Any, echo_upstream: Any) -> Callable[..., Any]:
    _, upstream = echo_upstream

    def start(**overrides: Any) -> Any:
        settings = {"store__timeout_seconds": STORE_TIMEOUT_SECONDS, "cache__ttl_seconds": 0.3, **overrides}
        return start_gateway(make_config(upstream.url, **settings))

    return start


def test_authenticator_stale_key_served_while_store_stopped(
    gateway_for: Any, store_process: StoreProcess, seed_user: Any, seed_token: Any, mongo: Any
) -> None:
    gateway = gateway_for(cache__stale_if_error_seconds=30.0, cache__negative_ttl_seconds=0.3)
    user = seed_user()
    valid, _ = seed_token(user)
    revoked, revoked_document = seed_token(user)
    expiring, _ = seed_token(user, expires_at=datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=2.5))
    assert [get(gateway, key)[0] for key in (valid, revoked, expiring)] == [200, 200, 200]
    mongo.api_token.update_one({"_id": revoked_document["_id"]}, {"$set": {"revoked_at": datetime.datetime.now()}})
    wait_for_status(gateway, revoked, 401)

    store_process.stop()
    time.sleep(0.5)
    valid_status, _ = get(gateway, valid)
    revoked_status, _ = get(gateway, revoked)
    unknown_status, unknown_elapsed = get(gateway, "udata_never_issued")
    # An expired key leaves the cache at its expiry, so the store is queried and the lookup fails.
    expired_status = wait_until_rejected(gateway, expiring)

    assert valid_status == 200
    assert stale_answers(gateway) >= 1
    assert revoked_status == 503
    assert expired_status in (401, 503)
    assert unknown_status == 503
    assert unknown_elapsed < BOUND_SECONDS

    store_process.start()
    created_after, _ = seed_token(user)
    wait_for_status(gateway, created_after, 200, timeout=10)
    assert get(gateway, valid)[0] == 200
    assert get(gateway, revoked)[0] == 401


def test_authenticator_stale_off_stopped_store_503(
    gateway_for: Any, store_process: StoreProcess, seed_user: Any, seed_token: Any
) -> None:
    gateway = gateway_for()
    valid, _ = seed_token(seed_user())
    assert get(gateway, valid)[0] == 200

    store_process.stop()
    time.sleep(0.5)
    status, elapsed = get(gateway, valid)
    store_process.start()

    assert status == 503
    assert elapsed < BOUND_SECONDS
    wait_for_status(gateway, valid, 200)


def test_authenticator_hung_store_503_within_bound(make_config: Any, start_gateway: Any, echo_upstream: Any) -> None:
    _, upstream = echo_upstream
    silent = TcpServer(never_answer).start()
    try:
        environ = {"GATEWAY_STORE_URI": f"mongodb://127.0.0.1:{silent.port}/?directConnection=true"}
        config = make_config(upstream.url, environ=environ, store__timeout_seconds=STORE_TIMEOUT_SECONDS)
        gateway = start_gateway(config)

        status, elapsed = get(gateway, "udata_uncached_key")
        ready = httpx.get(f"{gateway.url}/readyz", timeout=30)
        health = httpx.get(f"{gateway.url}/healthz", timeout=30)
        gateway.server.stop()
    finally:
        silent.stop()

    assert status == 503
    assert elapsed < BOUND_SECONDS
    assert silent.connections >= 1
    assert ready.status_code == 503
    assert health.status_code == 200


def test_authenticator_slow_store_stale_then_recovers(
    make_config: Any,
    start_gateway: Any,
    echo_upstream: Any,
    store_process: StoreProcess,
    seed_user: Any,
    seed_token: Any,
) -> None:
    _, upstream = echo_upstream
    relay = Relay(store_process.port)
    server = TcpServer(relay).start()
    try:
        environ = {"GATEWAY_STORE_URI": f"mongodb://127.0.0.1:{server.port}/?directConnection=true"}
        config = make_config(
            upstream.url,
            environ=environ,
            store__timeout_seconds=STORE_TIMEOUT_SECONDS,
            cache__ttl_seconds=0.3,
            cache__stale_if_error_seconds=30.0,
        )
        gateway = start_gateway(config)
        user = seed_user()
        cached, _ = seed_token(user)
        uncached, _ = seed_token(user)
        slow_but_in_time, _ = seed_token(user)

        relay.delay = 0.2
        slow_status, _ = get(gateway, slow_but_in_time)
        assert get(gateway, cached)[0] == 200

        relay.delay = 5.0
        time.sleep(0.5)
        stale_status, _ = get(gateway, cached)
        uncached_status, uncached_elapsed = get(gateway, uncached)

        relay.delay = 0.0
        wait_for_status(gateway, uncached, 200, timeout=15)
        # The gateway stops first, so its client never outlives the relay.
        gateway.server.stop()
    finally:
        server.stop()

    assert slow_status == 200
    assert stale_status == 200
    assert uncached_status == 503
    assert uncached_elapsed < BOUND_SECONDS
