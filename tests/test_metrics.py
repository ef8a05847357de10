"""Prometheus metrics: who may read them, and what the counters count."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = httpx.get(f"{url}/metrics")
    assert response.status_code == 200
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


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
