"""Shutdown under traffic: `gateway serve` gets SIGTERM while requests are in flight."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.conftest import TEST_SECRET
from tests.support.faults import GatewayProcess, running_gateways
from tests.support.servers import ThreadedServer

IN_FLIGHT_REQUESTS = 10


class SlowUpstream:
    """ASGI app that answers 200 after `delay` seconds and counts the requests that arrived."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.arrived = 0

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        self.arrived += 1
        await asyncio.sleep(self.delay)
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})


@pytest.fixture
def slow_upstream(request: pytest.FixtureRequest) -> Iterator[tuple[SlowUpstream, ThreadedServer]]:
    app = SlowUpstream(request.param)
    server = ThreadedServer(app, lifespan="off", timeout_graceful_shutdown=1).start()
    yield app, server
    server.stop()


def serve_environ(mongodb_uri: str, database_name: str, upstream_url: str, shutdown_timeout: float) -> dict[str, str]:
    return {
        "GATEWAY_TOKENS_SECRET": TEST_SECRET,
        "GATEWAY_STORE_URI": mongodb_uri,
        "GATEWAY_STORE_DATABASE": database_name,
        "GATEWAY_UPSTREAM_URL": upstream_url,
        "GATEWAY_SERVER_SHUTDOWN_TIMEOUT_SECONDS": str(shutdown_timeout),
        # Only the shutdown flush can write the usage records of this test.
        "GATEWAY_MANAGEMENT_USAGE_FLUSH_SECONDS": "600",
        "GATEWAY_LOGGING_LEVEL": "warning",
    }


async def send_all(url: str, keys: list[str]) -> list[int | str]:
    async with httpx.AsyncClient(timeout=30) as client:
        requests = [client.get(f"{url}/x", headers={"X-API-KEY": key}) for key in keys]
        answers = await asyncio.gather(*requests, return_exceptions=True)
    return [answer.status_code if isinstance(answer, httpx.Response) else type(answer).__name__ for answer in answers]


async def terminate_when_arrived(gateway: GatewayProcess, upstream: SlowUpstream, count: int) -> float:
    while upstream.arrived < count:
        await asyncio.sleep(0.01)
    started = time.monotonic()
    await asyncio.to_thread(gateway.terminate)
    return time.monotonic() - started


@pytest.mark.parametrize("slow_upstream", [1.0], indirect=True)
def test_server_shutdown_finishes_in_flight_and_flushes_usage(
    mongodb_uri: str, database_name: str, slow_upstream: Any, seed_user: Any, seed_token: Any, mongo: Any
) -> None:
    upstream, server = slow_upstream
    user = seed_user()
    tokens = [seed_token(user) for _ in range(IN_FLIGHT_REQUESTS)]
    environ = serve_environ(mongodb_uri, database_name, server.url, shutdown_timeout=10)

    async def scenario(gateway: GatewayProcess) -> tuple[list[int | str], float]:
        return await asyncio.gather(
            send_all(gateway.url, [plaintext for plaintext, _ in tokens]),
            terminate_when_arrived(gateway, upstream, IN_FLIGHT_REQUESTS),
        )

    with running_gateways(environ) as (gateway,):
        statuses, stop_seconds = asyncio.run(scenario(gateway))
        output = gateway.read_output()

    assert statuses == [200] * IN_FLIGHT_REQUESTS, output
    assert stop_seconds < 10
    used = mongo.api_token.count_documents({"user": user, "last_used_at": {"$ne": None}})
    assert used == IN_FLIGHT_REQUESTS, output


@pytest.mark.parametrize("slow_upstream", [60.0], indirect=True)
def test_server_shutdown_bounded_by_timeout(
    mongodb_uri: str, database_name: str, slow_upstream: Any, seed_user: Any, seed_token: Any
) -> None:
    upstream, server = slow_upstream
    plaintext, _ = seed_token(seed_user())
    environ = serve_environ(mongodb_uri, database_name, server.url, shutdown_timeout=1)

    async def scenario(gateway: GatewayProcess) -> tuple[list[int | str], float]:
        return await asyncio.gather(send_all(gateway.url, [plaintext]), terminate_when_arrived(gateway, upstream, 1))

    with running_gateways(environ) as (gateway,):
        statuses, stop_seconds = asyncio.run(scenario(gateway))

    assert statuses != [200]
    # One second of grace, then the store's final flush and process exit.
    assert stop_seconds < 1 + 5
