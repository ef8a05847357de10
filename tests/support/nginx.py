"""Run a shipped deploy/nginx configuration under a real nginx on loopback ports.

The files are used as shipped, except for the placeholder values their
headers list (addresses, ports and paths), which are replaced here. A
placeholder missing from a file fails the test, so the files and this
module cannot drift apart silently.
"""

from __future__ import annotations

import os
import shutil
import socket
import ssl
import subprocess
import tempfile
import time
from pathlib import Path

from gateway.embedded import free_port
from tests.support.cli import REPOSITORY_ROOT

NGINX_CONFIG_FOLDER = REPOSITORY_ROOT / "deploy" / "nginx"
START_TIMEOUT_SECONDS = 20.0


def nginx_binary() -> str | None:
    """Return the path of the nginx binary, or None when nginx is not installed."""
    return shutil.which("nginx") or next(
        (path for path in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(path, os.X_OK)), None
    )


class NginxServer:
    """A non-daemon nginx child process serving one shipped configuration from a temporary prefix."""

    def __init__(self, config_name: str, gateway_port: int, api_port: int | None = None) -> None:
        binary = nginx_binary()
        if binary is None:
            raise RuntimeError("nginx is not installed.")
        self.binary = binary
        # Worker processes run as www-data when the tests run as root, so the
        # prefix must be readable by other users; mkdtemp makes it 0700.
        self.prefix = Path(tempfile.mkdtemp(prefix="gateway-nginx-"))
        self.prefix.chmod(0o755)
        self.http_port = free_port()
        self.https_port = free_port()
        self.config_path = self.prefix / "nginx.conf"
        self.config_path.write_text(self._render(config_name, gateway_port, api_port))
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.https_port}"

    def _render(self, config_name: str, gateway_port: int, api_port: int | None) -> str:
        for folder in ("tls", "temp", "logs"):
            (self.prefix / folder).mkdir(mode=0o755)
        _write_certificate(self.prefix / "tls")
        replacements = {
            "127.0.0.1:8080": f"127.0.0.1:{gateway_port}",
            "listen 80;": f"listen 127.0.0.1:{self.http_port};",
            "listen 443 ssl;": f"listen 127.0.0.1:{self.https_port} ssl;",
            "/etc/nginx/tls/": f"{self.prefix}/tls/",
            "/var/lib/nginx/": f"{self.prefix}/temp/",
            "/var/log/nginx/": f"{self.prefix}/logs/",
            "/run/nginx.pid": f"{self.prefix}/nginx.pid",
        }
        if api_port is not None:
            replacements["127.0.0.1:8000"] = f"127.0.0.1:{api_port}"

        text = (NGINX_CONFIG_FOLDER / config_name).read_text()
        for placeholder, value in replacements.items():
            if placeholder not in text:
                raise AssertionError(f"{config_name} no longer contains the placeholder {placeholder!r}.")
            text = text.replace(placeholder, value)
        return text

    def _command(self, *options: str) -> list[str]:
        return [self.binary, "-p", str(self.prefix), "-c", str(self.config_path), "-e", "stderr", *options]

    def check(self) -> None:
        """Run `nginx -t` on the rendered file; raise with nginx's output when it is invalid."""
        result = subprocess.run(self._command("-t"), capture_output=True, text=True, timeout=30)
        if result.returncode != 0:
            raise AssertionError(f"nginx -t failed:\n{result.stderr}")

    def start(self) -> NginxServer:
        self.check()
        # A file rather than a pipe, which nobody reads and which could fill up.
        with open(self.prefix / "logs" / "stderr.log", "wb") as stderr:
            self.process = subprocess.Popen(
                self._command("-g", "daemon off;"), stdout=subprocess.DEVNULL, stderr=stderr
            )
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while not _is_listening(self.https_port):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"nginx did not start: {self.error_output()}")
            time.sleep(0.02)
        return self

    def error_output(self) -> str:
        logs = [self.prefix / "logs" / name for name in ("stderr.log", "error.log")]
        return "".join(log.read_text() for log in logs if log.exists())

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            # SIGTERM is nginx's fast shutdown: the master stops its workers and exits.
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        shutil.rmtree(self.prefix, ignore_errors=True)


def _write_certificate(folder: Path) -> None:
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
            "-keyout",
            str(folder / "server.key"),
            "-out",
            str(folder / "server.crt"),
        ],
        check=True,
        capture_output=True,
        timeout=30,
    )


def _is_listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def raw_tls_request(port: int, data: bytes, timeout: float = 5) -> bytes:
    """Send raw bytes over TLS on a new connection; return everything read until it closes or times out."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with (
        socket.create_connection(("127.0.0.1", port), timeout=timeout) as connection,
        context.wrap_socket(connection) as tls,
    ):
        tls.sendall(data)
        chunks = []
        try:
            while True:
                chunk = tls.recv(65536)
                if not chunk:
                    break
                chunks.append(chunk)
        except (TimeoutError, ssl.SSLError):
            pass
    return b"".join(chunks)
