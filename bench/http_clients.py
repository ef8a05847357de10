"""Compare upstream HTTP clients on loopback: which one should the proxy use?

    python -m bench.http_clients [--requests N] [--concurrency N]

Starts the trivial upstream (`bench.upstream`) under uvicorn with uvloop and
httptools, then sends `--requests` GETs (default 3,000), `--concurrency` at
a time (default 32), with each client in turn from this one process, and
prints requests per second and the ratio to aiohttp's `ClientSession`, all
from the same run. The last row is the gateway's own client
(`gateway.upstream`), which `gateway/proxy.py` uses. httpx on aiohttp's
transport needs the `httpx-aiohttp` package and is skipped when it is not
installed.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import httpx

from bench.processes import free_port, start_python
from gateway.upstream import ConnectionPool

DEFAULT_REQUESTS = 3_000
DEFAULT_CONCURRENCY = 32
WARM_UP_REQUESTS = 200

Fetch = Callable[[str], Awaitable[None]]


async def measure(fetch: Fetch, url: str, requests: int, concurrency: int) -> float:
    """Return the requests per second of `requests` calls of `fetch`, `concurrency` at a time."""
    remaining = iter(range(requests))

    async def worker() -> None:
        for _ in remaining:
            await fetch(url)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return requests / (time.perf_counter() - started)


async def with_aiohttp(url: str, requests: int, concurrency: int) -> float:
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def fetch(target: str) -> None:
            async with session.get(target) as response:
                await response.read()
                response.raise_for_status()

        await measure(fetch, url, WARM_UP_REQUESTS, concurrency)
        return await measure(fetch, url, requests, concurrency)


async def with_gateway_client(url: str, requests: int, concurrency: int) -> float:
    parts = httpx.URL(url)
    pool = ConnectionPool(parts.host, parts.port or 80, None, concurrency, connect_timeout=5, pool_timeout=30)
    head = b"GET " + parts.raw_path + b" HTTP/1.1\r\nHost: " + parts.netloc + b"\r\n\r\n"

    async def fetch(target: str) -> None:
        connection, _ = await pool.acquire()
        try:
            connection.start_exchange(is_head=False)
            connection.write(head)
            await connection.read_head(30)
            while not connection.is_message_complete:
                await connection.read_body(30)
        finally:
            pool.release(connection, connection.is_reusable)
        if connection.status != 200:
            raise RuntimeError(f"The upstream returned status {connection.status}, expected 200.")

    await measure(fetch, url, WARM_UP_REQUESTS, concurrency)
    rate = await measure(fetch, url, requests, concurrency)
    await pool.close()
    return rate


async def with_httpx(url: str, requests: int, concurrency: int, transport: httpx.AsyncBaseTransport | None) -> float:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, transport=transport) as client:

        async def fetch(target: str) -> None:
            response = await client.get(target)
            response.raise_for_status()

        await measure(fetch, url, WARM_UP_REQUESTS, concurrency)
        return await measure(fetch, url, requests, concurrency)


def aiohttp_transport() -> httpx.AsyncBaseTransport | None:
    try:
        from httpx_aiohttp import AiohttpTransport
    except ImportError:
        return None
    return AiohttpTransport()  # type: ignore[no-any-return]


async def compare(url: str, requests: int, concurrency: int) -> list[tuple[str, float | None]]:
    results: list[tuple[str, float | None]] = [
        ("httpx.AsyncClient", await with_httpx(url, requests, concurrency, None))
    ]
    transport = aiohttp_transport()
    rate = None if transport is None else await with_httpx(url, requests, concurrency, transport)
    results.append(("httpx on aiohttp's transport (httpx-aiohttp)", rate))
    results.append(("aiohttp.ClientSession", await with_aiohttp(url, requests, concurrency)))
    results.append(("gateway.upstream.ConnectionPool", await with_gateway_client(url, requests, concurrency)))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.http_clients", description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=DEFAULT_REQUESTS, help="GETs per client (default 3000)")
    parser.add_argument("--concurrency", type=int, default=DEFAULT_CONCURRENCY, help="requests in flight (default 32)")
    arguments = parser.parse_args()
    if not 1 <= arguments.requests <= 1_000_000 or not 1 <= arguments.concurrency <= 1_000:
        parser.error("--requests must be 1 to 1,000,000 and --concurrency 1 to 1,000")

    with tempfile.TemporaryDirectory(prefix="gateway-clients-") as directory:
        port = free_port()
        command = ["-m", "uvicorn", "bench.upstream:app", "--host", "127.0.0.1", "--port", str(port)]
        command += ["--loop", "uvloop", "--http", "httptools", "--no-access-log", "--log-level", "warning"]
        upstream = start_python("upstream", command, port, Path(directory))
        try:
            results = asyncio.run(compare(f"{upstream.url}/", arguments.requests, arguments.concurrency))
        finally:
            upstream.stop()

    reference = dict(results)["aiohttp.ClientSession"] or 1.0
    print(f"{arguments.requests} GETs, {arguments.concurrency} at a time, to a loopback uvicorn app:")
    for name, rate in results:
        if rate is None:
            print(f"  {name:<48} skipped: `pip install httpx-aiohttp` to measure it")
        else:
            print(f"  {name:<48} {rate:>8.0f} requests/s  {rate / reference:5.2f} of aiohttp")


if __name__ == "__main__":
    main()
