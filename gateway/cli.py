"""The `gateway` command line: serve, check-config and token administration.

Only this module reads argv, prints and chooses exit codes.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import signal
import sys
from collections.abc import Sequence
from typing import Any

from gateway.config import Config, load_config
from gateway.embedded import store_uri
from gateway.errors import ConfigError, GatewayError
from gateway.logs import configure_logging
from gateway.store import TokenStore, parse_user_id
from gateway.token_manager import TokenManager

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
CONFIG_FILE_VARIABLE = "GATEWAY_CONFIG_FILE"


def main(argv: Sequence[str] | None = None) -> int:
    parser = _build_parser()
    arguments = parser.parse_args(argv)
    if not hasattr(arguments, "run"):
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        return int(arguments.run(arguments))
    except ConfigError as exc:
        _print_config_problems(exc)
        return EXIT_USAGE
    except GatewayError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return 130


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gateway", description="API key gateway in front of an existing HTTP API.")
    commands = parser.add_subparsers(title="commands")

    serve = commands.add_parser("serve", help="run the gateway")
    _add_config_argument(serve)
    serve.add_argument("--host", help="listen address (overrides server.host)")
    serve.add_argument("--port", type=int, help="listen port (overrides server.port)")
    serve.add_argument("--workers", type=int, help="number of worker processes (overrides server.workers)")
    serve.set_defaults(run=_serve)

    check = commands.add_parser("check-config", help="validate a configuration and report every problem")
    _add_config_argument(check)
    check.set_defaults(run=_check_config)

    tokens = commands.add_parser("tokens", help="administer API tokens").add_subparsers(title="token commands")
    create = tokens.add_parser("create", help="create a token and print its plaintext on standard output")
    _add_config_argument(create)
    create.add_argument("--user", required=True, help="owner id; 24 hex digits are stored as an ObjectId")
    create.add_argument("--name", help="label shown in token lists (at most 255 characters)")
    create.add_argument("--expires-at", type=_parse_expiry, help="ISO-8601 expiry; a time without offset is UTC")
    create.add_argument(
        "--scope", action="append", dest="scopes", help="scope to grant; repeat for several (default: admin)"
    )
    create.add_argument("--json", action="store_true", help="print the token and its metadata as JSON")
    create.set_defaults(run=_create_token)
    return parser


def _add_config_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        default=os.environ.get(CONFIG_FILE_VARIABLE),
        help=f"TOML configuration file (default: ${CONFIG_FILE_VARIABLE}); "
        "GATEWAY_<SECTION>_<KEY> variables override it",
    )


def _load(arguments: argparse.Namespace) -> Config:
    return load_config(arguments.config)


def _check_config(arguments: argparse.Namespace) -> int:
    _load(arguments)
    print(f"The configuration is valid: {arguments.config or 'environment variables only'}.")
    return EXIT_OK


def _serve(arguments: argparse.Namespace) -> int:
    from gateway.server import run_server

    config = _load(arguments)
    configure_logging(config.logging)
    # uvicorn shuts down gracefully on SIGTERM, then raises the signal again
    # through the handler found at start. Exiting through SystemExit lets the
    # `with` block below stop the embedded store after the last usage flush.
    signal.signal(signal.SIGTERM, _exit_on_signal)
    with store_uri(config.store.uri, config.store.embedded_path) as uri:
        run_server(config, arguments.config, uri, host=arguments.host, port=arguments.port, workers=arguments.workers)
    return EXIT_OK


def _exit_on_signal(signal_number: int, frame: object) -> None:
    raise SystemExit(128 + signal_number)


def _create_token(arguments: argparse.Namespace) -> int:
    config = _load(arguments)
    configure_logging(config.logging, stream=sys.stderr)
    scopes = arguments.scopes or ["admin"]
    disallowed = sorted(set(scopes) - set(config.management.allowed_scopes))
    if disallowed:
        allowed = ", ".join(config.management.allowed_scopes)
        print(f"error: scope {', '.join(disallowed)} is not allowed; allowed scopes: {allowed}", file=sys.stderr)
        return EXIT_USAGE

    async def create(uri: str) -> tuple[str, dict[str, Any]]:
        store = TokenStore.connect(uri, config.store)
        try:
            await store.ensure_indexes()
            manager = TokenManager(store, config.tokens)
            return await manager.create(parse_user_id(arguments.user), arguments.name, arguments.expires_at, scopes)
        finally:
            await store.close()

    with store_uri(config.store.uri, config.store.embedded_path) as uri:
        plaintext, document = asyncio.run(create(uri))

    if arguments.json:
        print(json.dumps({"token": plaintext, **_printable(document)}))
    else:
        print(plaintext)
        print(
            f"Created token {document['_id']} ({document['token_prefix']}...) for user {arguments.user}.",
            file=sys.stderr,
        )
    return EXIT_OK


def _parse_expiry(text: str) -> datetime.datetime:
    try:
        value = datetime.datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an ISO-8601 date and time") from None
    if value.tzinfo is None:
        value = value.replace(tzinfo=datetime.UTC)
    if value <= datetime.datetime.now(datetime.UTC):
        raise argparse.ArgumentTypeError(f"{text!r} is in the past")
    return value.astimezone(datetime.UTC)


def _printable(document: dict[str, Any]) -> dict[str, Any]:
    shown = {key: value for key, value in document.items() if key != "token_hash"}
    shown["id"] = str(shown.pop("_id"))
    for key, value in shown.items():
        if isinstance(value, datetime.datetime):
            shown[key] = value.isoformat()
        elif not isinstance(value, str | int | float | bool | list | type(None)):
            shown[key] = str(value)
    return shown


def _print_config_problems(error: ConfigError) -> None:
    count = len(error.problems)
    print(f"The configuration is invalid ({count} problem{'s' if count > 1 else ''}):", file=sys.stderr)
    for problem in error.problems:
        print(f"  - {problem}", file=sys.stderr)
