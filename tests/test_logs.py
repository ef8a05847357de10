"""Log output of `gateway serve` as an operator runs it: a subprocess on loopback."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import httpx

from gateway.embedded import free_port
from tests.conftest import TEST_SECRET
from tests.support.cli import REPOSITORY_ROOT
from tests.support.serve import wait_until_healthy


def serve_environment(mongodb_uri: str, database_name: str, upstream_url: str) -> dict[str, str]:
    return {
        **os.environ,
        "GATEWAY_TOKENS_SECRET": TEST_SECRET,
        "GATEWAY_STORE_URI": mongodb_uri,
        "GATEWAY_STORE_DATABASE": database_name,
        "GATEWAY_UPSTREAM_URL": upstream_url,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPOSITORY_ROOT), os.environ.get("PYTHONPATH")])),
    }


def start_serve(port: int, environ: dict[str, str]) -> subprocess.Popen[str]:
    command = [sys.executable, "-m", "gateway", "serve", "--host", "127.0.0.1", "--port", str(port)]
    return subprocess.Popen(command, env=environ, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def stop_serve(process: subprocess.Popen[str]) -> str:
    """Stop `gateway serve` with SIGTERM, as systemd does, and return its log."""
    process.send_signal(signal.SIGTERM)
    try:
        _, log = process.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        _, log = process.communicate(timeout=10)
    return log


def test_serve_never_logs_query_string(mongodb_uri: str, database_name: str) -> None:
    port = free_port()
    environ = serve_environment(mongodb_uri, database_name, upstream_url="")
    process = start_serve(port, environ)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(url, process)
        # Clients of older APIs sometimes put their key in the query string.
        answer = httpx.get(f"{url}/_auth?apikey=canary-key-in-query", timeout=10)
    finally:
        log = stop_serve(process)

    assert answer.status_code == 204
    assert "The gateway stopped." in log
    assert "canary-key-in-query" not in log


def test_serve_never_logs_upstream_password(mongodb_uri: str, database_name: str) -> None:
    port = free_port()
    # Nothing listens there: the test only starts and stops the gateway.
    upstream_url = f"http://svc:upstream-password@127.0.0.1:{free_port()}"
    process = start_serve(port, serve_environment(mongodb_uri, database_name, upstream_url))
    try:
        wait_until_healthy(f"http://127.0.0.1:{port}", process)
    finally:
        log = stop_serve(process)

    assert "The gateway is ready: upstream http://svc:[secure]@127.0.0.1:" in log
    assert "upstream-password" not in log
