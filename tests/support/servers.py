"""Real servers on loopback for tests: an ASGI app under uvicorn in a thread."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import uvicorn

from gateway.embedded import free_port


class ThreadedServer:
    """Run an ASGI app with uvicorn on a free loopback port in a background thread."""

    def __init__(
        self,
        app: Any,
        host: str = "127.0.0.1",
        loop_factory: Callable[[], asyncio.AbstractEventLoop] = asyncio.new_event_loop,
        **options: Any,
    ) -> None:
        self.host = host
        self.loop_factory = loop_factory
        self.port = free_port(host)
        options.setdefault("lifespan", "on")
        options.setdefault("log_level", "warning")
        # As in production: the gateway alone decides which peers may set X-Forwarded-*.
        options.setdefault("proxy_headers", False)
        # As in production: the gateway writes its own Date header and no Server header.
        options.setdefault("date_header", False)
        options.setdefault("server_header", False)
        config = uvicorn.Config(app, host=host, port=self.port, access_log=False, **options)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.loop: asyncio.AbstractEventLoop | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def _run(self) -> None:
        self.loop = self.loop_factory()
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self.server.serve())
        self._cancel_remaining_tasks()
        self.loop.close()

    def _cancel_remaining_tasks(self) -> None:
        # As asyncio.run() does: tasks still running (a driver's monitor in
        # the middle of a connection attempt) get to close their sockets.
        assert self.loop is not None
        tasks = asyncio.all_tasks(self.loop)
        for task in tasks:
            task.cancel()
        self.loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
        self.loop.run_until_complete(self.loop.shutdown_asyncgens())

    def start(self) -> ThreadedServer:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"The test server on port {self.port} did not start.")
            time.sleep(0.01)
        return self

    def call(self, coroutine: Any, timeout: float = 10) -> Any:
        """Run `coroutine` on the server's event loop and return its result."""
        if self.loop is None:
            raise RuntimeError("The server is not running.")
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


def raw_request(port: int, data: bytes, host: str = "127.0.0.1", timeout: float = 5) -> bytes:
    """Send raw bytes on a new connection and return everything read until it closes or times out."""
    with socket.create_connection((host, port), timeout=timeout) as connection:
        connection.sendall(data)
        chunks = []
        try:
            while True:
                chunk = connection.recv(65536)
                if not chunk:
                    break
                chunks.append(chunk)
        except TimeoutError:
            pass
    return b"".join(chunks)
