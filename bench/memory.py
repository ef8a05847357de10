"""Measure the gateway's resident memory while 1 GiB streams up and 1 GiB streams down through it.

Starts an upstream (aiohttp.web, in this process) and the gateway
(`python -m gateway serve`, a subprocess with its embedded store) on
loopback, uploads and then downloads `--size-mib` MiB through the gateway,
and samples the gateway process's VmRSS from /proc every 50 ms (Linux only).
Prints the idle RSS after a warm-up request, the peak during each transfer
and the difference. The whole run is bounded by `--timeout` seconds.

    python bench/memory.py [--size-mib 1024] [--timeout 600]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
from aiohttp import web

REPOSITORY_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPOSITORY_ROOT))

from gateway.embedded import free_port  # noqa: E402

BLOCK = os.urandom(1024 * 1024)
SAMPLE_SECONDS = 0.05


def resident_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"No VmRSS line for process {pid}.")


class PeakSampler:
    """Sample a process's RSS in the background and keep the maximum."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = 0.0
        self.task: asyncio.Task[None] | None = None

    async def _sample(self) -> None:
        while True:
            self.peak = max(self.peak, resident_mib(self.pid))
            await asyncio.sleep(SAMPLE_SECONDS)

    def __enter__(self) -> PeakSampler:
        self.peak = resident_mib(self.pid)
        self.task = asyncio.get_running_loop().create_task(self._sample())
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.task is not None:
            self.task.cancel()
        self.peak = max(self.peak, resident_mib(self.pid))


async def start_upstream(size: int) -> tuple[web.AppRunner, int]:
    async def upload(request: web.Request) -> web.Response:
        received = 0
        async for chunk in request.content.iter_any():
            received += len(chunk)
        return web.json_response({"received": received})

    async def download(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        response.content_length = size
        await response.prepare(request)
        sent = 0
        while sent < size:
            block = BLOCK[: size - sent]
            await response.write(block)
            sent += len(block)
        await response.write_eof()
        return response

    app = web.Application(client_max_size=size + 1)
    app.router.add_post("/upload", upload)
    app.router.add_get("/download", download)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port("127.0.0.1")
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, port


def start_gateway(upstream_port: int, data_path: str) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port("127.0.0.1")
    environment = {
        **os.environ,
        "PYTHONPATH": str(REPOSITORY_ROOT),
        "GATEWAY_TOKENS_SECRET": "memory-benchmark-secret-0123456789",
        "GATEWAY_STORE_URI": "embedded",
        "GATEWAY_STORE_EMBEDDED_PATH": data_path,
        "GATEWAY_UPSTREAM_URL": f"http://127.0.0.1:{upstream_port}",
        "GATEWAY_LOGGING_LEVEL": "warning",
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "gateway", "serve", "--host", "127.0.0.1", "--port", str(port)], env=environment
    )
    return process, port


async def wait_until_ready(url: str, deadline: float) -> None:
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            try:
                async with session.get(f"{url}/healthz") as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.2)
    raise RuntimeError(f"The gateway at {url} did not start in time.")


async def upload_body(size: int) -> AsyncIterator[bytes]:
    sent = 0
    while sent < size:
        block = BLOCK[: size - sent]
        yield block
        sent += len(block)


async def transfer(url: str, size: int, pid: int) -> dict[str, float]:
    timeout = aiohttp.ClientTimeout(total=None, sock_read=60)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        async with session.get(f"{url}/healthz") as response:
            await response.read()
        await asyncio.sleep(1)
        idle = resident_mib(pid)

        started = time.monotonic()
        with PeakSampler(pid) as upload_peak:
            headers = {"Content-Length": str(size), "Content-Type": "application/octet-stream"}
            async with session.post(f"{url}/upload", data=upload_body(size), headers=headers) as response:
                received = (await response.json())["received"]
        upload_seconds = time.monotonic() - started
        if received != size:
            raise RuntimeError(f"The upstream received {received} bytes instead of {size}.")

        started = time.monotonic()
        downloaded = 0
        with PeakSampler(pid) as download_peak:
            async with session.get(f"{url}/download") as response:
                async for chunk in response.content.iter_any():
                    downloaded += len(chunk)
        download_seconds = time.monotonic() - started
        if downloaded != size:
            raise RuntimeError(f"The client received {downloaded} bytes instead of {size}.")

    return {
        "idle": idle,
        "upload_peak": upload_peak.peak,
        "upload_seconds": upload_seconds,
        "download_peak": download_peak.peak,
        "download_seconds": download_seconds,
    }


async def run(size_mib: int, timeout: float) -> None:
    size = size_mib * 1024 * 1024
    deadline = time.monotonic() + timeout
    runner, upstream_port = await start_upstream(size)
    with tempfile.TemporaryDirectory() as data_path:
        process, port = start_gateway(upstream_port, data_path)
        try:
            url = f"http://127.0.0.1:{port}"
            await wait_until_ready(url, min(deadline, time.monotonic() + 60))
            result = await asyncio.wait_for(transfer(url, size, process.pid), deadline - time.monotonic())
        finally:
            process.terminate()
            process.wait(30)
            await runner.cleanup()

    print(f"Gateway RSS, {size_mib} MiB each way through loopback (VmRSS sampled every 50 ms):")
    print(f"  idle after warm-up:   {result['idle']:7.1f} MiB")
    for direction in ("upload", "download"):
        peak = result[f"{direction}_peak"]
        seconds = result[f"{direction}_seconds"]
        print(
            f"  {direction:<8} peak:        {peak:7.1f} MiB  (+{peak - result['idle']:.1f} MiB over idle, "
            f"{size_mib / seconds:.0f} MiB/s, {seconds:.1f} s)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=1024, help="MiB to send each way (default: 1024)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds the whole run may take (default: 600)")
    arguments = parser.parse_args()
    asyncio.run(run(arguments.size_mib, arguments.timeout))


if __name__ == "__main__":
    main()
