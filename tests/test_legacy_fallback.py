"""The legacy key fallback through a running gateway: keys still in the users' field authenticate and migrate."""

from __future__ import annotations

import datetime
import hashlib
import hmac
from typing import Any

import httpx
import pytest
from bson import ObjectId
from pymongo import monitoring

from gateway.app import GatewayApp
from gateway.config import load_config
from gateway.errors import ConfigError
from gateway.legacy_keys import LegacyKeyStore
from tests.conftest import TEST_SECRET, CommandCounter
from tests.support.servers import ThreadedServer
from tests.support.upstream import header_values


def token_hash(key: str) -> str:
    return hmac.new(TEST_SECRET.encode(), key.encode("utf-8"), hashlib.sha256).hexdigest()


def user_lookups(counter: CommandCounter) -> int:
    return sum(1 for name, collection in counter.commands if name == "find" and collection == "user")


@pytest.fixture
def fallback_proxy(make_config: Any, start_gateway: Any, echo_upstream: Any) -> Any:
    upstream_app, upstream_server = echo_upstream
    gateway = start_gateway(make_config(upstream_server.url, auth__legacy_fallback=True))
    return gateway, upstream_app


@pytest.mark.parametrize(
    "key, token_prefix",
    [
        ("eyJhbGciOiJIUzI1NiJ9.eyJ1c2VyIjoiNWYwYyJ9.c2lnbmF0dXJlLW9mLXRoZS1vbGQta2V5", "eyJhbGci"),  # old JWS key
        ("short", ""),  # shorter than eight characters: no display prefix
        ("clé-ünïcødé-键-🔑", "clé-ünïc"),  # non-ASCII, sent as UTF-8
    ],
)
def test_legacy_fallback_migrates_key_on_first_use(
    fallback_proxy: Any, mongo: Any, key: str, token_prefix: str
) -> None:
    gateway, upstream = fallback_proxy
    user_id = ObjectId()
    mongo.user.insert_one({"_id": user_id, "active": True, "deleted": None, "apikey": key})
    headers = {"X-API-KEY": key.encode("utf-8")}

    first = httpx.get(f"{gateway.url}/private", headers=headers)
    gateway.app.authenticator.clear()
    lookups_before = user_lookups(gateway.counter)
    second = httpx.get(f"{gateway.url}/private", headers=headers)

    assert first.status_code == 200
    assert header_values(upstream.requests[0], "X-Authenticated-User") == [str(user_id)]
    token = mongo.api_token.find_one({"token_hash": token_hash(key)})
    assert token["user"] == user_id
    assert token["name"] == "Migrated API key"
    assert token["token_prefix"] == token_prefix
    assert token["scopes"] == ["admin"]
    assert token["kind"] == "api_key"
    assert token["revoked_at"] is None
    assert token["expires_at"] is None
    assert second.status_code == 200
    assert user_lookups(gateway.counter) == lookups_before
    assert mongo.api_token.count_documents({}) == 1


@pytest.mark.parametrize(
    "owner",
    [
        {"active": False, "deleted": None},  # deactivated
        {"active": True, "deleted": datetime.datetime(2025, 1, 1, tzinfo=datetime.UTC)},  # deleted
    ],
)
def test_legacy_fallback_inactive_owner_rejected(fallback_proxy: Any, mongo: Any, owner: dict[str, Any]) -> None:
    gateway, upstream = fallback_proxy
    mongo.user.insert_one({"_id": ObjectId(), "apikey": "legacy-key-of-inactive", **owner})

    response = httpx.get(f"{gateway.url}/private", headers={"X-API-KEY": "legacy-key-of-inactive"})

    assert response.status_code == 401
    assert response.json() == {"message": "Inactive user"}
    assert upstream.requests == []
    assert mongo.api_token.count_documents({}) == 0


def test_legacy_fallback_shared_key_rejected(fallback_proxy: Any, mongo: Any) -> None:
    gateway, upstream = fallback_proxy
    mongo.user.insert_many(
        [{"_id": ObjectId(), "active": True, "deleted": None, "apikey": "shared-legacy-key"} for _ in range(2)]
    )

    response = httpx.get(f"{gateway.url}/private", headers={"X-API-KEY": "shared-legacy-key"})

    assert response.status_code == 401
    assert response.json() == {"message": "Invalid API token"}
    assert upstream.requests == []
    assert mongo.api_token.count_documents({}) == 0


def test_legacy_fallback_off_rejects_legacy_key(
    make_config: Any, start_gateway: Any, echo_upstream: Any, mongo: Any
) -> None:
    _, server = echo_upstream
    gateway = start_gateway(make_config(server.url))
    mongo.user.insert_one({"_id": ObjectId(), "active": True, "deleted": None, "apikey": "legacy-key-1"})

    response = httpx.get(f"{gateway.url}/private", headers={"X-API-KEY": "legacy-key-1"})

    assert response.status_code == 401
    assert response.json() == {"message": "Invalid API token"}
    assert user_lookups(gateway.counter) == 0
    assert mongo.api_token.count_documents({}) == 0


def test_legacy_fallback_unknown_key_rejected(fallback_proxy: Any, mongo: Any) -> None:
    gateway, upstream = fallback_proxy
    mongo.user.insert_one({"_id": ObjectId(), "active": True, "deleted": None, "apikey": ["array-key"]})

    unknown = httpx.get(f"{gateway.url}/private", headers={"X-API-KEY": "never-issued"})
    array_element = httpx.get(f"{gateway.url}/private", headers={"X-API-KEY": "array-key"})

    assert unknown.status_code == 401
    assert array_element.status_code == 401
    assert upstream.requests == []


def test_legacy_fallback_revoked_token_stays_revoked(fallback_proxy: Any, mongo: Any, seed_token: Any) -> None:
    gateway, _ = fallback_proxy
    user_id = ObjectId()
    mongo.user.insert_one({"_id": user_id, "active": True, "deleted": None, "apikey": "revoked-legacy-key"})
    revoked_at = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
    seed_token(user_id, plaintext="revoked-legacy-key", revoked_at=revoked_at)

    response = httpx.get(f"{gateway.url}/private", headers={"X-API-KEY": "revoked-legacy-key"})

    assert response.status_code == 401
    assert response.json() == {"message": "Revoked API token"}
    assert mongo.api_token.count_documents({}) == 1


class TokenStoredByAnotherGateway(monitoring.CommandListener):
    """Store the migrated token while the gateway reads the users, as a second gateway process would."""

    def __init__(self, database: Any, key: str, user_id: ObjectId) -> None:
        self.database = database
        self.key = key
        self.user_id = user_id
        self.stored_id: ObjectId | None = None

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        if event.command_name == "find" and event.command.get("find") == "user" and self.stored_id is None:
            document = {"token_hash": token_hash(self.key), "user": self.user_id, "name": "Migrated API key"}
            self.stored_id = self.database.api_token.insert_one(document).inserted_id

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        pass

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        pass


def test_legacy_fallback_concurrent_migration_authenticates(make_config: Any, echo_upstream: Any, mongo: Any) -> None:
    upstream, server = echo_upstream
    user_id = ObjectId()
    mongo.user.insert_one({"_id": user_id, "active": True, "deleted": None, "apikey": "raced-legacy-key"})
    listener = TokenStoredByAnotherGateway(mongo, "raced-legacy-key", user_id)
    app = GatewayApp(make_config(server.url, auth__legacy_fallback=True), event_listeners=[listener])
    gateway = ThreadedServer(app).start()
    try:
        response = httpx.get(f"{gateway.url}/private", headers={"X-API-KEY": "raced-legacy-key"})
    finally:
        gateway.stop()

    assert listener.stored_id is not None
    assert response.status_code == 200
    assert header_values(upstream.requests[0], "X-Authenticated-User") == [str(user_id)]
    assert [token["_id"] for token in mongo.api_token.find()] == [listener.stored_id]


def test_legacy_fallback_store_failure_is_503(fallback_proxy: Any, mongo: Any) -> None:
    gateway, upstream = fallback_proxy
    mongo.user.insert_one({"_id": ObjectId(), "active": True, "deleted": None, "apikey": "legacy-key-2"})
    # The token lookup still works, but the store rejects every users query:
    # a name starting with "$" is read as an unknown query operator.
    authenticator = gateway.app.authenticator
    authenticator.legacy_keys = LegacyKeyStore(authenticator.legacy_keys.users, "$apikey")

    response = httpx.get(f"{gateway.url}/private", headers={"X-API-KEY": "legacy-key-2"})

    assert response.status_code == 503
    assert upstream.requests == []
    assert mongo.api_token.count_documents({}) == 0


def test_config_legacy_settings_checked() -> None:
    environ = {
        "GATEWAY_TOKENS_SECRET": TEST_SECRET,
        "GATEWAY_AUTH_LEGACY_FALLBACK": "true",
        "GATEWAY_STORE_USERS_COLLECTION": "",
        "GATEWAY_AUTH_LEGACY_FIELD": "$where",
    }

    with pytest.raises(ConfigError) as error:
        load_config(None, environ)

    assert any(problem.startswith("auth.legacy_fallback = true is invalid") for problem in error.value.problems)
    assert any(problem.startswith("auth.legacy_field = '$where' is invalid") for problem in error.value.problems)
