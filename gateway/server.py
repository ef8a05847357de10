"""Run the ASGI application under uvicorn or granian, in one or several worker processes.

uvicorn (with uvloop and httptools) is the default. granian is the faster
option measured by `bench/run.py`; the README lists what each server accepts.
"""

from __future__ import annotations

import functools
import logging
import math
import os

import uvicorn

from gateway.app import GatewayApp
from gateway.coalescing import CoalescingHttpToolsProtocol
from gateway.config import Config, load_config, mask_password
from gateway.logs import configure_logging

logger = logging.getLogger(__name__)

CONFIG_FILE_VARIABLE = "GATEWAY_CONFIG_FILE"
STORE_URI_VARIABLE = "GATEWAY_STORE_URI"
APP_FACTORY = "gateway.server:create_app"


def create_app() -> GatewayApp:
    """Build the application from `$GATEWAY_CONFIG_FILE` and `GATEWAY_*` variables.

    Worker processes call this factory, so each worker reads the same
    configuration that the parent process validated.
    """
    config = load_config(os.environ.get(CONFIG_FILE_VARIABLE) or None)
    configure_logging(config.logging)
    return GatewayApp(config)


def run_server(
    config: Config,
    config_path: str | None,
    uri: str,
    host: str | None = None,
    port: int | None = None,
    workers: int | None = None,
) -> None:
    """Serve until interrupted, with the store at `uri`; blocks."""
    # Workers rebuild the configuration from the environment, so the resolved
    # store address and the file travel there.
    if config_path:
        os.environ[CONFIG_FILE_VARIABLE] = os.path.abspath(config_path)
    os.environ[STORE_URI_VARIABLE] = uri
    host = host or config.server.host
    port = config.server.port if port is None else port
    workers = workers or config.server.workers
    logger.info(
        "Serving with %s on http://%s:%d with %d worker(s), upstream %s.",
        config.server.server,
        host,
        port,
        workers,
        mask_password(config.upstream.url) or "(none)",
    )

    if config.server.server == "granian":
        _run_granian(config, host, port, workers)
    else:
        _run_uvicorn(config, host, port, workers)


def _run_uvicorn(config: Config, host: str, port: int, workers: int) -> None:
    uvicorn.run(
        APP_FACTORY,
        factory=True,
        host=host,
        port=port,
        workers=workers,
        loop="uvloop",
        # httptools, sending each small response in one socket write
        # (gateway/coalescing.py). uvicorn calls `http` to make each
        # connection's protocol, and spawned workers unpickle the partial.
        http=functools.partial(CoalescingHttpToolsProtocol, send_timeout=config.server.send_timeout_seconds),  # type: ignore[arg-type]
        lifespan="on",
        # The gateway decides itself which peers may set forwarding headers.
        proxy_headers=False,
        server_header=False,
        # Forwarded responses carry the upstream's Date; the gateway adds one
        # to the others itself (gateway/http_date.py).
        date_header=False,
        access_log=False,
        log_config=None,
        # uvicorn takes whole seconds; rounding up never cuts a request early.
        timeout_graceful_shutdown=math.ceil(config.server.shutdown_timeout_seconds),
    )


def _run_granian(config: Config, host: str, port: int, workers: int) -> None:
    # Imported here because granian is an optional dependency (the `granian` extra).
    from granian import Granian
    from granian.constants import HTTPModes, Interfaces, Loops

    Granian(
        APP_FACTORY,
        factory=True,
        address=host,
        port=port,
        interface=Interfaces.ASGI,
        workers=workers,
        loop=Loops.uvloop,
        # HTTP/1.1 only, as under uvicorn: nginx and load balancers speak it to upstreams.
        http=HTTPModes.http1,
        log_access=False,
        workers_kill_timeout=max(1, int(config.server.shutdown_timeout_seconds)),
    ).serve()
