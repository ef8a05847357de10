"""Token-management routes end to end: a real gateway, a real store and a real upstream."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import hashlib
import hmac
import json
import logging
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import httpx
import jsonschema_rs
import pymongo
import pytest
import schemathesis
from bson import ObjectId

from gateway.app import GatewayApp
from gateway.authenticator import Authenticator
from gateway.config import load_config
from gateway.errors import AuthenticationFailed, AuthFailureReason
from gateway.store import TokenStore
from gateway.token_manager import RevokeOutcome, TokenManager
from gateway.tokens import generate_token
from tests.conftest import TEST_SECRET
from tests.support.servers import ThreadedServer, raw_request
from tests.support.upstream import header_values

PREFIX = "/api/1/me/tokens/"
ALIAS = "/api/1/me/api_tokens/"
OPENAPI_PATH = "/_gateway/openapi.json"


@pytest.fixture
def gateway(make_config: Any, start_gateway: Any, echo_upstream: Any) -> Any:
    upstream_app, upstream_server = echo_upstream
    config = make_config(upstream_server.url, management__usage_flush_seconds=0.05, cache__ttl_seconds=300.0)
    running = start_gateway(config)
    running.upstream = upstream_app
    return running


@dataclasses.dataclass
class SharedGateway:
    """One gateway and database for the tables of input cases, which only read and create tokens."""

    url: str
    port: int
    database: Any

    def seed_owner(self) -> tuple[ObjectId, str]:
        user = ObjectId()
        self.database.user.insert_one({"_id": user, "active": True, "deleted": None})
        key = generate_token("udata_")
        token_hash = hmac.new(TEST_SECRET.encode(), key.encode(), hashlib.sha256).hexdigest()
        self.database.api_token.insert_one({"token_hash": token_hash, "user": user, "scopes": ["admin"]})
        return user, key


@pytest.fixture(scope="module")
def shared_gateway(mongodb_uri: str) -> Iterator[SharedGateway]:
    database_name = f"gateway_test_{uuid.uuid4().hex[:12]}"
    environ = {
        "GATEWAY_TOKENS_SECRET": TEST_SECRET,
        "GATEWAY_STORE_URI": mongodb_uri,
        "GATEWAY_STORE_DATABASE": database_name,
    }
    server = ThreadedServer(GatewayApp(load_config(None, environ))).start()
    client: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(mongodb_uri, tz_aware=True, timeoutMS=10_000)
    yield SharedGateway(server.url, server.port, client[database_name])
    server.stop()
    client.drop_database(database_name)
    client.close()


@pytest.fixture
def caller(shared_gateway: SharedGateway) -> tuple[ObjectId, str]:
    """A fresh user of the shared gateway and their key."""
    return shared_gateway.seed_owner()


@pytest.fixture
def owner(seed_user: Any, seed_token: Any) -> tuple[ObjectId, str]:
    """A user and a key of theirs that the management routes accept."""
    user = seed_user()
    plaintext, _ = seed_token(user)
    return user, plaintext


def call(gateway: Any, method: str, key: str | None, path: str = PREFIX, **options: Any) -> httpx.Response:
    headers = {"X-API-KEY": key} if key else {}
    headers.update(options.pop("headers", {}))
    return httpx.request(method, gateway.url + path, headers=headers, timeout=10, **options)


def create(gateway: Any, key: str, **fields: Any) -> dict[str, Any]:
    response = call(gateway, "POST", key, json=fields)
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


def wait_for(condition: Callable[[], Any], timeout: float = 10) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = condition()
        if result:
            return result
        time.sleep(0.05)
    raise AssertionError("The condition did not hold in time.")


def test_token_lifecycle_create_use_list_revoke(gateway: Any, owner: Any, seed_user: Any, seed_token: Any) -> None:
    user, key = owner
    created = create(gateway, key, name="deploy bot")
    token = created["token"]

    used = httpx.get(f"{gateway.url}/data", headers={"X-API-KEY": token, "User-Agent": "deploy-bot/2.1"})
    assert used.status_code == 200
    assert header_values(gateway.upstream.requests[-1], "X-Authenticated-User") == [str(user)]

    def listed_with_usage() -> dict[str, Any] | None:
        tokens = call(gateway, "GET", key).json()
        entry = next(item for item in tokens if item["id"] == created["id"])
        # One bulk write sets last_used_at and adds the User-Agent in two
        # updates, so a list may see the first without the second.
        return entry if entry["last_used_at"] and entry["user_agents"] else None

    entry = wait_for(listed_with_usage)
    assert entry["user_agents"] == ["deploy-bot/2.1"]
    assert entry["name"] == "deploy bot"
    assert entry["expired"] is False

    revoked = call(gateway, "DELETE", key, f"{PREFIX}{created['id']}/")
    assert revoked.status_code == 204
    assert revoked.content == b""

    after = httpx.get(f"{gateway.url}/data", headers={"X-API-KEY": token})
    assert after.status_code == 401
    assert after.json() == {"message": "Revoked API token"}

    again = call(gateway, "DELETE", key, f"{PREFIX}{created['id']}/")
    assert again.status_code == 410
    assert again.json() == {"message": "Token already revoked"}

    _, other_document = seed_token(seed_user())
    foreign = call(gateway, "DELETE", key, f"{PREFIX}{other_document['_id']}/")
    assert foreign.status_code == 404

    listed_ids = [item["id"] for item in call(gateway, "GET", key).json()]
    assert created["id"] not in listed_ids


def test_list_survives_non_date_expiry(gateway: Any, owner: Any, seed_token: Any) -> None:
    user, key = owner
    _, document = seed_token(user, expires_at="2999-01-01")

    response = call(gateway, "GET", key)

    assert response.status_code == 200, response.text
    entry = next(item for item in response.json() if item["id"] == str(document["_id"]))
    assert entry["expires_at"] is None
    assert entry["expired"] is True


def test_revoke_keeps_document_for_audit(gateway: Any, owner: Any, mongo: Any) -> None:
    _, key = owner
    created = create(gateway, key)

    response = call(gateway, "DELETE", key, f"{PREFIX}{created['id']}/")

    assert response.status_code == 204
    document = mongo.api_token.find_one({"_id": ObjectId(created["id"])})
    assert document is not None
    assert document["revoked_at"] is not None
    assert document["token_hash"]


def test_revoke_evicts_cached_token_at_once(gateway: Any, owner: Any, seed_token: Any) -> None:
    user, key = owner
    token, document = seed_token(user)
    assert httpx.get(f"{gateway.url}/x", headers={"X-API-KEY": token}).status_code == 200
    lookups_before = gateway.counter.token_lookups()
    assert httpx.get(f"{gateway.url}/x", headers={"X-API-KEY": token}).status_code == 200
    assert gateway.counter.token_lookups() == lookups_before  # served from the cache

    assert call(gateway, "DELETE", key, f"{PREFIX}{document['_id']}/").status_code == 204
    response = httpx.get(f"{gateway.url}/x", headers={"X-API-KEY": token})

    assert response.status_code == 401
    assert response.json() == {"message": "Revoked API token"}


def test_revoke_own_calling_key(gateway: Any, owner: Any, mongo: Any) -> None:
    user, key = owner
    document = mongo.api_token.find_one({"user": user})

    assert call(gateway, "DELETE", key, f"{PREFIX}{document['_id']}/").status_code == 204

    assert call(gateway, "GET", key).status_code == 401


def test_revoke_not_found_reveals_nothing(gateway: Any, owner: Any, seed_user: Any, seed_token: Any) -> None:
    _, key = owner
    other = seed_user()
    now = datetime.datetime.now(datetime.UTC)
    token_ids = [
        str(ObjectId()),  # an id no token has
        "not-an-id",  # malformed
        "0123456789abcdef0123456",  # 23 hex digits
        str(seed_token(other)[1]["_id"]),  # another user's token
        str(seed_token(other, revoked_at=now)[1]["_id"]),  # another user's revoked token: 404, not 410
    ]

    answers = set()
    for token_id in token_ids:
        response = call(gateway, "DELETE", key, f"{PREFIX}{token_id}/")
        headers = tuple(
            sorted((name, value) for name, value in response.headers.items() if name not in ("date", "x-request-id"))
        )
        answers.add((response.status_code, response.content, headers))

    assert len(answers) == 1
    status, content, _ = answers.pop()
    assert status == 404
    assert json.loads(content) == {"message": "Token not found"}


async def test_concurrent_revocations_one_succeeds(gateway: Any, owner: Any) -> None:
    _, key = owner
    created = await asyncio.to_thread(create, gateway, key)
    url = f"{gateway.url}{PREFIX}{created['id']}/"

    async with httpx.AsyncClient(headers={"X-API-KEY": key}, timeout=10) as client:
        responses = await asyncio.gather(*(client.delete(url) for _ in range(8)))

    statuses = sorted(response.status_code for response in responses)
    assert statuses == [204] + [410] * 7


def test_created_token_verifies_under_udata_scheme(gateway: Any, owner: Any, mongo: Any) -> None:
    user, key = owner

    created = create(gateway, key, name="ci", scopes=["admin"])

    token = created["token"]
    expected_hash = hmac.new(TEST_SECRET.encode(), token.encode(), hashlib.sha256).hexdigest()
    document = mongo.api_token.find_one({"_id": ObjectId(created["id"])})
    assert document["token_hash"] == expected_hash
    assert document["user"] == user
    assert document["kind"] == "api_key"
    assert token.startswith("udata_")
    assert len(token) == len("udata_") + 64
    assert created["token_prefix"] == token[:14]
    assert set(created) == {"id", "name", "token_prefix", "scopes", "kind", "created_at", "expires_at", "token"}
    assert created["scopes"] == ["admin"]
    assert "token_hash" not in json.dumps(created)
    used = httpx.get(f"{gateway.url}/x", headers={"X-API-KEY": token})
    assert header_values(gateway.upstream.requests[-1], "X-Authenticated-User") == [str(user)]
    assert used.status_code == 200


def test_create_answer_not_cacheable(gateway: Any, owner: Any) -> None:
    _, key = owner

    response = call(gateway, "POST", key, json={})

    assert response.status_code == 201
    assert response.headers["cache-control"] == "no-store"
    assert response.headers["content-type"] == "application/json"


def test_create_without_body_uses_defaults(gateway: Any, owner: Any) -> None:
    _, key = owner

    response = call(gateway, "POST", key)

    assert response.status_code == 201
    body = response.json()
    assert body["name"] is None
    assert body["expires_at"] is None
    assert body["scopes"] == ["admin"]


@pytest.mark.parametrize(
    "text, expected",
    [
        ("2099-01-02T03:04:05", "2099-01-02T03:04:05.000+00:00"),  # naive is UTC
        ("2099-01-02T03:04:05Z", "2099-01-02T03:04:05.000+00:00"),
        ("2099-01-02t03:04:05z", "2099-01-02T03:04:05.000+00:00"),  # RFC 3339 allows lowercase
        ("2099-01-02T03:04:05+14:00", "2099-01-01T13:04:05.000+00:00"),  # the largest real offset
        ("2099-01-02T03:04:05-12:00", "2099-01-02T15:04:05.000+00:00"),
        ("2099-01-02T03:04:05+05:45", "2099-01-01T21:19:05.000+00:00"),  # Nepal
        ("2099-01-02T03:04:05.123456789+00:00", "2099-01-02T03:04:05.123+00:00"),  # cut to BSON milliseconds
        ("2099-01-02", "2099-01-02T00:00:00.000+00:00"),  # a date alone is midnight UTC
    ],
)
def test_create_expiry_normalized_to_utc(shared_gateway: SharedGateway, caller: Any, text: str, expected: str) -> None:
    _, key = caller

    created = create(shared_gateway, key, expires_at=text)

    assert created["expires_at"] == expected
    stored = shared_gateway.database.api_token.find_one({"_id": ObjectId(created["id"])})["expires_at"]
    assert stored.isoformat(timespec="milliseconds") == expected


@pytest.mark.parametrize(
    "body, field",
    [
        ({"name": 5}, "name"),  # wrong type
        ({"name": ["a"]}, "name"),
        ({"name": "x" * 256}, "name"),  # over 255 characters
        ({"name": "line\nbreak"}, "name"),  # control characters
        ({"name": "tab\there"}, "name"),
        ({"name": "nul\x00"}, "name"),
        ({"name": "del\x7f"}, "name"),
        ({"name": "c1\x85"}, "name"),
        ({"name": "separator\u2028"}, "name"),
        ({"expires_at": "2020-01-01T00:00:00Z"}, "expires_at"),  # in the past
        ({"expires_at": "tomorrow"}, "expires_at"),  # unparsable
        ({"expires_at": ""}, "expires_at"),
        ({"expires_at": "2099-01-01T00:00:00+25:00"}, "expires_at"),  # offset out of range
        ({"expires_at": "2099-01-01T00:00:00+05:30:15"}, "expires_at"),  # offset with seconds
        ({"expires_at": "9999-12-31T23:59:59-05:00"}, "expires_at"),  # past year 9999 in UTC
        ({"expires_at": "\uff12\uff10\uff19\uff19-01-01"}, "expires_at"),  # non-ASCII digits
        ({"expires_at": 4102444800}, "expires_at"),  # a number, not a string
        ({"scopes": "admin"}, "scopes"),  # not a list
        ({"scopes": []}, "scopes"),
        ({"scopes": ["superuser"]}, "scopes"),  # not in the allowed set
        ({"scopes": [1]}, "scopes"),
        ({"owner": "someone-else"}, "owner"),  # unknown field
        ({"user": "x", "name": "ok"}, "user"),
        ({"x" * 1000: 1}, "x" * 64),  # a long unknown name is cut in the response
    ],
)
def test_create_invalid_field_named(shared_gateway: SharedGateway, caller: Any, body: Any, field: str) -> None:
    user, key = caller

    response = call(shared_gateway, "POST", key, json=body)

    assert response.status_code == 400, response.text
    assert list(response.json()["errors"]) == [field]
    assert field in response.json()["message"]
    assert shared_gateway.database.api_token.count_documents({"user": user}) == 1


def test_create_reports_every_invalid_field(gateway: Any, owner: Any) -> None:
    _, key = owner

    response = call(gateway, "POST", key, json={"name": 1, "expires_at": "soon", "scopes": ["x"], "extra": True})

    assert response.status_code == 400
    assert set(response.json()["errors"]) == {"name", "expires_at", "scopes", "extra"}


@pytest.mark.parametrize(
    "body",
    [
        {"scopes": ["<key>"]},
        {"expires_at": "<key>"},
        {"<key>": 1},
        '{"name": "a", "<key>": 1, "<key>": 2}',
    ],
)
def test_create_rejection_never_logs_sent_values(
    gateway: Any, owner: Any, caplog: pytest.LogCaptureFixture, body: Any
) -> None:
    # A client may paste a key into any field by mistake, and the rejection
    # log line must not copy it.
    _, key = owner
    content = body if isinstance(body, str) else json.dumps(body)
    caplog.set_level(logging.DEBUG)

    response = call(gateway, "POST", key, content=content.replace("<key>", key))

    assert response.status_code == 400
    assert "Rejected token creation" in caplog.text
    assert key[:20] not in caplog.text


@pytest.mark.parametrize(
    "content",
    [
        b"{",  # malformed JSON
        b"[]",  # an array, not an object
        b'"name"',  # a string
        b"null",
        b"42",
        b'{"name": NaN}',  # not JSON
        b'{"name": "a", "name": "b"}',  # duplicate key
        b"\xff\xfe{}",  # not UTF-8
        b'{"name": "\\ud800"}',  # a lone surrogate, which BSON cannot store
        b"[" * 5000 + b"]" * 5000,  # deeply nested
        b'{"a":' * 2000 + b"1" + b"}" * 2000,
    ],
)
def test_create_hostile_body_rejected(shared_gateway: SharedGateway, caller: Any, content: bytes) -> None:
    user, key = caller

    response = call(shared_gateway, "POST", key, content=content, headers={"Content-Type": "application/json"})

    assert response.status_code == 400, response.text
    assert response.json()["message"].startswith("Invalid request body")
    assert shared_gateway.database.api_token.count_documents({"user": user}) == 1


@pytest.mark.parametrize("chunked", [False, True])
def test_create_body_over_limit_is_413(shared_gateway: SharedGateway, caller: Any, chunked: bool) -> None:
    user, key = caller
    body = json.dumps({"name": "x" * 20_000}).encode()
    content: Any = iter([body[i : i + 1000] for i in range(0, len(body), 1000)]) if chunked else body

    response = call(shared_gateway, "POST", key, content=content)

    assert response.status_code == 413
    assert response.json() == {"message": "The request body is larger than 16384 bytes."}
    assert shared_gateway.database.api_token.count_documents({"user": user}) == 1


def read_status_line(port: int, data: bytes) -> bytes:
    """Send `data` on a new connection and return the response's status line, without sending more."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as connection:
        connection.sendall(data)
        received = b""
        while b"\r\n" not in received:
            chunk = connection.recv(4096)
            if not chunk:
                break
            received += chunk
    return received.split(b"\r\n", 1)[0]


def test_create_declared_huge_body_rejected_before_sent(shared_gateway: SharedGateway, caller: Any) -> None:
    _, key = caller
    head = (
        f"POST {PREFIX} HTTP/1.1\r\nHost: gateway\r\nX-API-KEY: {key}\r\n"
        "Content-Type: application/json\r\nContent-Length: 1000000000\r\n\r\n"
    )

    # Only the head and a few bytes are sent, so a response proves the gateway did not wait for the body.
    status_line = read_status_line(shared_gateway.port, head.encode() + b'{"name":')

    assert status_line == b"HTTP/1.1 413 Request Entity Too Large"


def test_create_chunked_body_stops_at_limit(shared_gateway: SharedGateway, caller: Any) -> None:
    _, key = caller
    head = f"POST {PREFIX} HTTP/1.1\r\nHost: gateway\r\nX-API-KEY: {key}\r\nTransfer-Encoding: chunked\r\n\r\n"
    chunk = b"4000\r\n" + b" " * 0x4000 + b"\r\n"

    # Two 16 KB chunks and no final chunk: a gateway that waited for the
    # whole body would never respond.
    status_line = read_status_line(shared_gateway.port, head.encode() + chunk + chunk)

    assert status_line == b"HTTP/1.1 413 Request Entity Too Large"


def test_create_scope_beyond_caller_forbidden(
    make_config: Any, start_gateway: Any, seed_user: Any, seed_token: Any
) -> None:
    gateway = start_gateway(make_config(management__allowed_scopes=["admin", "read"]))
    user = seed_user()
    reader_key, _ = seed_token(user, scopes=["read"])

    forbidden = call(gateway, "POST", reader_key, json={"scopes": ["admin"]})
    allowed = call(gateway, "POST", reader_key, json={"scopes": ["read"]})

    assert forbidden.status_code == 403
    assert "admin" in forbidden.json()["message"]
    assert allowed.status_code == 201
    assert allowed.json()["scopes"] == ["read"]


def test_list_newest_first_without_hashes(gateway: Any, owner: Any, seed_token: Any, mongo: Any) -> None:
    user, key = owner
    first = create(gateway, key, name="first")
    second = create(gateway, key, name="second")
    seed_token(user, name="revoked", revoked_at=datetime.datetime.now(datetime.UTC))

    response = call(gateway, "GET", key)

    assert response.status_code == 200
    assert response.headers["cache-control"] == "no-store"
    names = [item["name"] for item in response.json()]
    assert names == ["second", "first", "seeded"]
    assert [item["id"] for item in response.json()[:2]] == [second["id"], first["id"]]
    text = response.text
    for document in mongo.api_token.find({"user": user}):
        assert document["token_hash"] not in text
    assert "token_hash" not in text
    assert all("token" not in item for item in response.json())


def test_list_shows_expired_tokens(gateway: Any, owner: Any, seed_token: Any) -> None:
    user, key = owner
    past = datetime.datetime(2024, 5, 1, tzinfo=datetime.UTC)
    expired_key, _ = seed_token(user, name="old", expires_at=past)

    listed = {item["name"]: item for item in call(gateway, "GET", key).json()}

    assert listed["old"]["expired"] is True
    assert listed["old"]["expires_at"] == "2024-05-01T00:00:00.000+00:00"
    assert listed["seeded"]["expired"] is False
    rejected = call(gateway, "GET", expired_key)
    assert rejected.status_code == 401
    assert rejected.json() == {"message": "Expired API token"}


def test_list_only_callers_tokens(gateway: Any, owner: Any, seed_user: Any, seed_token: Any) -> None:
    _, key = owner
    seed_token(seed_user(), name="someone else's")

    names = [item["name"] for item in call(gateway, "GET", key).json()]

    assert names == ["seeded"]


def test_expiry_checked_on_cache_hit(gateway: Any, owner: Any) -> None:
    _, key = owner
    expires_at = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=1.5)
    token = create(gateway, key, expires_at=expires_at.isoformat())["token"]
    assert httpx.get(f"{gateway.url}/x", headers={"X-API-KEY": token}).status_code == 200

    time.sleep(max(0.0, (expires_at - datetime.datetime.now(datetime.UTC)).total_seconds()) + 0.1)
    response = httpx.get(f"{gateway.url}/x", headers={"X-API-KEY": token})

    assert response.status_code == 401
    assert response.json() == {"message": "Expired API token"}


@pytest.mark.parametrize(
    "headers, message",
    [
        ({}, "API token required"),  # keys are optional for proxied paths, never here
        ({"X-API-KEY": "udata_unknown"}, "Invalid API token"),
        ({"X-API-KEY": "bad key"}, "Invalid API token"),
    ],
)
def test_management_requires_valid_key(gateway: Any, headers: Any, message: str) -> None:
    for method, path in [("GET", PREFIX), ("POST", PREFIX), ("DELETE", f"{PREFIX}{ObjectId()}/")]:
        response = httpx.request(method, gateway.url + path, headers=headers)

        assert response.status_code == 401, (method, path)
        assert response.json() == {"message": message}
        assert "www-authenticate" in response.headers
    assert gateway.upstream.requests == []


@pytest.mark.parametrize("state", ["inactive", "deleted"])
def test_management_rejects_inactive_owner(gateway: Any, seed_user: Any, seed_token: Any, state: str) -> None:
    deleted = datetime.datetime(2025, 1, 1, tzinfo=datetime.UTC)
    user = seed_user(active=False) if state == "inactive" else seed_user(deleted=deleted)
    key, _ = seed_token(user)

    response = call(gateway, "POST", key, json={"name": "x"})

    assert response.status_code == 401
    assert response.json() == {"message": "Inactive user"}


@pytest.mark.parametrize(
    "path",
    [
        "/api/1/me/tokens",  # the prefix without its slash
        "/api/1/me/tokens/abc/def/",  # deeper than a token id
        "/api/1/me/%74okens/",  # percent-encoded prefix
        "/api/1/me/api_tokens/",
    ],
)
def test_management_paths_never_forwarded(gateway: Any, owner: Any, path: str) -> None:
    _, key = owner

    for key_header in ({}, {"X-API-KEY": key}):
        httpx.get(gateway.url + path, headers=key_header)

    assert gateway.upstream.requests == []


def test_alias_prefix_serves_same_routes(gateway: Any, owner: Any) -> None:
    _, key = owner

    created = call(gateway, "POST", key, ALIAS, json={"name": "alias"}).json()
    listed = call(gateway, "GET", key, ALIAS).json()
    revoked = call(gateway, "DELETE", key, f"{ALIAS}{created['id']}/")

    assert "alias" in [item["name"] for item in listed]
    assert revoked.status_code == 204


def test_configured_prefix_replaces_default(
    make_config: Any, start_gateway: Any, echo_upstream: Any, owner: Any
) -> None:
    upstream, server = echo_upstream
    gateway = start_gateway(make_config(server.url, management__prefix="/keys/"))
    _, key = owner

    assert call(gateway, "GET", key, "/keys/").status_code == 200
    assert call(gateway, "GET", key, ALIAS).status_code == 200
    assert call(gateway, "GET", key, PREFIX).status_code == 200  # now the upstream's path
    assert len(upstream.requests) == 1


@pytest.mark.parametrize(
    "method, path, allowed",
    [
        ("PUT", PREFIX, "GET, POST"),
        ("DELETE", PREFIX, "GET, POST"),
        ("GET", f"{PREFIX}{ObjectId()}/", "DELETE"),
    ],
)
def test_wrong_method_is_405(shared_gateway: SharedGateway, caller: Any, method: str, path: str, allowed: str) -> None:
    _, key = caller

    response = call(shared_gateway, method, key, path)

    assert response.status_code == 405
    assert response.headers["allow"] == allowed


def test_openapi_document_valid_and_local(gateway: Any) -> None:
    response = httpx.get(gateway.url + OPENAPI_PATH)

    assert response.status_code == 200
    document = response.json()
    schemathesis.openapi.from_dict(document).validate()
    assert document["openapi"].startswith("3.")
    assert set(document["paths"]) == {PREFIX, f"{PREFIX}{{token_id}}/", ALIAS, f"{ALIAS}{{token_id}}/"}
    assert document["components"]["securitySchemes"]["apiKey"]["name"] == "X-API-KEY"
    assert gateway.upstream.requests == []


def test_openapi_schemas_match_answers(gateway: Any, owner: Any, seed_token: Any) -> None:
    user, key = owner
    document = httpx.get(gateway.url + OPENAPI_PATH).json()
    seed_token(user, name="used", last_used_at=datetime.datetime.now(datetime.UTC), user_agents=["curl/8"])
    created = call(gateway, "POST", key, json={"name": "doc", "expires_at": "2099-01-01T00:00:00Z"})
    answers = [
        (PREFIX, "post", created),
        (PREFIX, "get", call(gateway, "GET", key)),
        (PREFIX, "post", call(gateway, "POST", key, json={"name": 3})),
        (PREFIX, "post", call(gateway, "POST", key, content=b"x" * 20_000)),
        (PREFIX, "get", call(gateway, "GET", None)),
        (f"{PREFIX}{{token_id}}/", "delete", call(gateway, "DELETE", key, f"{PREFIX}{created.json()['id']}/")),
        (f"{PREFIX}{{token_id}}/", "delete", call(gateway, "DELETE", key, f"{PREFIX}{created.json()['id']}/")),
        (f"{PREFIX}{{token_id}}/", "delete", call(gateway, "DELETE", key, f"{PREFIX}nope/")),
    ]

    for path, method, response in answers:
        documented = document["paths"][path][method]["responses"][str(response.status_code)]
        documented = resolve(document, documented)
        if response.status_code == 204:
            assert response.content == b""
            continue
        schema = documented["content"]["application/json"]["schema"]
        validator = jsonschema_rs.validator_for({**schema, "components": document["components"]}, validate_formats=True)
        validator.validate(response.json())


def resolve(document: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    """Follow a local `$ref` such as `#/components/responses/Unauthorized`."""
    if "$ref" not in node:
        return node
    target: Any = document
    for part in node["$ref"].removeprefix("#/").split("/"):
        target = target[part]
    return dict(target)


def test_other_gateway_rejects_within_cache_ttl(
    make_config: Any, start_gateway: Any, echo_upstream: Any, owner: Any, seed_token: Any
) -> None:
    _, upstream_server = echo_upstream
    user, key = owner
    cache_ttl = 0.5
    config = make_config(upstream_server.url, cache__ttl_seconds=cache_ttl)
    first, second = start_gateway(config), start_gateway(config)
    token, document = seed_token(user)
    assert httpx.get(f"{second.url}/x", headers={"X-API-KEY": token}).status_code == 200  # cached by the second

    assert call(first, "DELETE", key, f"{PREFIX}{document['_id']}/").status_code == 204
    time.sleep(cache_ttl + 0.2)
    response = httpx.get(f"{second.url}/x", headers={"X-API-KEY": token})

    assert response.status_code == 401
    assert response.json() == {"message": "Revoked API token"}


class PausingStore(TokenStore):
    """A real store whose token lookups wait for `resume` after reading, to interleave a revocation."""

    def __init__(self, *arguments: Any) -> None:
        super().__init__(*arguments)
        self.read_done = asyncio.Event()
        self.resume = asyncio.Event()

    async def find_token(self, token_hashes: Any) -> dict[str, Any] | None:
        document = await super().find_token(token_hashes)
        self.read_done.set()
        await self.resume.wait()
        return document


@pytest.fixture
async def pausing_store(make_config: Any) -> AsyncIterator[PausingStore]:
    config = make_config()
    store = PausingStore(TokenStore.connect(config.store.uri, config.store).client, config.store)
    yield store
    await store.close()


async def test_revoke_during_lookup_not_cached(
    make_config: Any, pausing_store: PausingStore, owner: Any, seed_token: Any
) -> None:
    user, _ = owner
    config = make_config()
    authenticator = Authenticator(pausing_store, config.tokens.secret, config.cache)
    manager = TokenManager(pausing_store, config.tokens)
    token, document = seed_token(user)

    lookup = asyncio.ensure_future(authenticator.authenticate(token))
    await pausing_store.read_done.wait()  # the lookup read the token before its revocation
    assert (await manager.revoke(document["_id"], user)).outcome is RevokeOutcome.REVOKED
    authenticator.evict_token(document["_id"])
    pausing_store.resume.set()
    await lookup

    with pytest.raises(AuthenticationFailed) as failure:
        await authenticator.authenticate(token)
    assert failure.value.reason is AuthFailureReason.REVOKED


def test_required_scopes_apply_to_management(
    make_config: Any, start_gateway: Any, seed_user: Any, seed_token: Any
) -> None:
    gateway = start_gateway(make_config(auth__required_scopes=["write"], management__allowed_scopes=["admin", "write"]))
    user = seed_user()
    admin_key, _ = seed_token(user, scopes=["admin"])
    writer_key, _ = seed_token(user, scopes=["write"])

    forbidden = call(gateway, "GET", admin_key)
    allowed = call(gateway, "GET", writer_key)

    assert forbidden.status_code == 403
    assert forbidden.json() == {"message": "API token lacks a required scope"}
    assert allowed.status_code == 200


@pytest.mark.parametrize(
    "target",
    [
        b"/api/1/me/./tokens/",  # a dot segment
        b"//api/1/me/tokens/",  # an empty segment
        b"/api/1/me/tokens;x=1/",  # a path parameter
        b"/api/1/me/other/../tokens/",  # a dot-dot segment
        b"/api/1/me//api_tokens/",  # the alias with an empty segment
    ],
)
def test_disguised_management_path_never_forwarded(gateway: Any, owner: Any, target: bytes) -> None:
    _, key = owner
    headers = b"Host: g\r\nX-API-KEY: " + key.encode() + b"\r\nConnection: close\r\n\r\n"
    request = b"GET " + target + b" HTTP/1.1\r\n" + headers

    answer = raw_request(gateway.port, request)

    assert answer.startswith(b"HTTP/1.1 400")
    assert gateway.upstream.requests == []


@pytest.mark.parametrize("path", ["/api/1/me/tokensfoo/", "/data/./x", "/a//b", "/a;b"])
def test_other_non_canonical_paths_forwarded(gateway: Any, path: str) -> None:
    request = f"GET {path} HTTP/1.1\r\nHost: g\r\nConnection: close\r\n\r\n".encode()

    answer = raw_request(gateway.port, request)

    assert answer.startswith(b"HTTP/1.1 200")
    assert gateway.upstream.requests[-1]["raw_path"] == path
