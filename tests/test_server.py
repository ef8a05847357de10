"""`gateway serve` as an operator runs it: subprocesses on loopback, under each supported server."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.embedded import free_port
from tests.conftest import TEST_SECRET
from tests.support.cli import REPOSITORY_ROOT, run_cli
from tests.support.serve import wait_until_healthy
from tests.support.servers import ThreadedServer, raw_request
from tests.support.upstream import EchoUpstream, header_values


def child_processes(parent: int) -> dict[int, str]:
    """Return the command lines of `parent`'s living children, read from /proc (Linux)."""
    children = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            # The parent id is the 4th field, after the command name in parentheses.
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == parent and fields[0] != "Z":
                children[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, IndexError, ValueError):
            continue
    return children


def test_serve_two_workers_share_embedded_store(tmp_path: Path) -> None:
    port = free_port()
    environ = {
        **os.environ,
        "GATEWAY_TOKENS_SECRET": TEST_SECRET,
        "GATEWAY_STORE_URI": "embedded",
        "GATEWAY_STORE_EMBEDDED_PATH": str(tmp_path / "store"),
        "GATEWAY_UPSTREAM_URL": "",
        # The owner is a service account with no user document.
        "GATEWAY_STORE_USERS_COLLECTION": "",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPOSITORY_ROOT), os.environ.get("PYTHONPATH")])),
    }
    command = [sys.executable, "-m", "gateway", "serve", "--host", "127.0.0.1", "--port", str(port), "--workers", "2"]
    process = subprocess.Popen(command, env=environ, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(url, process)
        workers = [pid for pid, line in child_processes(process.pid).items() if "spawn_main" in line]
        created = run_cli("tokens", "create", "--user", "worker-test", environ=environ)
        assert created.returncode == 0, created.stderr
        plaintext = created.stdout.strip()

        # A new connection for each request, so that the kernel spreads them over both workers.
        answers = [httpx.get(f"{url}/_auth", headers={"X-API-KEY": plaintext}, timeout=10) for _ in range(10)]
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
        if process.stderr is not None:
            process.stderr.close()

    assert len(workers) == 2
    assert [(answer.status_code, answer.headers.get("x-auth-error")) for answer in answers] == [(204, None)] * 10
    assert {answer.headers["x-authenticated-user"] for answer in answers} == {"worker-test"}
    assert child_processes(process.pid) == {}


@pytest.fixture
def h11_upstream() -> Iterator[tuple[EchoUpstream, ThreadedServer]]:
    # h11 passes any token as a method, so the upstream never decides what the gateway's server let through.
    app = EchoUpstream()
    server = ThreadedServer(app, http="h11").start()
    yield app, server
    server.stop()


@pytest.mark.parametrize("server", ["uvicorn", "granian"])
def test_serve_forwards_authenticated_request(
    server: str,
    serve_gateway: Callable[[str, str], int],
    h11_upstream: tuple[EchoUpstream, ThreadedServer],
    seed_user: Callable[..., Any],
    seed_token: Callable[..., Any],
) -> None:
    upstream, upstream_server = h11_upstream
    user_id = seed_user()
    key, _ = seed_token(user_id)
    port = serve_gateway(server, upstream_server.url)

    request = urllib.request.Request(f"http://127.0.0.1:{port}/data?page=2", headers={"X-API-KEY": key})
    with urllib.request.urlopen(request, timeout=10) as response:
        seen = json.loads(response.read())

    assert seen["raw_path"] == "/data"
    assert seen["query_string"] == "page=2"
    assert header_values(seen, "x-authenticated-user") == [str(user_id)]
    assert header_values(seen, "x-api-key") == []
    assert len(upstream.requests) == 1


@pytest.mark.parametrize(
    ("server", "expected_status", "forwarded_methods"),
    [
        # httptools parses only the methods in llhttp's list and answers 400 itself.
        ("uvicorn", b"400", []),
        # granian hands any method token to the application.
        ("granian", b"200", ["BREW"]),
    ],
)
def test_serve_unknown_method(
    server: str,
    expected_status: bytes,
    forwarded_methods: list[str],
    serve_gateway: Callable[[str, str], int],
    h11_upstream: tuple[EchoUpstream, ThreadedServer],
    seed_user: Callable[..., Any],
    seed_token: Callable[..., Any],
) -> None:
    upstream, upstream_server = h11_upstream
    key, _ = seed_token(seed_user())
    port = serve_gateway(server, upstream_server.url)

    request = f"BREW /pot HTTP/1.1\r\nHost: gateway\r\nX-API-KEY: {key}\r\nConnection: close\r\n\r\n"
    response = raw_request(port, request.encode())

    assert response.split(b" ")[1] == expected_status
    assert [seen["method"] for seen in upstream.requests] == forwarded_methods
