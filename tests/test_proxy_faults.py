"""Upstream faults: refused, hung and reset connections leave the gateway healthy."""

from __future__ import annotations

import contextlib
import functools
import socket
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from gateway.coalescing import CoalescingHttpToolsProtocol
from gateway.embedded import free_port
from tests.support.faults import Handler, TcpServer, never_answer, reset_before_answer, reset_mid_body
from tests.support.servers import ThreadedServer

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


STALLED_STREAM_BYTES = 256 * 1024 * 1024
STALLED_CHUNK = b"x" * 65536


async def endless_download(scope: dict[str, Any], receive: Any, send: Any) -> None:
    # `/big` streams 256 MiB in 64 KiB chunks. Any other path responds at once.
    if scope["type"] != "http":
        return
    if scope["path"] != "/big":
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})
        return
    await send({"type": "http.response.start", "status": 200, "headers": []})
    for _ in range(STALLED_STREAM_BYTES // len(STALLED_CHUNK)):
        await send({"type": "http.response.body", "body": STALLED_CHUNK, "more_body": True})
    await send({"type": "http.response.body", "body": b""})


def test_proxy_stalled_reader_releases_upstream(make_config: Any, start_gateway: Any) -> None:
    upstream = ThreadedServer(endless_download, lifespan="off").start()
    try:
        config = make_config(upstream.url, upstream__max_connections=1)
        protocol = functools.partial(CoalescingHttpToolsProtocol, send_timeout=0.5)
        gateway = start_gateway(config, http=protocol)

        with socket.create_connection(("127.0.0.1", gateway.server.port), timeout=10) as stalled:
            stalled.sendall(b"GET /big HTTP/1.1\r\nHost: gateway\r\n\r\n")
            # The stalled client keeps the only upstream connection until the
            # gateway aborts it, and this request waits for it meanwhile.
            started = time.monotonic()
            answer = httpx.get(f"{gateway.url}/small", timeout=10)
            waited = time.monotonic() - started
            received = 0
            with contextlib.suppress(ConnectionResetError):
                while chunk := stalled.recv(1 << 20):
                    received += len(chunk)
    finally:
        upstream.stop()

    assert answer.status_code == 200
    # The pool timeout is 5 s, so the response came once the stalled client was aborted.
    assert waited < 5
    assert received < STALLED_STREAM_BYTES // 2
