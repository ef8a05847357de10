"""The `gateway` command line: serve, check-config, token administration and the legacy key migration.

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
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from bson import ObjectId

from gateway.config import Config, load_config
from gateway.console import ProgressDisplay, migration_summary
from gateway.embedded import store_uri
from gateway.errors import ConfigError, GatewayError
from gateway.legacy_keys import LegacyKeyStore
from gateway.logs import configure_logging
from gateway.migration import DEFAULT_BATCH_SIZE, LegacyKeyMigration, MigrationReport
from gateway.store import TokenStore, is_usable_user_id, parse_user_id
from gateway.token_manager import RevokeOutcome, TokenManager
from gateway.token_request import parse_token_name
from gateway.token_views import iso, listed_token

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
CONFIG_FILE_VARIABLE = "GATEWAY_CONFIG_FILE"

T = TypeVar("T")


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
    serve.add_argument("--port", type=_port, help="listen port, 0 to 65535 (overrides server.port)")
    serve.add_argument(
        "--workers", type=_positive_integer, help="number of worker processes (overrides server.workers)"
    )
    serve.set_defaults(run=_serve)

    check = commands.add_parser("check-config", help="validate a configuration and report every problem")
    _add_config_argument(check)
    check.set_defaults(run=_check_config)

    tokens = commands.add_parser("tokens", help="administer API tokens").add_subparsers(title="token commands")
    create = tokens.add_parser("create", help="create a token and print its plaintext on standard output")
    _add_config_argument(create)
    create.add_argument(
        "--user", required=True, type=_parse_user, help="owner id; 24 hex digits are stored as an ObjectId"
    )
    create.add_argument(
        "--name", type=_parse_name, help="label shown in token lists (at most 255 characters, no control characters)"
    )
    create.add_argument("--expires-at", type=_parse_expiry, help="ISO-8601 expiry; a time without offset is UTC")
    create.add_argument(
        "--scope", action="append", dest="scopes", help="scope to grant; repeat for several (default: admin)"
    )
    create.add_argument("--json", action="store_true", help="print the token and its metadata as JSON")
    create.set_defaults(run=_create_token)

    listing = tokens.add_parser("list", help="list a user's tokens that are not revoked, newest first")
    _add_config_argument(listing)
    listing.add_argument("--user", required=True, help="owner id; 24 hex digits are read as an ObjectId")
    listing.add_argument("--json", action="store_true", help="print a JSON array, as the management route does")
    listing.set_defaults(run=_list_tokens)

    revoke = tokens.add_parser("revoke", help="revoke a token; its document is kept for audit")
    _add_config_argument(revoke)
    revoke.add_argument("token_id", metavar="TOKEN_ID", type=_parse_token_id, help="token id (24 hex digits)")
    revoke.add_argument("--json", action="store_true", help="print the outcome as JSON")
    revoke.set_defaults(run=_revoke_token)

    migrate = commands.add_parser(
        "migrate-legacy-keys", help="hash every user's plaintext legacy key into a token; safe to run again"
    )
    _add_config_argument(migrate)
    migrate.add_argument(
        "--users-collection", type=_collection_name, help="collection of users (default: store.users_collection)"
    )
    migrate.add_argument(
        "--field", type=_field_name, help="top-level legacy key field of a user (default: auth.legacy_field)"
    )
    migrate.add_argument("--dry-run", action="store_true", help="report what would be done and write nothing")
    migrate.add_argument(
        "--remove-legacy-field",
        action="store_true",
        help="remove each user's legacy field once their token has been read back and verified",
    )
    migrate.add_argument(
        "--batch-size", type=_positive_integer, default=DEFAULT_BATCH_SIZE, help="users read and written per batch"
    )
    migrate.set_defaults(run=_migrate_legacy_keys)
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
    with store_uri(config.store.uri, config.store.embedded_path, must_own=True) as uri:
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


def _list_tokens(arguments: argparse.Namespace) -> int:
    config = _load(arguments)
    configure_logging(config.logging, stream=sys.stderr)
    user = parse_user_id(arguments.user)
    documents = _with_manager(config, lambda manager: manager.list(user))

    now = datetime.datetime.now(datetime.UTC)
    tokens = [listed_token(document, now) for document in documents]
    if arguments.json:
        print(json.dumps(tokens))
    elif not tokens:
        print(f"User {arguments.user} has no tokens that are not revoked.", file=sys.stderr)
    else:
        print(_token_table(tokens))
    return EXIT_OK


def _revoke_token(arguments: argparse.Namespace) -> int:
    config = _load(arguments)
    configure_logging(config.logging, stream=sys.stderr)
    token_id = arguments.token_id
    revocation = _with_manager(config, lambda manager: manager.revoke(token_id))

    if revocation.document is None:
        print(f"error: no token has the id {token_id}.", file=sys.stderr)
        return EXIT_FAILURE
    document = revocation.document
    if arguments.json:
        shown = {"id": str(token_id), "outcome": revocation.outcome.value, "user": str(document["user"])}
        print(json.dumps({**shown, "revoked_at": iso(document.get("revoked_at"))}))
    if revocation.outcome is RevokeOutcome.ALREADY_REVOKED:
        print(f"Token {token_id} was already revoked at {iso(document.get('revoked_at'))}.", file=sys.stderr)
        return EXIT_OK
    print(
        f"Revoked token {token_id} ({document.get('token_prefix') or '-'}...) of user {document['user']}. "
        "Running gateways reject it once their change stream reports the write, "
        f"or within cache.ttl_seconds ({config.cache.ttl_seconds:g} s) without a change stream.",
        file=sys.stderr,
    )
    return EXIT_OK


def _with_manager(config: Config, operation: Callable[[TokenManager], Awaitable[T]]) -> T:
    """Run `operation` with a manager on the configured store, then close the store."""

    async def run(uri: str) -> T:
        store = TokenStore.connect(uri, config.store)
        try:
            return await operation(TokenManager(store, config.tokens))
        finally:
            await store.close()

    with store_uri(config.store.uri, config.store.embedded_path) as uri:
        return asyncio.run(run(uri))


def _token_table(tokens: list[dict[str, Any]]) -> str:
    header = ("ID", "PREFIX", "NAME", "CREATED", "LAST USED", "EXPIRES", "USER AGENTS")
    rows = [header]
    for token in tokens:
        expires = _short_time(token["expires_at"], "never")
        rows.append(
            (
                token["id"],
                token["token_prefix"] or "-",
                _printable_text(token["name"] or "-"),
                _short_time(token["created_at"], "-"),
                _short_time(token["last_used_at"], "never"),
                f"{expires} (expired)" if token["expired"] else expires,
                str(len(token["user_agents"])),
            )
        )
    widths = [max(len(row[column]) for row in rows) for column in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows
    )


def _short_time(value: str | None, missing: str) -> str:
    # "2026-12-04T20:01:09.123+00:00" becomes "2026-12-04 20:01 UTC".
    return missing if value is None else value[:16].replace("T", " ") + " UTC"


def _printable_text(text: str) -> str:
    # Names written by other tools may hold control characters, which a
    # terminal would interpret; they are shown escaped.
    return "".join(character if character.isprintable() else ascii(character)[1:-1] for character in text)


def _parse_user(text: str) -> str:
    # The id is sent to the upstream in a header, so the gateway rejects a
    # token whose id is empty or contains whitespace or control characters.
    if not is_usable_user_id(text):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a user id: expected visible characters without whitespace, such as 24 hexadecimal digits"
        )
    return text


def _parse_name(text: str) -> str:
    try:
        parse_token_name(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"the name {exc}") from None
    return text


def _parse_token_id(text: str) -> ObjectId:
    if len(text) != 24 or not ObjectId.is_valid(text):
        # The value is left out: a token pasted here by mistake would be echoed.
        raise argparse.ArgumentTypeError(
            f"a value of {len(text)} characters is not a token id: expected 24 hexadecimal digits, "
            "as `gateway tokens list` shows"
        )
    return ObjectId(text)


def _migrate_legacy_keys(arguments: argparse.Namespace) -> int:
    config = _load(arguments)
    configure_logging(config.logging, stream=sys.stderr)
    users_collection = arguments.users_collection or config.store.users_collection
    field = arguments.field or config.auth.legacy_field
    if not users_collection:
        print(
            "error: no users collection is configured. Set store.users_collection or pass --users-collection.",
            file=sys.stderr,
        )
        return EXIT_USAGE
    display = ProgressDisplay(sys.stderr, "users")

    async def migrate(uri: str) -> MigrationReport:
        store = TokenStore.connect(uri, config.store)
        legacy_keys = LegacyKeyStore.open(store.client, config.store.database, users_collection, field)
        migration = LegacyKeyMigration(
            store,
            legacy_keys,
            config.tokens.secret,
            dry_run=arguments.dry_run,
            remove_legacy_field=arguments.remove_legacy_field,
            batch_size=arguments.batch_size,
        )
        try:
            return await migration.run(lambda report: display.update(report.processed, report.total, report.counts()))
        finally:
            display.finish()
            await store.close()

    with store_uri(config.store.uri, config.store.embedded_path) as uri:
        report = asyncio.run(migrate(uri))

    for line in migration_summary(report, f"{users_collection}.{field}", arguments.remove_legacy_field):
        print(line)
    return EXIT_FAILURE if report.has_problems else EXIT_OK


def _collection_name(text: str) -> str:
    if not text or "$" in text or "\0" in text:
        raise argparse.ArgumentTypeError(f"{text!r} is not a MongoDB collection name")
    return text


def _field_name(text: str) -> str:
    if not text or text.startswith("$") or set(text) & {".", "\0"}:
        raise argparse.ArgumentTypeError(f"{text!r} is not a top-level MongoDB field name")
    return text


def _positive_integer(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return value


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a TCP port: expected 0 to 65535")
    return value


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
