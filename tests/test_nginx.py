"""The whole chain with a real nginx running deploy/nginx/*.conf as shipped.

auth_request mode: client -> nginx -> echo API, with nginx asking the
gateway about every request. Proxy mode: client -> nginx (TLS) -> gateway
-> echo API. Skipped only when the nginx binary is absent.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import logging
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from tests.support.nginx import NginxServer, nginx_binary
from tests.support.upstream import EchoUpstream, header_values

pytestmark = pytest.mark.skipif(nginx_binary() is None, reason="nginx is not installed")

NGINX_ADDRESS = ["127.0.0.1/32"]
PAST = datetime.datetime(2020, 1, 1, tzinfo=datetime.UTC)
SPOOFED_USER_SPELLINGS = [
    "X-Authenticated-User",
    "x-authenticated-user",
    "X_Authenticated_User",
    "X.Authenticated.User",
    "X-Authenticated_User",
]


@dataclasses.dataclass
class Chain:
    nginx: NginxServer
    gateway: Any
    upstream: EchoUpstream

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.nginx.url, verify=False, timeout=10)


@pytest.fixture
def start_nginx() -> Iterator[Callable[..., NginxServer]]:
    started: list[NginxServer] = []

    def start(config_name: str, gateway_port: int, api_port: int | None = None) -> NginxServer:
        server = NginxServer(config_name, gateway_port, api_port)
        started.append(server)
        return server.start()

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def start_auth_request_chain(
    make_config: Any, start_gateway: Any, echo_upstream: Any, start_nginx: Any
) -> Callable[..., Chain]:
    """Start a gateway without upstream and nginx with auth_request.conf in front of the echo API."""
    upstream, upstream_server = echo_upstream

    def start(environ: dict[str, str] | None = None, **overrides: Any) -> Chain:
        overrides.setdefault("server__trusted_proxies", NGINX_ADDRESS)
        gateway = start_gateway(make_config("", environ=environ, **overrides))
        nginx = start_nginx("auth_request.conf", gateway.port, upstream_server.port)
        return Chain(nginx, gateway, upstream)

    return start


@pytest.fixture
def auth_request_chain(start_auth_request_chain: Any) -> Chain:
    return start_auth_request_chain(auth__required_scopes=["admin"])


@pytest.fixture
def proxy_chain(make_config: Any, start_gateway: Any, echo_upstream: Any, start_nginx: Any) -> Chain:
    upstream, upstream_server = echo_upstream
    gateway = start_gateway(make_config(upstream_server.url, server__trusted_proxies=NGINX_ADDRESS))
    nginx = start_nginx("proxy.conf", gateway.port)
    return Chain(nginx, gateway, upstream)


def folded_user_headers(seen: dict[str, Any]) -> list[str]:
    """Return the values of every header a WSGI server would read as X-Authenticated-User."""
    return [
        value
        for name, value in seen["headers"]
        if name.lower().replace("_", "-").replace(".", "-") == "x-authenticated-user"
    ]


# auth_request mode.


def test_auth_request_get_forwards_owner(auth_request_chain: Chain, seed_user: Any, seed_token: Any) -> None:
    user = seed_user()
    plaintext, _ = seed_token(user)

    with auth_request_chain.client() as client:
        response = client.get("/api/1/datasets/?page=2", headers={"X-API-KEY": plaintext})

    assert response.status_code == 200
    seen = auth_request_chain.upstream.requests[-1]
    assert seen["raw_path"] == "/api/1/datasets/"
    assert seen["query_string"] == "page=2"
    assert header_values(seen, "X-Authenticated-User") == [str(user)]
    assert header_values(seen, "X-API-KEY") == []
    assert plaintext not in repr(seen)


@pytest.mark.parametrize(
    "body",
    [
        b"x" * 1_000_000,  # sent with Content-Length
        None,  # sent chunked, without Content-Length
    ],
)
def test_auth_request_post_body_reaches_api(
    auth_request_chain: Chain, seed_user: Any, seed_token: Any, body: bytes | None
) -> None:
    plaintext, _ = seed_token(seed_user())
    chunks = [b"chunk-%d;" % index * 1000 for index in range(50)]
    expected = body if body is not None else b"".join(chunks)
    content: Any = body if body is not None else iter(chunks)

    with auth_request_chain.client() as client:
        response = client.post("/upload", content=content, headers={"X-API-KEY": plaintext})

    assert response.status_code == 200
    assert response.json()["body_size"] == len(expected)
    assert response.json()["body_sha256"] == hashlib.sha256(expected).hexdigest()
    assert response.json()["method"] == "POST"


@pytest.mark.parametrize("spelling", SPOOFED_USER_SPELLINGS)
def test_auth_request_spoofed_user_headers_removed(
    auth_request_chain: Chain, seed_user: Any, seed_token: Any, spelling: str
) -> None:
    user = seed_user()
    plaintext, _ = seed_token(user)

    with auth_request_chain.client() as client:
        anonymous = client.get("/public", headers={spelling: "admin"})
        anonymous_seen = auth_request_chain.upstream.requests[-1]
        authenticated = client.get("/private", headers={spelling: "admin", "X-API-KEY": plaintext})
        authenticated_seen = auth_request_chain.upstream.requests[-1]

    assert anonymous.status_code == 200
    assert folded_user_headers(anonymous_seen) == []
    assert authenticated.status_code == 200
    assert folded_user_headers(authenticated_seen) == [str(user)]


def test_auth_request_key_spellings_never_reach_api(auth_request_chain: Chain, seed_user: Any, seed_token: Any) -> None:
    plaintext, _ = seed_token(seed_user())

    with auth_request_chain.client() as client:
        client.get("/x", headers={"X-API-KEY": plaintext, "X_API_KEY": plaintext, "X.API.KEY": plaintext})

    assert plaintext not in repr(auth_request_chain.upstream.requests[-1])


@pytest.mark.parametrize(
    "token_fields, owner_active, reason, message",
    [
        (None, True, "invalid", "Invalid API token"),  # a key that is in no document
        ({"revoked_at": PAST}, True, "revoked", "Revoked API token"),
        ({"expires_at": PAST}, True, "expired", "Expired API token"),
        ({}, False, "inactive_user", "Inactive user"),
    ],
)
@pytest.mark.parametrize("method", ["GET", "POST"])
def test_auth_request_rejection_passes_gateway_json(
    auth_request_chain: Chain,
    seed_user: Any,
    seed_token: Any,
    token_fields: dict[str, Any] | None,
    owner_active: bool,
    reason: str,
    message: str,
    method: str,
) -> None:
    user = seed_user(active=owner_active)
    plaintext = "udata_" + "u" * 64 if token_fields is None else seed_token(user, **token_fields)[0]

    with auth_request_chain.client() as client:
        response = client.request(method, "/private", headers={"X-API-KEY": plaintext}, content=b"payload" * 1000)

    assert response.status_code == 401
    assert response.json() == {"message": message}
    assert response.headers["content-type"] == "application/json"
    assert response.headers["x-auth-error"] == reason
    assert response.headers["www-authenticate"] == f'ApiKey header="X-API-KEY", error="{reason}"'
    assert auth_request_chain.upstream.requests == []


def test_auth_request_missing_key_when_required(start_auth_request_chain: Any) -> None:
    chain = start_auth_request_chain(auth__require_key=True)

    with chain.client() as client:
        response = client.get("/private")

    assert response.status_code == 401
    assert response.json() == {"message": "API token required"}
    assert response.headers["x-auth-error"] == "missing"
    assert chain.upstream.requests == []


def test_auth_request_scope_refusal_is_403(auth_request_chain: Chain, seed_user: Any, seed_token: Any) -> None:
    plaintext, _ = seed_token(seed_user(), scopes=["read"])

    with auth_request_chain.client() as client:
        response = client.get("/private", headers={"X-API-KEY": plaintext})

    assert response.status_code == 403
    assert response.json() == {"message": "API token lacks a required scope"}
    assert auth_request_chain.upstream.requests == []


def test_auth_request_store_down_denies_with_401(start_auth_request_chain: Any) -> None:
    chain = start_auth_request_chain(environ={"GATEWAY_STORE_URI": "mongodb://127.0.0.1:1/?directConnection=true"})

    with chain.client() as client:
        with_key = client.get("/private", headers={"X-API-KEY": "udata_" + "k" * 64})
        anonymous = client.get("/public")

    assert with_key.status_code == 401
    assert with_key.json() == {"message": "Authentication is temporarily unavailable, retry later"}
    assert with_key.headers["x-auth-error"] == "unavailable"
    assert with_key.headers["retry-after"] == "1"
    assert anonymous.status_code == 200
    assert [seen["raw_path"] for seen in chain.upstream.requests] == ["/public"]


def test_auth_request_gateway_down_is_503(auth_request_chain: Chain, seed_user: Any, seed_token: Any) -> None:
    plaintext, _ = seed_token(seed_user())
    auth_request_chain.gateway.server.stop()

    with auth_request_chain.client() as client:
        response = client.get("/private", headers={"X-API-KEY": plaintext})

    assert response.status_code == 503
    assert response.json() == {"message": "Authentication is temporarily unavailable, retry later"}
    assert response.headers["retry-after"] == "1"
    assert auth_request_chain.upstream.requests == []


@pytest.mark.parametrize("path", ["/_gateway_auth", "/_gateway_denied"])
def test_auth_request_location_hidden_from_clients(
    auth_request_chain: Chain, seed_user: Any, seed_token: Any, path: str
) -> None:
    plaintext, _ = seed_token(seed_user())

    with auth_request_chain.client() as client:
        response = client.get(path, headers={"X-API-KEY": plaintext})

    assert response.status_code == 404
    assert "x-authenticated-user" not in response.headers


def test_auth_request_gateway_logs_original_request(
    auth_request_chain: Chain, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.audit")
    spoofed = {"X-API-KEY": "udata_unknown", "X-Original-URI": "/public", "X-Forwarded-For": "203.0.113.9"}

    with auth_request_chain.client() as client:
        client.post("/private/resource?secret=1", headers=spoofed)

    lines = [record.getMessage() for record in caplog.records if record.name == "gateway.audit"]
    assert lines
    # The second line is nginx's replay for the JSON body, a GET after error_page.
    assert len(lines) == 2
    assert lines[0].endswith(" method=POST path=/private/resource")
    assert all(line.endswith(" path=/private/resource") for line in lines)
    assert all(" client=127.0.0.1 " in line for line in lines)
    assert all("203.0.113.9" not in line and "secret=1" not in line for line in lines)


def test_auth_request_cache_shared_with_nginx_calls(auth_request_chain: Chain, seed_user: Any, seed_token: Any) -> None:
    plaintext, _ = seed_token(seed_user())

    with auth_request_chain.client() as client:
        statuses = [client.get(f"/x/{index}", headers={"X-API-KEY": plaintext}).status_code for index in range(10)]

    assert statuses == [200] * 10
    assert auth_request_chain.gateway.counter.token_lookups() == 1


def test_auth_request_plain_http_redirects_to_https(auth_request_chain: Chain) -> None:
    response = httpx.get(f"http://127.0.0.1:{auth_request_chain.nginx.http_port}/x?y=1")

    assert response.status_code == 308
    assert response.headers["location"].startswith("https://")
    assert response.headers["location"].endswith("/x?y=1")
    assert auth_request_chain.upstream.requests == []


# Proxy mode.


def test_proxy_mode_forwards_over_tls(proxy_chain: Chain, seed_user: Any, seed_token: Any) -> None:
    user = seed_user()
    plaintext, _ = seed_token(user)
    spoofed = {"X-Forwarded-For": "203.0.113.9", "X-Forwarded-Proto": "http", "X_Authenticated_User": "admin"}

    with proxy_chain.client() as client:
        response = client.get("/api/1/me/", headers={"X-API-KEY": plaintext, **spoofed})

    assert response.status_code == 200
    seen = proxy_chain.upstream.requests[-1]
    assert folded_user_headers(seen) == [str(user)]
    assert header_values(seen, "X-Forwarded-Proto") == ["https"]
    assert header_values(seen, "X-Forwarded-For") == ["127.0.0.1, 127.0.0.1"]
    assert header_values(seen, "X-API-KEY") == []


def test_proxy_mode_post_body_reaches_api(proxy_chain: Chain, seed_user: Any, seed_token: Any) -> None:
    plaintext, _ = seed_token(seed_user())
    body = bytes(range(256)) * 4000

    with proxy_chain.client() as client:
        response = client.post("/upload", content=body, headers={"X-API-KEY": plaintext})

    assert response.status_code == 200
    assert response.json()["body_sha256"] == hashlib.sha256(body).hexdigest()


def test_proxy_mode_rejection_passes_gateway_json(proxy_chain: Chain, seed_user: Any, seed_token: Any) -> None:
    plaintext, _ = seed_token(seed_user(), revoked_at=PAST)

    with proxy_chain.client() as client:
        response = client.post("/private", headers={"X-API-KEY": plaintext}, content=b"body")

    assert response.status_code == 401
    assert response.json() == {"message": "Revoked API token"}
    assert response.headers["x-auth-error"] == "revoked"
    assert proxy_chain.upstream.requests == []
