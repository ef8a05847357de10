"""Start the benchmark's servers as child processes and wait until they listen."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from gateway.embedded import free_port

REPOSITORY = Path(__file__).resolve().parent.parent
STARTUP_TIMEOUT_SECONDS = 30.0
STOP_TIMEOUT_SECONDS = 10.0

__all__ = ["REPOSITORY", "Server", "free_port", "start_python", "start_server"]


class Server:
    """A child process listening on a loopback port; its output goes to `log_path`."""

    def __init__(self, name: str, process: subprocess.Popen[bytes], port: int, log_path: Path) -> None:
        self.name = name
        self.process = process
        self.port = port
        self.log_path = log_path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(STOP_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def start_server(
    name: str,
    command: Sequence[str],
    port: int,
    log_dir: Path,
    environment: dict[str, str] | None = None,
    inherit: bool = True,
    cwd: Path = REPOSITORY,
) -> Server:
    """Run `command` in `cwd`; it must listen on 127.0.0.1:`port`, else RuntimeError is raised.

    The child gets this process's environment updated with `environment`,
    or `environment` alone when `inherit` is false.
    """
    log_path = log_dir / f"{name}.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            list(command),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(environment or {})} if inherit else dict(environment or {}),
            cwd=cwd,
        )
    server = Server(name, process, port, log_path)
    _wait_until_listening(server)
    return server


def start_python(
    name: str,
    arguments: Sequence[str],
    port: int,
    log_dir: Path,
    environment: dict[str, str] | None = None,
    inherit: bool = True,
    checkout: Path = REPOSITORY,
) -> Server:
    """Run this interpreter with `arguments` in `checkout`, which comes first on PYTHONPATH."""
    python_path = os.pathsep.join(filter(None, [str(checkout), os.environ.get("PYTHONPATH")]))
    environment = {**(environment or {}), "PYTHONPATH": python_path}
    return start_server(name, [sys.executable, *arguments], port, log_dir, environment, inherit, checkout)


def _wait_until_listening(server: Server) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"{server.name} exited with status {server.process.returncode}; see {server.log_path}.")
        try:
            with socket.create_connection(("127.0.0.1", server.port), timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    server.stop()
    raise RuntimeError(f"{server.name} did not listen on port {server.port} within {STARTUP_TIMEOUT_SECONDS:.0f} s.")
