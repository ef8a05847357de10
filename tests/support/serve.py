"""`python -m gateway serve` in a subprocess: wait until it is healthy."""

from __future__ import annotations

import subprocess
import time

import httpx

START_TIMEOUT_SECONDS = 60.0


def wait_until_healthy(url: str, process: subprocess.Popen[str]) -> None:
    """Return once `url`/healthz answers 200; raise AssertionError when the process exits or the timeout passes."""
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
