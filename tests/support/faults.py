"""Faulty servers on loopback: a store process to stop and restart, silent and broken TCP peers.

Every server here listens on 127.0.0.1 only, on a port chosen at start.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx

from gateway.embedded import free_port, mongodb_uri

REPOSITORY_ROOT = Path(__file__).resolve().parents[2]
Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class StoreProcess:
    """A SecantusDB server on a fixed loopback port and data folder, which a test stops and restarts."""

    def __init__(self, data_path: Path, port: int | None = None, *extra_arguments: str) -> None:
        self.data_path = data_path
        self.port = port or free_port()
        self.extra_arguments = extra_arguments
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def uri(self) -> str:
        return mongodb_uri("127.0.0.1", self.port)

    def start(self) -> StoreProcess:
        command = Path(sys.executable).parent / "secantusd-py"
        executable = str(command) if command.exists() else shutil.which("secantusd-py") or "secantusd-py"
        arguments = [executable, "--host", "127.0.0.1", "--port", str(self.port)]
        arguments += ["--storage-path", str(self.data_path), "--log-level", "ERROR", *self.extra_arguments]
        self.process = subprocess.Popen(arguments, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        wait_for_port(self.port, self.process)
        return self

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None


def wait_for_port(port: int, process: subprocess.Popen[Any], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"The process for port {port} exited with code {process.returncode}.")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return
        time.sleep(0.05)
    raise RuntimeError(f"Nothing listened on port {port} within {timeout} s.")


class TcpServer:
    """An asyncio TCP server on a free loopback port, run in a thread, calling `handler` per connection."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.port = free_port()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.connections = 0
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> TcpServer:
        self.thread.start()
        future = asyncio.run_coroutine_threadsafe(self._serve(), self.loop)
        self._server = future.result(10)
        return self

    async def _serve(self) -> asyncio.Server:
        return await asyncio.start_server(self._accept, "127.0.0.1", self.port)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.append(writer)
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            await self.handler(reader, writer)

    def stop(self) -> None:
        async def close() -> None:
            if self._server is not None:
                self._server.close()
            for writer in self._writers:
                writer.close()
            # Cancel the handlers (a relay holds a second socket each), then
            # give the transports one more loop turn to close their sockets.
            handlers = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
            for task in handlers:
                task.cancel()
            await asyncio.gather(*handlers, return_exceptions=True)
            await asyncio.sleep(0.05)

        asyncio.run_coroutine_threadsafe(close(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


async def never_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Accept, read whatever comes, and never write a byte: a hung peer."""
    while await reader.read(65536):
        pass


class Relay:
    """Forward TCP connections to `target_port`, holding every reply for `delay` seconds (a slow peer)."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.delay = 0.0

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        target_reader, target_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        try:
            await asyncio.gather(self._pipe(reader, target_writer, 0.0), self._pipe(target_reader, writer, None))
        finally:
            target_writer.close()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float | None) -> None:
        while chunk := await reader.read(65536):
            await asyncio.sleep(self.delay if delay is None else delay)
            writer.write(chunk)
            await writer.drain()
        writer.close()


async def reset_mid_body(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Respond 200 with a 100,000-byte Content-Length, send 1,000 bytes, then reset the connection."""
    await reader.readuntil(b"\r\n\r\n")
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\nContent-Type: text/plain\r\n\r\n" + b"x" * 1000)
    await writer.drain()
    await asyncio.sleep(0.2)
    reset(writer)


async def reset_before_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Read the request head, then reset the connection without a byte of response."""
    await reader.readuntil(b"\r\n\r\n")
    reset(writer)


def reset(writer: asyncio.StreamWriter) -> None:
    # SO_LINGER with a zero timeout makes close() send RST instead of FIN.
    connection = writer.get_extra_info("socket")
    connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class GatewayProcess:
    """`python -m gateway serve` in a subprocess with this checkout first on the import path."""

    def __init__(self, environ: dict[str, str]) -> None:
        self.port = free_port()
        environment = {**os.environ, **environ, "GATEWAY_SERVER_PORT": str(self.port)}
        environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPOSITORY_ROOT), os.environ.get("PYTHONPATH")]))
        # A file, not a pipe: a pipe nobody reads would block the gateway once full.
        self.log_file = tempfile.TemporaryFile()  # noqa: SIM115 - closed by running_gateways
        self.process = subprocess.Popen(
            [sys.executable, "-m", "gateway", "serve"],
            env=environment,
            stdin=subprocess.DEVNULL,
            stdout=self.log_file,
            stderr=subprocess.STDOUT,
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 30) -> GatewayProcess:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"The gateway exited with code {self.process.returncode}: {self.read_output()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return self
            time.sleep(0.05)
        raise RuntimeError(f"The gateway did not answer /healthz within {timeout} s.")

    def terminate(self, timeout: float = 30) -> int:
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise

    def read_output(self) -> str:
        self.log_file.seek(0)
        return self.log_file.read().decode(errors="replace")


@contextlib.contextmanager
def running_gateways(*environs: dict[str, str]) -> Iterator[list[GatewayProcess]]:
    """Start one gateway process per environment; stop them all afterwards."""
    gateways = [GatewayProcess(environ) for environ in environs]
    try:
        for gateway in gateways:
            gateway.wait_ready()
        yield gateways
    finally:
        for gateway in gateways:
            if gateway.process.poll() is None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    gateway.terminate()
            gateway.log_file.close()
