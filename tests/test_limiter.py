"""The failed-lookup limiter: a unit with a fake clock, then a flood against a real gateway."""

from __future__ import annotations

import secrets
import time
from typing import Any

import httpx
import pytest

from gateway.limiter import FailedLookupLimiter, client_key


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_limiter_allows_burst_then_refuses() -> None:
    clock = FakeClock()
    limiter = FailedLookupLimiter(rate=1.0, burst=3, max_clients=10, clock=clock)

    allowed = 0
    while limiter.allows("192.0.2.1") and allowed < 100:
        limiter.charge("192.0.2.1")
        allowed += 1

    assert allowed == 3
    assert limiter.retry_after("192.0.2.1") == pytest.approx(1.0)


def test_limiter_refills_at_rate() -> None:
    clock = FakeClock()
    limiter = FailedLookupLimiter(rate=2.0, burst=2, max_clients=10, clock=clock)
    limiter.charge("192.0.2.1")
    limiter.charge("192.0.2.1")
    assert not limiter.allows("192.0.2.1")

    clock.now += 0.5

    assert limiter.allows("192.0.2.1")
    limiter.charge("192.0.2.1")
    assert not limiter.allows("192.0.2.1")


def test_limiter_keeps_clients_apart() -> None:
    limiter = FailedLookupLimiter(rate=1.0, burst=1, max_clients=10, clock=FakeClock())

    limiter.charge("192.0.2.1")

    assert not limiter.allows("192.0.2.1")
    assert limiter.allows("192.0.2.2")


def test_limiter_memory_bounded_by_max_clients() -> None:
    limiter = FailedLookupLimiter(rate=1.0, burst=1, max_clients=100, clock=FakeClock())

    for number in range(10_000):
        limiter.charge(f"10.{number // 65536}.{number // 256 % 256}.{number % 256}")

    assert len(limiter.buckets) == 100


def test_limiter_rate_zero_is_off() -> None:
    limiter = FailedLookupLimiter(rate=0.0, burst=1, max_clients=10, clock=FakeClock())

    for _ in range(10):
        limiter.charge("192.0.2.1")

    assert limiter.allows("192.0.2.1")
    assert len(limiter.buckets) == 0


@pytest.mark.parametrize(
    "address, key",
    [
        ("192.0.2.1", "192.0.2.1"),
        ("2001:db8:1:2:3:4:5:6", "2001:db8:1:2::/64"),  # one /64, one client
        ("2001:db8:1:2:ffff::1", "2001:db8:1:2::/64"),
        ("::ffff:192.0.2.7", "192.0.2.7"),  # IPv4-mapped: the IPv4 client
        ("fe80::1%eth0", "fe80::/64"),  # zone index dropped
        ("not-an-address", "not-an-address"),
    ],
)
def test_client_key_groups_ipv6_networks(address: str, key: str) -> None:
    assert client_key(address) == key


@pytest.fixture
def strict_gateway(make_config: Any, start_gateway: Any, echo_upstream: Any) -> Any:
    _, upstream_server = echo_upstream
    config = make_config(
        upstream_server.url,
        auth__failed_lookup_rate=1.0,
        auth__failed_lookup_burst=5,
        cache__negative_max_entries=50,
    )
    return start_gateway(config)


def test_flood_of_random_keys_costs_bounded_lookups(strict_gateway: Any) -> None:
    gateway = strict_gateway
    attempts = 300

    started = time.monotonic()
    with httpx.Client(base_url=gateway.url) as client:
        responses = [client.get("/x", headers={"X-API-KEY": "udata_" + secrets.token_urlsafe(48)}) for _ in range(300)]
    elapsed = time.monotonic() - started

    assert [response.status_code for response in responses] == [401] * attempts
    assert {response.json()["message"] for response in responses} == {"Invalid API token"}
    assert responses[-1].headers["x-auth-error"] == "throttled"
    assert int(responses[-1].headers["retry-after"]) >= 1
    # The burst, plus one lookup per second of refill, plus one for rounding.
    assert gateway.counter.token_lookups() <= 5 + int(elapsed) + 1
    assert len(gateway.app.authenticator.negative) <= 50
    assert len(gateway.app.failed_lookups.buckets) == 1


def test_flood_leaves_other_clients_and_cached_keys_alone(strict_gateway: Any, seed_user: Any, seed_token: Any) -> None:
    gateway = strict_gateway
    plaintext, _ = seed_token(seed_user())
    fresh, _ = seed_token(seed_user())
    with httpx.Client(base_url=gateway.url) as client:
        assert client.get("/x", headers={"X-API-KEY": plaintext}).status_code == 200
        for _ in range(20):
            client.get("/x", headers={"X-API-KEY": "udata_" + secrets.token_urlsafe(48)})

        throttled_cached = client.get("/x", headers={"X-API-KEY": plaintext})
        throttled_fresh = client.get("/x", headers={"X-API-KEY": fresh})

    other_transport = httpx.HTTPTransport(local_address="127.0.0.2")
    with httpx.Client(base_url=gateway.url, transport=other_transport) as other_client:
        other = other_client.get("/x", headers={"X-API-KEY": fresh})

    assert throttled_cached.status_code == 200
    assert throttled_fresh.status_code == 401
    assert throttled_fresh.headers["x-auth-error"] == "throttled"
    assert other.status_code == 200


def test_limiter_counts_forwarded_client_behind_trusted_proxy(
    make_config: Any, start_gateway: Any, echo_upstream: Any
) -> None:
    _, upstream_server = echo_upstream
    config = make_config(
        upstream_server.url,
        server__trusted_proxies=["127.0.0.0/8"],
        auth__failed_lookup_rate=0.001,
        auth__failed_lookup_burst=2,
    )
    gateway = start_gateway(config)

    def attempt(forwarded_for: str) -> httpx.Response:
        headers = {"X-API-KEY": "udata_" + secrets.token_urlsafe(48), "X-Forwarded-For": forwarded_for}
        return httpx.get(f"{gateway.url}/x", headers=headers)

    first_client = [attempt("198.51.100.1").headers["x-auth-error"] for _ in range(4)]
    # A client that forges an entry on the left is still counted by the entry nginx appended.
    forged = attempt("203.0.113.50, 198.51.100.1").headers["x-auth-error"]
    second_client = attempt("198.51.100.2").headers["x-auth-error"]

    assert first_client == ["invalid", "invalid", "throttled", "throttled"]
    assert forged == "throttled"
    assert second_client == "invalid"
