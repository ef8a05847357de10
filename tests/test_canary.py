"""One canary key through every path, with every logger at DEBUG.

The key (past its display prefix), its stored hash and the token secret
must appear in no log line (message, JSON fields or traceback), no response
the gateway writes itself, no repr and no exception message.
"""

from __future__ import annotations

import datetime
import io
import json
import logging
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from gateway.errors import AuthenticationFailed, AuthFailureReason, StoreUnavailable
from gateway.logs import TEXT_FORMAT, JsonFormatter
from gateway.tokens import generate_token, hash_token
from tests.conftest import TEST_SECRET
from tests.support.cli import run_cli
from tests.support.servers import raw_request


class Canary:
    """The canary key and the strings derived from it that must never leak."""

    def __init__(self) -> None:
        self.key = generate_token("udata_")
        self.token_hash = hash_token(TEST_SECRET, self.key)

    @property
    def forbidden(self) -> dict[str, str]:
        # The display prefix (prefix plus 8 characters) may be logged; the rest may not.
        return {
            "key": self.key[len("udata_") + 8 :],
            "hash": self.token_hash[:16],
            "secret": TEST_SECRET,
        }

    def assert_absent(self, text: str, where: str) -> None:
        for name, value in self.forbidden.items():
            assert value not in text, f"the canary {name} appears in {where}"


@pytest.fixture
def every_log_line() -> Iterator[tuple[io.StringIO, io.StringIO]]:
    """Capture every record at DEBUG in both log formats; restore the levels afterwards."""
    text, structured = io.StringIO(), io.StringIO()
    text_handler = logging.StreamHandler(text)
    text_handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    json_handler = logging.StreamHandler(structured)
    json_handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    previous_root_level = root.level
    root.addHandler(text_handler)
    root.addHandler(json_handler)
    previous_levels = {name: logger.level for name, logger in _loggers()}

    yield text, structured

    root.removeHandler(text_handler)
    root.removeHandler(json_handler)
    root.setLevel(previous_root_level)
    for name, logger in _loggers():
        logger.setLevel(previous_levels.get(name, logging.NOTSET))


def _loggers() -> list[tuple[str, logging.Logger]]:
    return [
        (name, logger) for name, logger in logging.root.manager.loggerDict.items() if isinstance(logger, logging.Logger)
    ]


def debug_everything() -> None:
    """Set the root and every logger created so far to DEBUG, pymongo's command logger included."""
    logging.getLogger().setLevel(logging.DEBUG)
    for _, logger in _loggers():
        logger.setLevel(logging.DEBUG)


def answer_text(response: httpx.Response) -> str:
    return repr(response.headers.multi_items()) + response.text


def test_canary_never_leaks(
    make_config: Any,
    start_gateway: Any,
    echo_upstream: Any,
    mongo: Any,
    seed_user: Any,
    seed_token: Any,
    every_log_line: tuple[io.StringIO, io.StringIO],
) -> None:
    canary = Canary()
    upstream, upstream_server = echo_upstream
    user = seed_user()
    _, document = seed_token(user, plaintext=canary.key)
    assert document["token_hash"] == canary.token_hash
    config = make_config(upstream_server.url, auth__failed_lookup_burst=2, auth__failed_lookup_rate=0.01)
    gateway = start_gateway(config)
    store_down = start_gateway(
        make_config(
            upstream_server.url,
            environ={
                "GATEWAY_STORE_URI": "mongodb://127.0.0.1:1/?directConnection=true",
                "GATEWAY_STORE_TIMEOUT_SECONDS": "0.5",
            },
        )
    )
    upstream_down = start_gateway(make_config("http://127.0.0.1:1"))
    debug_everything()
    answers: list[tuple[str, str]] = []

    def send(name: str, target: Any, path: str = "/x", method: str = "GET", key: str = canary.key) -> httpx.Response:
        response = httpx.request(method, f"{target.url}{path}", headers={"X-API-KEY": key}, timeout=30)
        answers.append((name, answer_text(response)))
        return response

    def reset_caches() -> None:
        gateway.server.call(_clear(gateway.app))

    # Proxy success, then each failure reason of the same key.
    assert send("success", gateway).status_code == 200
    assert upstream.requests[-1]["headers"]
    mongo.api_token.update_one({"_id": document["_id"]}, {"$set": {"expires_at": datetime.datetime(2020, 1, 1)}})
    reset_caches()
    assert send("expired", gateway).json() == {"message": "Expired API token"}
    mongo.api_token.update_one(
        {"_id": document["_id"]}, {"$set": {"expires_at": None, "revoked_at": datetime.datetime(2026, 1, 1)}}
    )
    reset_caches()
    assert send("revoked", gateway).json() == {"message": "Revoked API token"}
    mongo.api_token.update_one({"_id": document["_id"]}, {"$set": {"revoked_at": None}})
    mongo.user.update_one({"_id": user}, {"$set": {"active": False}})
    reset_caches()
    assert send("inactive", gateway).json() == {"message": "Inactive user"}
    mongo.api_token.delete_one({"_id": document["_id"]})
    reset_caches()
    assert send("unknown", gateway).json() == {"message": "Invalid API token"}
    assert send("malformed", gateway, key=canary.key + " " + canary.key).status_code == 401
    two_keys = (
        f"GET /x HTTP/1.1\r\nHost: g\r\nX-API-KEY: {canary.key}\r\nX-API-KEY: {canary.key}\r\nConnection: close\r\n\r\n"
    )
    answers.append(("two keys", raw_request(gateway.port, two_keys.encode()).decode("latin-1")))
    control = f"GET /x HTTP/1.1\r\nHost: g\r\nX-API-KEY: {canary.key}\x01\r\nConnection: close\r\n\r\n"
    answers.append(("control character", raw_request(gateway.port, control.encode()).decode("latin-1")))
    throttled = [send("throttled", gateway, key=canary.key + str(number)) for number in range(4)]
    assert throttled[-1].headers["x-auth-error"] == "throttled"

    # Store down, upstream down.
    assert send("store down", store_down).status_code == 503
    assert send("auth_request, store down", store_down, path=config.auth.auth_request_path).status_code == 401
    mongo.api_token.insert_one({**document})
    mongo.user.update_one({"_id": user}, {"$set": {"active": True}})
    assert send("upstream down", upstream_down).status_code == 502

    # Management routes and the auth_request endpoint, where this build has
    # them. Where it does not, the request is forwarded and the echo shows
    # the forwarded headers, which must not carry the key either.
    reset_caches()
    prefix = config.management.prefix
    assert send("management list", gateway, path=prefix).status_code < 500
    assert send("management create", gateway, path=prefix, method="POST").status_code < 500
    assert send("management revoke", gateway, path=f"{prefix}{document['_id']}/", method="DELETE").status_code < 500
    assert send("auth_request", gateway, path=config.auth.auth_request_path).status_code < 500

    for name, text in answers:
        canary.assert_absent(text, f"the answer to the {name} request")
    for target in (gateway, store_down, upstream_down):
        target.server.stop()
    text_lines, json_lines = every_log_line
    assert "gateway.access" in text_lines.getvalue()
    canary.assert_absent(text_lines.getvalue(), "a text log line")
    canary.assert_absent(json_lines.getvalue(), "a JSON log line")
    for line in json_lines.getvalue().splitlines():
        json.loads(line)


async def _clear(app: Any) -> None:
    app.authenticator.clear()
    app.failed_lookups.buckets.clear()


def test_canary_absent_from_reprs_and_exceptions(
    make_config: Any, start_gateway: Any, seed_user: Any, seed_token: Any
) -> None:
    canary = Canary()
    seed_token(seed_user(), plaintext=canary.key)
    gateway = start_gateway(make_config())

    identity = gateway.server.call(gateway.app.authenticator.authenticate(canary.key))
    try:
        gateway.server.call(gateway.app.authenticator.authenticate(canary.key + "x"))
    except AuthenticationFailed as exc:
        failure = exc

    for value in (identity, gateway.app, gateway.app.authenticator, gateway.app.store, gateway.app.config):
        canary.assert_absent(repr(value), f"repr({type(value).__name__})")
    for error in (failure, AuthenticationFailed(AuthFailureReason.INVALID), StoreUnavailable("x")):
        canary.assert_absent(repr(error) + str(error), f"the {type(error).__name__} message")
    assert failure.reason is AuthFailureReason.INVALID


def test_canary_absent_from_cli_output(mongodb_uri: str, database_name: str, mongo: Any) -> None:
    environ = {
        "GATEWAY_TOKENS_SECRET": TEST_SECRET,
        "GATEWAY_STORE_URI": mongodb_uri,
        "GATEWAY_STORE_DATABASE": database_name,
        "GATEWAY_LOGGING_LEVEL": "debug",
    }

    result = run_cli("tokens", "create", "--user", "5f0c2e4a9d1b2c3d4e5f6a7b", environ=environ)

    assert result.returncode == 0, result.stderr
    plaintext = result.stdout.strip()
    stored = mongo.api_token.find_one({"token_prefix": plaintext[:14]})
    assert stored["token_hash"] == hash_token(TEST_SECRET, plaintext)
    assert "DEBUG" in result.stderr
    assert plaintext[14:] not in result.stderr
    assert stored["token_hash"][:16] not in result.stderr + result.stdout
    assert TEST_SECRET not in result.stderr + result.stdout


def test_canary_through_legacy_paths(
    make_config: Any,
    start_gateway: Any,
    echo_upstream: Any,
    mongo: Any,
    seed_user: Any,
    mongodb_uri: str,
    database_name: str,
    every_log_line: tuple[io.StringIO, io.StringIO],
) -> None:
    canary = Canary()
    migrated_by_cli = Canary()
    _, upstream_server = echo_upstream
    user = seed_user()
    mongo.user.update_one({"_id": user}, {"$set": {"apikey": canary.key}})
    other_user = seed_user()
    mongo.user.update_one({"_id": other_user}, {"$set": {"apikey": migrated_by_cli.key}})
    gateway = start_gateway(make_config(upstream_server.url, auth__legacy_fallback=True))
    debug_everything()

    first = httpx.get(f"{gateway.url}/x", headers={"X-API-KEY": canary.key})
    again = httpx.get(f"{gateway.url}/x", headers={"X-API-KEY": canary.key})
    wrong = httpx.get(f"{gateway.url}/x", headers={"X-API-KEY": canary.key + "x"})
    gateway.server.stop()
    result = run_cli(
        "migrate-legacy-keys",
        environ={
            "GATEWAY_TOKENS_SECRET": TEST_SECRET,
            "GATEWAY_STORE_URI": mongodb_uri,
            "GATEWAY_STORE_DATABASE": database_name,
            "GATEWAY_LOGGING_LEVEL": "debug",
        },
    )

    assert first.status_code == 200
    assert again.status_code == 200
    assert wrong.status_code == 401
    assert mongo.api_token.count_documents({"token_hash": canary.token_hash}) == 1
    assert mongo.api_token.count_documents({"token_hash": migrated_by_cli.token_hash}) == 1
    for response in (first, again, wrong):
        canary.assert_absent(answer_text(response), "a legacy-key answer")
    text_lines, json_lines = every_log_line
    for leaked in (canary, migrated_by_cli):
        leaked.assert_absent(text_lines.getvalue() + json_lines.getvalue(), "a log line")
        leaked.assert_absent(result.stdout + result.stderr, "the migrate-legacy-keys output")
    assert "DEBUG" in result.stderr
