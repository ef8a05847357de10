"""Run the gateway on the embedded store in front of httpbin, with a first token.

Started by `make demo`. Everything listens on loopback; Ctrl-C stops it all.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "demo-data"
DEMO_USER = "000000000000000000000001"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_for_port(port: int, process: subprocess.Popen[bytes], name: str) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            sys.exit(f"{name} exited with code {process.returncode} at start-up.")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    sys.exit(f"{name} did not listen on port {port} within 30 s.")


def demo_environment(upstream_port: int, gateway_port: int) -> dict[str, str]:
    DATA.mkdir(exist_ok=True)
    secret_file = DATA / "secret"
    if not secret_file.exists():
        secret_file.write_text(secrets.token_urlsafe(48))
        secret_file.chmod(0o600)
    return {
        **os.environ,
        "GATEWAY_TOKENS_SECRET": secret_file.read_text().strip(),
        "GATEWAY_UPSTREAM_URL": f"http://127.0.0.1:{upstream_port}",
        "GATEWAY_SERVER_PORT": str(gateway_port),
        "GATEWAY_STORE_EMBEDDED_PATH": str(DATA / "store"),
        # The demo has no user collection to check owners against.
        "GATEWAY_STORE_USERS_COLLECTION": "",
    }


def main() -> None:
    upstream_port, gateway_port = free_port(), free_port()
    environment = demo_environment(upstream_port, gateway_port)
    python = sys.executable
    processes: list[subprocess.Popen[bytes]] = []
    try:
        httpbin = subprocess.Popen(
            [python, "-m", "httpbin.core", "--port", str(upstream_port)], stderr=subprocess.DEVNULL
        )
        processes.append(httpbin)
        wait_for_port(upstream_port, httpbin, "httpbin")

        gateway = subprocess.Popen([python, "-m", "gateway", "serve"], env=environment)
        processes.append(gateway)
        wait_for_port(gateway_port, gateway, "The gateway")

        token = subprocess.run(
            [python, "-m", "gateway", "tokens", "create", "--user", DEMO_USER, "--name", "demo"],
            env=environment,
            check=True,
            stdout=subprocess.PIPE,
            text=True,
        ).stdout.strip()

        print(f"\nThe gateway listens on http://127.0.0.1:{gateway_port} in front of httpbin.")
        print("Try it (httpbin echoes the headers it received):\n")
        print(f"  curl -s -H 'X-API-KEY: {token}' http://127.0.0.1:{gateway_port}/headers")
        print(f"  curl -s -i -H 'X-API-KEY: wrong' http://127.0.0.1:{gateway_port}/headers\n")
        print(f"Data, token secret and store log are in {DATA}. Press Ctrl-C to stop.\n")
        gateway.wait()
    except KeyboardInterrupt:
        pass
    finally:
        for process in reversed(processes):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in reversed(processes):
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()


if __name__ == "__main__":
    if shutil.which("curl") is None:
        print("curl is not installed: use any HTTP client with the printed header.", file=sys.stderr)
    main()
