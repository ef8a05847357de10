"""Access log, request ids and audit log, read from a real gateway's log records."""

from __future__ import annotations

import datetime
import io
import json
import logging
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from gateway.access_log import printable_path
from gateway.audit import AuditOutcome
from gateway.errors import AuthFailureReason
from gateway.logs import JsonFormatter
from tests.support.servers import raw_request
from tests.support.upstream import header_values


@pytest.fixture
def proxy(make_config: Any, start_gateway: Any, echo_upstream: Any) -> Any:
    upstream_app, upstream_server = echo_upstream
    gateway = start_gateway(make_config(upstream_server.url))
    return gateway, upstream_app


@pytest.fixture
def json_lines() -> Iterator[io.StringIO]:
    """Everything the access and audit loggers write, formatted as the JSON log format does."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    loggers = [logging.getLogger("gateway.access"), logging.getLogger("gateway.audit")]
    previous_levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    yield stream
    for logger, level in zip(loggers, previous_levels, strict=True):
        logger.removeHandler(handler)
        logger.setLevel(level)


def read_entries(stream: io.StringIO, logger: str) -> list[dict[str, Any]]:
    entries = [json.loads(line) for line in stream.getvalue().splitlines()]
    return [entry for entry in entries if entry["logger"] == logger]


def test_access_line_per_request_in_json(proxy: Any, json_lines: io.StringIO, seed_user: Any, seed_token: Any) -> None:
    gateway, _ = proxy
    user = seed_user()
    plaintext, document = seed_token(user)

    response = httpx.get(f"{gateway.url}/api/1/datasets/?q=1", headers={"X-API-KEY": plaintext})

    gateway.server.stop()
    [entry] = read_entries(json_lines, "gateway.access")
    assert entry["level"] == "info"
    assert entry["request_id"] == response.headers["x-request-id"]
    assert entry["client"] == "127.0.0.1"
    assert entry["method"] == "GET"
    assert entry["path"] == "/api/1/datasets/"
    assert entry["status"] == 200
    assert entry["user_id"] == str(user)
    assert entry["token_id"] == str(document["_id"])
    assert entry["token_prefix"] == document["token_prefix"]
    assert entry["duration_ms"] > 0
    assert 0 < entry["upstream_ms"] <= entry["duration_ms"]
    assert plaintext not in json_lines.getvalue()


def test_access_line_for_rejected_request(proxy: Any, json_lines: io.StringIO) -> None:
    gateway, _ = proxy

    httpx.get(f"{gateway.url}/private", headers={"X-API-KEY": "udata_unknown"})

    gateway.server.stop()
    [entry] = read_entries(json_lines, "gateway.access")
    assert entry["status"] == 401
    assert entry["user_id"] is None
    assert entry["upstream_ms"] is None


def test_request_id_generated_forwarded_and_returned(proxy: Any) -> None:
    gateway, upstream = proxy

    first = httpx.get(f"{gateway.url}/x")
    second = httpx.get(f"{gateway.url}/x")

    request_id = first.headers["x-request-id"]
    assert len(request_id) == 32
    assert request_id != second.headers["x-request-id"]
    assert header_values(upstream.requests[0], "X-Request-ID") == [request_id]
    assert first.headers.get_list("x-request-id") == [request_id]


@pytest.mark.parametrize(
    "sent",
    [
        "3f2a1c9e-7b4d-4e1a-9c3b-2d5e6f7a8b9c",  # a UUID
        "Root=1-67891233-abcdef012345678912345678;Parent=1",  # an AWS trace id
        "a",
    ],
)
def test_well_formed_request_id_kept(proxy: Any, sent: str) -> None:
    gateway, upstream = proxy

    response = httpx.get(f"{gateway.url}/x", headers={"X-Request-ID": sent})

    assert response.headers["x-request-id"] == sent
    assert header_values(upstream.requests[-1], "X-Request-ID") == [sent]


@pytest.mark.parametrize(
    "sent",
    [
        b"two, values",  # a comma joins header copies
        b"with space",
        b"x" * 129,  # longer than 128 characters
        b'quote"d',
        b"caf\xc3\xa9",  # not ASCII
        b"",
    ],
)
def test_malformed_request_id_replaced(proxy: Any, sent: bytes) -> None:
    gateway, upstream = proxy
    request = b"GET /x HTTP/1.1\r\nHost: g\r\nX-Request-ID: " + sent + b"\r\nConnection: close\r\n\r\n"

    answer = raw_request(gateway.port, request)

    assert answer.startswith(b"HTTP/1.1 200")
    [forwarded] = header_values(upstream.requests[-1], "X-Request-ID")
    assert forwarded.encode() != sent
    assert len(forwarded) == 32
    assert b"x-request-id: " + forwarded.encode() in answer


def test_request_id_returned_on_gateway_errors(proxy: Any) -> None:
    gateway, _ = proxy

    response = httpx.get(f"{gateway.url}/x", headers={"X-API-KEY": "udata_unknown", "X-Request-ID": "trace-1"})

    assert response.status_code == 401
    assert response.headers["x-request-id"] == "trace-1"


def test_request_id_header_name_configurable(make_config: Any, start_gateway: Any, echo_upstream: Any) -> None:
    upstream, server = echo_upstream
    gateway = start_gateway(make_config(server.url, logging__request_id_header="X-Correlation-ID"))

    response = httpx.get(f"{gateway.url}/x", headers={"X-Correlation-ID": "corr-7", "X-Request-ID": "other"})

    assert response.headers["x-correlation-id"] == "corr-7"
    assert header_values(upstream.requests[-1], "X-Correlation-ID") == ["corr-7"]
    assert header_values(upstream.requests[-1], "X-Request-ID") == ["other"]


def test_access_log_off(make_config: Any, start_gateway: Any, echo_upstream: Any, json_lines: io.StringIO) -> None:
    _, server = echo_upstream
    gateway = start_gateway(make_config(server.url, logging__access_log=False, logging__audit_log=False))

    response = httpx.get(f"{gateway.url}/x", headers={"X-API-KEY": "udata_unknown"})

    gateway.server.stop()
    assert response.headers["x-request-id"]
    assert json_lines.getvalue() == ""


def test_audit_outcomes_cover_every_failure_reason() -> None:
    outcomes = {outcome.value for outcome in AuditOutcome}

    assert {reason.value for reason in AuthFailureReason} <= outcomes
    assert outcomes - {reason.value for reason in AuthFailureReason} == {"success", "forbidden", "store_unavailable"}


def test_audit_line_per_decision(
    make_config: Any, start_gateway: Any, echo_upstream: Any, json_lines: io.StringIO, seed_user: Any, seed_token: Any
) -> None:
    _, server = echo_upstream
    gateway = start_gateway(make_config(server.url, auth__require_key=True))
    user = seed_user()
    valid, document = seed_token(user)
    revoked, _ = seed_token(user, revoked_at=datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC))
    expired, _ = seed_token(user, expires_at=datetime.datetime(2020, 1, 1, tzinfo=datetime.UTC))
    inactive, _ = seed_token(seed_user(active=False))
    keys = [valid, "udata_unknown", revoked, expired, inactive, None, "two keys"]

    with httpx.Client(base_url=gateway.url) as client:
        for number, key in enumerate(keys):
            headers = {"X-Request-ID": f"audit-{number}"}
            if key is not None:
                headers["X-API-KEY"] = key
            client.get("/x", headers=headers)

    gateway.server.stop()
    entries = {entry["request_id"]: entry for entry in read_entries(json_lines, "gateway.audit")}
    assert entries["audit-0"]["outcome"] == "success"
    assert entries["audit-0"]["token_id"] == str(document["_id"])
    assert entries["audit-0"]["user_id"] == str(user)
    assert entries["audit-1"]["outcome"] == "invalid"
    assert entries["audit-2"]["outcome"] == "revoked"
    assert entries["audit-3"]["outcome"] == "expired"
    assert entries["audit-4"]["outcome"] == "inactive_user"
    assert entries["audit-5"]["outcome"] == "missing"
    assert entries["audit-6"]["outcome"] == "invalid"
    assert len(entries) == len(keys)
    assert {entry["outcome"] for entry in entries.values()} <= {outcome.value for outcome in AuditOutcome}


def test_audit_line_when_store_down(
    make_config: Any, start_gateway: Any, echo_upstream: Any, json_lines: io.StringIO
) -> None:
    _, server = echo_upstream
    config = make_config(
        server.url,
        environ={
            "GATEWAY_STORE_URI": "mongodb://127.0.0.1:1/?directConnection=true",
            "GATEWAY_STORE_TIMEOUT_SECONDS": "0.5",
        },
    )
    gateway = start_gateway(config)

    response = httpx.get(f"{gateway.url}/x", headers={"X-API-KEY": "udata_whatever"}, timeout=30)

    gateway.server.stop()
    assert response.status_code == 503
    [entry] = read_entries(json_lines, "gateway.audit")
    assert entry["outcome"] == "store_unavailable"
    assert entry["request_id"] == response.headers["x-request-id"]


@pytest.mark.parametrize(
    "raw_path, shown",
    [
        (b"/api/1/datasets/", "/api/1/datasets/"),
        (b"/a%0Ab", "/a%0Ab"),  # still percent-encoded: one line
        (b"/caf\xc3\xa9", "/caf\\xc3\\xa9"),
        (b"/a\nforged line", "/a\\x0aforged line"),
    ],
)
def test_printable_path_escapes_control_characters(raw_path: bytes, shown: str) -> None:
    assert printable_path({"raw_path": raw_path, "path": "/ignored"}) == shown


def test_audit_line_when_store_down_in_auth_request_mode(
    make_config: Any, start_gateway: Any, json_lines: io.StringIO
) -> None:
    config = make_config(
        "",
        environ={
            "GATEWAY_STORE_URI": "mongodb://127.0.0.1:1/?directConnection=true",
            "GATEWAY_STORE_TIMEOUT_SECONDS": "0.5",
        },
    )
    gateway = start_gateway(config)

    response = httpx.get(f"{gateway.url}{config.auth.auth_request_path}", headers={"X-API-KEY": "udata_whatever"})

    gateway.server.stop()
    assert response.status_code == 401
    [entry] = read_entries(json_lines, "gateway.audit")
    assert entry["outcome"] == "store_unavailable"
    assert entry["request_id"] == response.headers["x-request-id"]
