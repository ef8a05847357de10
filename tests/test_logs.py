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
from tests.test_server import wait_until_healthy


def test_serve_never_logs_query_string(mongodb_uri: str, database_name: str) -> None:
    port = free_port()
    environ = {
        **os.environ,
        "GATEWAY_TOKENS_SECRET": TEST_SECRET,
        "GATEWAY_STORE_URI": mongodb_uri,
        "GATEWAY_STORE_DATABASE": database_name,
        "GATEWAY_UPSTREAM_URL": "",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPOSITORY_ROOT), os.environ.get("PYTHONPATH")])),
    }
    command = [sys.executable, "-m", "gateway", "serve", "--host", "127.0.0.1", "--port", str(port)]
    process = subprocess.Popen(command, env=environ, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(url, process)
        # Clients of older APIs sometimes put their key in the query string.
        answer = httpx.get(f"{url}/_auth?apikey=canary-key-in-query", timeout=10)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            _, log = process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            _, log = process.communicate(timeout=10)

    assert answer.status_code == 204
    assert "The gateway stopped." in log
    assert "canary-key-in-query" not in log
