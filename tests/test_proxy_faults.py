"""Upstream faults: refused, hung and reset connections leave the gateway healthy."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from gateway.embedded import free_port
from tests.support.faults import Handler, TcpServer, never_answer, reset_before_answer, reset_mid_body

READ_TIMEOUT_SECONDS = 0.5


@pytest.fixture
def faulty_upstream(request: pytest.FixtureRequest) -> Iterator[TcpServer]:
    handler: Handler = request.param
    server = TcpServer(handler).start()
    yield server
    server.stop()


def sample(gateway: Any, name: str, labels: dict[str, str] | None = None) -> float:
    return gateway.app.metrics.registry.get_sample_value(name, labels or {}) or 0.0


def assert_healthy(gateway: Any) -> None:
    assert httpx.get(f"{gateway.url}/healthz").status_code == 200
    assert sample(gateway, "gateway_requests_in_flight") == 0


def test_proxy_refused_upstream_502(make_config: Any, start_gateway: Any) -> None:
    gateway = start_gateway(make_config(f"http://127.0.0.1:{free_port()}"))

    statuses = [httpx.get(f"{gateway.url}/x").status_code for _ in range(3)]

    assert statuses == [502, 502, 502]
    assert sample(gateway, "gateway_requests_total", {"outcome": "upstream_unreachable"}) == 3
    assert_healthy(gateway)


@pytest.mark.parametrize("faulty_upstream", [never_answer], indirect=True)
def test_proxy_hung_upstream_504(make_config: Any, start_gateway: Any, faulty_upstream: TcpServer) -> None:
    gateway = start_gateway(make_config(faulty_upstream.url, upstream__read_timeout_seconds=READ_TIMEOUT_SECONDS))

    started = time.monotonic()
    response = httpx.get(f"{gateway.url}/x", timeout=30)
    elapsed = time.monotonic() - started

    assert response.status_code == 504
    assert response.json() == {"message": "The upstream API did not answer in time"}
    assert elapsed < READ_TIMEOUT_SECONDS + 2.0
    assert_healthy(gateway)


@pytest.mark.parametrize("faulty_upstream", [reset_before_answer], indirect=True)
def test_proxy_reset_before_answer_502(make_config: Any, start_gateway: Any, faulty_upstream: TcpServer) -> None:
    gateway = start_gateway(make_config(faulty_upstream.url))

    response = httpx.get(f"{gateway.url}/x", timeout=30)

    assert response.status_code == 502
    assert_healthy(gateway)


@pytest.mark.parametrize("faulty_upstream", [reset_mid_body], indirect=True)
def test_proxy_reset_mid_body_cuts_connection(
    make_config: Any, start_gateway: Any, faulty_upstream: TcpServer, caplog: pytest.LogCaptureFixture
) -> None:
    gateway = start_gateway(make_config(faulty_upstream.url))

    with httpx.stream("GET", f"{gateway.url}/x", timeout=30) as response:
        status = response.status_code
        with pytest.raises(httpx.RemoteProtocolError):
            response.read()
    time.sleep(0.1)

    assert status == 200
    assert sample(gateway, "gateway_requests_total", {"outcome": "upstream_interrupted"}) == 1
    assert any("was cut, so the client connection is closed" in record.getMessage() for record in caplog.records)
    assert_healthy(gateway)
