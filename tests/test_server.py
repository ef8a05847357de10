"""`gateway serve --workers 2` as an operator runs it: a subprocess on loopback with the embedded store."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from gateway.embedded import free_port
from tests.conftest import TEST_SECRET
from tests.support.cli import REPOSITORY_ROOT, run_cli

START_TIMEOUT_SECONDS = 60.0


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


def wait_until_healthy(url: str, process: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"gateway serve exited with code {process.returncode}: {process.communicate()[1]}")
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"gateway serve did not answer on {url} within {START_TIMEOUT_SECONDS:.0f} s.")


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
