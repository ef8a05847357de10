"""Prometheus metrics: who may read them, and what the counters count."""

from __future__ import annotations

import random
import time
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics import disable_created_metrics, enable_created_metrics
from prometheus_client.parser import text_string_to_metric_families

from gateway.metrics import (
    AUTHENTICATION_RESULTS,
    CACHE_RESULTS,
    CHANGE_STREAMS,
    LATENCY_BUCKETS,
    REQUEST_OUTCOMES,
    REVOCATION_LAG_BUCKETS,
    STORE_OPERATIONS,
    GatewayMetrics,
)


def parse_samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = httpx.get(f"{url}/metrics")
    assert response.status_code == 200
    return parse_samples(response.text)


def test_metrics_served_to_loopback_not_forwarded(make_config: Any, start_gateway: Any, echo_upstream: Any) -> None:
    upstream, server = echo_upstream
    gateway = start_gateway(make_config(server.url))

    response = httpx.get(f"{gateway.url}/metrics", headers={"X-API-KEY": "udata_not_needed"})

    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=")
    assert "gateway_requests_in_flight" in response.text
    assert upstream.requests == []


@pytest.mark.parametrize(
    "networks",
    [
        ["10.0.0.0/8"],  # loopback is not in the list
        [],  # nobody may read the metrics
    ],
)
def test_metrics_rejected_outside_allowed_networks(
    make_config: Any, start_gateway: Any, echo_upstream: Any, networks: list[str]
) -> None:
    upstream, server = echo_upstream
    config = make_config(server.url, logging__metrics_allowed_networks=networks, server__trusted_proxies=["127.0.0.1"])
    gateway = start_gateway(config)

    response = httpx.get(f"{gateway.url}/metrics", headers={"X-Forwarded-For": "10.1.2.3"})

    assert response.status_code == 403
    assert "gateway_requests" not in response.text
    assert upstream.requests == []


def test_metrics_count_requests_by_outcome(
    make_config: Any, start_gateway: Any, echo_upstream: Any, seed_user: Any, seed_token: Any
) -> None:
    _, server = echo_upstream
    gateway = start_gateway(make_config(server.url))
    plaintext, _ = seed_token(seed_user())
    with httpx.Client() as client:
        client.get(f"{gateway.url}/anonymous")
        client.get(f"{gateway.url}/x", headers={"X-API-KEY": plaintext})
        client.get(f"{gateway.url}/x", headers={"X-API-KEY": plaintext})
        client.get(f"{gateway.url}/x", headers={"X-API-KEY": "udata_unknown"})

    samples = scrape(gateway.url)

    assert samples[("gateway_requests_total", (("outcome", "forwarded"),))] == 3
    assert samples[("gateway_requests_total", (("outcome", "unauthorized"),))] == 1
    assert samples[("gateway_authentications_total", (("result", "success"),))] == 2
    assert samples[("gateway_authentications_total", (("result", "invalid"),))] == 1
    assert samples[("gateway_cache_lookups_total", (("result", "hit"),))] == 1
    assert samples[("gateway_cache_lookups_total", (("result", "miss"),))] == 2
    assert samples[("gateway_store_request_duration_seconds_count", (("operation", "find_token"),))] == 2
    assert samples[("gateway_upstream_response_duration_seconds_count", ())] == 3
    assert samples[("gateway_requests_in_flight", ())] == 0


class ReferenceMetrics:
    """The gateway's metrics built from prometheus_client's locked children, as they were before."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        registry = self.registry

        requests = Counter("gateway_requests", "Requests handled, by outcome.", ["outcome"], registry=registry)
        self.requests = {outcome: requests.labels(outcome) for outcome in REQUEST_OUTCOMES}
        authentications = Counter(
            "gateway_authentications", "Requests that carried a key, by result.", ["result"], registry=registry
        )
        self.authentications = {result: authentications.labels(result) for result in AUTHENTICATION_RESULTS}
        cache = Counter(
            "gateway_cache_lookups", "Authentication cache lookups, by result.", ["result"], registry=registry
        )
        self.cache = {result: cache.labels(result) for result in CACHE_RESULTS}

        store_duration = Histogram(
            "gateway_store_request_duration_seconds",
            "Duration of token store operations, failed ones included.",
            ["operation"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.store_duration = {operation: store_duration.labels(operation) for operation in STORE_OPERATIONS}
        self.upstream_duration = Histogram(
            "gateway_upstream_response_duration_seconds",
            "Time from sending a request upstream to its response headers.",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.in_flight = Gauge("gateway_requests_in_flight", "Requests being handled now.", registry=registry)

        revocation_lag = Histogram(
            "gateway_revocation_lag_seconds",
            "Time from a token or user change in the store (its wallTime) to its eviction from this process's "
            "cache, by change stream.",
            ["stream"],
            buckets=REVOCATION_LAG_BUCKETS,
            registry=registry,
        )
        self.revocation_lag = {stream: revocation_lag.labels(stream) for stream in CHANGE_STREAMS}
        change_stream_active = Gauge(
            "gateway_change_stream_active",
            "1 while the change stream on the token or users collection is open, else 0 (its changes then "
            "wait for the TTL).",
            ["stream"],
            registry=registry,
        )
        self.change_stream_active = {stream: change_stream_active.labels(stream) for stream in CHANGE_STREAMS}

    def render(self) -> bytes:
        return generate_latest(self.registry)


# Observations on and around the bucket bounds, where `le` decides the bucket.
EDGE_OBSERVATIONS = (0.0, -0.5, 0.001, 0.0010001, 0.005, 1.0, 30.0, 30.5, 60.0, 61.0, 1e9)


def apply_updates(metrics: Any, seed: int) -> None:
    """Apply the same pseudo-random sequence of updates to `metrics`, whichever implementation it is."""
    rng = random.Random(seed)
    counters = [*metrics.requests.values(), *metrics.authentications.values(), *metrics.cache.values()]
    histograms = [*metrics.store_duration.values(), metrics.upstream_duration, *metrics.revocation_lag.values()]

    for value in EDGE_OBSERVATIONS:
        for histogram in histograms:
            histogram.observe(value)
    for _ in range(2000):
        rng.choice(counters).inc()
        rng.choice(histograms).observe(rng.lognormvariate(-5, 2))
        metrics.in_flight.inc()
        if rng.random() < 0.9:
            metrics.in_flight.dec()
    metrics.requests["forwarded"].inc(2.5)
    metrics.cache["hit"].inc(0)
    metrics.in_flight.inc(3)
    metrics.in_flight.dec(1.5)
    metrics.change_stream_active["tokens"].set(1)
    metrics.change_stream_active["tokens"].set(0)
    metrics.change_stream_active["users"].set(True)


def without_created_values(text: str) -> list[str]:
    # `_created` samples hold each child's creation time, which differs between two registries.
    return [
        line.rpartition(" ")[0] if line.split("{")[0].split(" ")[0].endswith("_created") else line
        for line in text.splitlines()
    ]


def samples_without_created_values(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {key: 0.0 if key[0].endswith("_created") else value for key, value in parse_samples(text).items()}


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_metrics_render_matches_prometheus_client(seed: int) -> None:
    reference = ReferenceMetrics()
    metrics = GatewayMetrics()

    apply_updates(reference, seed)
    apply_updates(metrics, seed)

    expected = reference.render().decode()
    rendered = metrics.render().decode()
    assert samples_without_created_values(rendered) == samples_without_created_values(expected)
    assert without_created_values(rendered) == without_created_values(expected)


def test_metrics_render_matches_without_created_series() -> None:
    reference = ReferenceMetrics()
    metrics = GatewayMetrics()
    apply_updates(reference, 4)
    apply_updates(metrics, 4)

    disable_created_metrics()
    try:
        expected = reference.render().decode()
        rendered = metrics.render().decode()
    finally:
        enable_created_metrics()

    assert "_created" not in expected
    assert rendered == expected


def test_metrics_created_samples_hold_creation_time() -> None:
    before = time.time()
    metrics = GatewayMetrics()
    after = time.time()

    samples = parse_samples(metrics.render().decode())

    created = {key: value for key, value in samples.items() if key[0].endswith("_created")}
    counters = len(REQUEST_OUTCOMES) + len(AUTHENTICATION_RESULTS) + len(CACHE_RESULTS)
    histograms = len(STORE_OPERATIONS) + 1 + len(CHANGE_STREAMS)  # store, upstream, revocation lag
    assert len(created) == counters + histograms
    assert all(before <= value <= after for value in created.values())


def test_metrics_registry_rejects_duplicate_name() -> None:
    metrics = GatewayMetrics()

    with pytest.raises(ValueError, match="gateway_requests_total"):
        Counter("gateway_requests", "A second counter of the same name.", registry=metrics.registry)
