"""The embedded token store: a SecantusDB server run as a child process.

SecantusDB speaks the MongoDB wire protocol, so the gateway talks to it with
the same pymongo code as to a MongoDB replica set. It is GPL-2.0 and runs as a
separate program (`secantusd-py`); the gateway never imports it.

Only one process may open a data folder. The process that starts the server
keeps an exclusive lock on `<embedded_path>/server.lock` and writes the
server's address to `<embedded_path>/server.json`. A CLI command that finds
the lock taken connects to that address instead of starting a second server.
`gateway serve` never borrows a server, because a borrowed server stops when
its owner exits.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import fcntl
import json
import logging
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from gateway.errors import StoreUnavailable

logger = logging.getLogger(__name__)

SERVER_COMMAND = "secantusd-py"
STARTUP_TIMEOUT_SECONDS = 30.0
STOP_TIMEOUT_SECONDS = 10.0
# How long `gateway serve` waits for a CLI command to release the data folder.
OWNER_WAIT_SECONDS = 15.0
PR_SET_PDEATHSIG = 1


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port that was free on `host` a moment ago."""
    with socket.socket() as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def mongodb_uri(host: str, port: int) -> str:
    # SecantusDB announces itself as a one-node replica set; a direct
    # connection skips replica-set discovery, which a single node does not need.
    return f"mongodb://{host}:{port}/?directConnection=true"


class EmbeddedStore:
    """Start or reach the SecantusDB server of a data folder."""

    def __init__(self, data_path: str | Path, host: str = "127.0.0.1", must_own: bool = False) -> None:
        self.data_path = Path(data_path).resolve()
        self.host = host
        # A long-running process (`gateway serve`) must own the server: a
        # server borrowed from another process stops when that one exits.
        self.must_own = must_own
        self.process: subprocess.Popen[bytes] | None = None
        self._lock_file: IO[str] | None = None
        self.uri = ""

    def start(self) -> str:
        """Return the URI of the folder's server, starting one when none runs.

        With `must_own`, waits up to `OWNER_WAIT_SECONDS` for another
        process's server to stop (a CLI command holds one for seconds), then
        starts its own. Raises `StoreUnavailable` when the server cannot be
        started or reached, or another process keeps the folder.
        """
        try:
            self.data_path.mkdir(parents=True, exist_ok=True)
            lock_file = open(self.data_path / "server.lock", "a+")  # noqa: SIM115 - held open while the server runs
        except OSError as exc:
            raise StoreUnavailable(
                f"The embedded store folder {str(self.data_path)!r} cannot be used: {exc.strerror}. "
                "Set store.embedded_path to a folder this user can write."
            ) from exc
        if not self._lock(lock_file):
            lock_file.close()
            if self.must_own:
                raise StoreUnavailable(
                    f"Another process keeps the embedded store in {self.data_path}: only one `gateway serve` "
                    "may use a data folder. Stop the other one, or give this one its own store.embedded_path."
                )
            self.uri = self._running_server_uri()
            return self.uri

        self._lock_file = lock_file
        try:
            self.uri = self._launch()
        except BaseException:
            self.stop()
            raise
        return self.uri

    def _lock(self, lock_file: IO[str]) -> bool:
        deadline = time.monotonic() + (OWNER_WAIT_SECONDS if self.must_own else 0)
        while True:
            try:
                fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    return False
                time.sleep(0.1)

    def stop(self) -> None:
        """Stop the server this object started, if any, and release the folder."""
        if self.process is not None:
            self._terminate(self.process)
            self.process = None
            with contextlib.suppress(FileNotFoundError):
                (self.data_path / "server.json").unlink()
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None

    def __enter__(self) -> EmbeddedStore:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _launch(self) -> str:
        command = _server_command()
        port = free_port(self.host)
        log_path = self.data_path / "secantusd.log"
        arguments = [
            *command,
            "--host", self.host,
            "--port", str(port),
            "--storage-path", str(self.data_path / "data"),
            "--log-level", "WARNING",
            "--noop-heartbeat-seconds", "10",
        ]  # fmt: skip
        with open(log_path, "ab") as log_file:
            self.process = subprocess.Popen(
                arguments,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                # Its own process group: Ctrl-C in a terminal reaches the
                # gateway, which then stops the store after the last flush.
                start_new_session=True,
                preexec_fn=_stop_with_parent,
            )
        _wait_until_listening(self.host, port, self.process, log_path)
        uri = mongodb_uri(self.host, port)
        (self.data_path / "server.json").write_text(json.dumps({"uri": uri, "pid": self.process.pid}))
        logger.info(
            "Started the embedded store (pid %d) on %s:%d with data in %s.",
            self.process.pid,
            self.host,
            port,
            self.data_path,
        )
        return uri

    def _running_server_uri(self) -> str:
        state_path = self.data_path / "server.json"
        deadline = time.monotonic() + STARTUP_TIMEOUT_SECONDS
        # The owner may still be starting the server: wait for its address.
        while time.monotonic() < deadline:
            with contextlib.suppress(FileNotFoundError, json.JSONDecodeError):
                return str(json.loads(state_path.read_text())["uri"])
            time.sleep(0.1)
        raise StoreUnavailable(
            f"Another process holds the embedded store in {self.data_path} but published no address in {state_path}."
        )

    def _terminate(self, process: subprocess.Popen[bytes]) -> None:
        if process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(STOP_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            logger.warning("The embedded store did not stop within %.0f s; killing it.", STOP_TIMEOUT_SECONDS)
            process.kill()
            process.wait()
        logger.info("Stopped the embedded store.")


def _stop_with_parent() -> None:
    # Linux only: the kernel sends SIGTERM to the store when the process
    # that started it dies, even by SIGKILL, so no orphan keeps the folder.
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _server_command() -> list[str]:
    # Prefer the script installed beside this interpreter, so a virtual
    # environment works without being activated.
    beside = Path(sys.executable).parent / SERVER_COMMAND
    if beside.exists():
        return [str(beside)]
    found = shutil.which(SERVER_COMMAND)
    if found:
        return [found]
    raise StoreUnavailable(
        f"{SERVER_COMMAND} was not found: install it with `pip install secantusdb`, or set store.uri to a MongoDB URI."
    )


def _wait_until_listening(host: str, port: int, process: subprocess.Popen[bytes], log_path: Path) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise StoreUnavailable(
                f"The embedded store exited with code {process.returncode} at start-up; see {log_path}."
            )
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
            return
        time.sleep(0.05)
    raise StoreUnavailable(
        f"The embedded store did not listen on {host}:{port} within {STARTUP_TIMEOUT_SECONDS:.0f} s; see {log_path}."
    )


@contextlib.contextmanager
def store_uri(uri: str, embedded_path: str, must_own: bool = False) -> Iterator[str]:
    """Yield a MongoDB URI for `uri`, running the embedded store while the block runs when `uri` is "embedded".

    `must_own` is for long-running processes; see `EmbeddedStore.start`.
    """
    if uri != "embedded":
        yield uri
        return
    with EmbeddedStore(embedded_path, must_own=must_own) as embedded:
        yield embedded.uri
