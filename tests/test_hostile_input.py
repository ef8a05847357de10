"""Fuzzing of key parsing and header handling: pure units, then a running gateway.

Through the gateway every response must be a 2xx from the upstream, a 400
from the parser or the gateway, or a 401; never a 5xx, a dropped
connection or a hang. Keys that cannot be keys cost no store query.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.app import _decode_key
from gateway.errors import AuthenticationFailed, AuthFailureReason
from gateway.headers import KeyHeaderError, RequestHeaderPolicy, TrustedProxies, fold_header_name, read_key_header
from gateway.tokens import MAX_KEY_LENGTH, is_well_formed_key
from tests.support.gateways import SharedGateway, shared_gateway
from tests.support.upstream import header_values

FORBIDDEN_KEY_CHARACTERS = re.compile(r"[\x00-\x20\x7f-\x9f,\s]")
header_names = st.binary(min_size=1, max_size=24)
header_lists = st.lists(st.tuples(header_names, st.binary(max_size=64)), max_size=12)


# Pure units.


@given(st.text(max_size=MAX_KEY_LENGTH + 50))
def test_is_well_formed_key_matches_its_rule(value: str) -> None:
    expected = 1 <= len(value) <= MAX_KEY_LENGTH and FORBIDDEN_KEY_CHARACTERS.search(value) is None

    assert is_well_formed_key(value) is expected


@given(st.binary(max_size=2048))
def test_decode_key_returns_text_or_invalid(raw: bytes) -> None:
    try:
        key = _decode_key(raw)
    except AuthenticationFailed as exc:
        assert exc.reason is AuthFailureReason.INVALID
        return
    assert key.encode() == raw.strip()


@given(header_lists, st.sampled_from([b"x-api-key", b"authorization"]))
def test_read_key_header_returns_one_value_or_raises(headers: list[tuple[bytes, bytes]], name: bytes) -> None:
    copies = [value for header, value in headers if header == name]

    try:
        found = read_key_header(headers, name)
    except KeyHeaderError:
        assert len(copies) > 1
        return
    assert found == (copies[0] if copies else None)


@given(st.binary(max_size=64))
def test_fold_header_name_keeps_only_lowercase_alphanumerics(name: bytes) -> None:
    folded = fold_header_name(name)

    assert re.fullmatch(rb"[a-z0-9]*", folded)
    assert folded == fold_header_name(folded)


@given(header_lists, st.one_of(st.none(), st.sampled_from(["127.0.0.1", "10.0.0.1", "::1"])))
def test_header_policy_never_forwards_key_or_spoofed_user(
    headers: list[tuple[bytes, bytes]], client_address: str | None
) -> None:
    policy = RequestHeaderPolicy("X-Authenticated-User", "X-API-KEY", False, TrustedProxies(["10.0.0.0/8"]))

    forwarded = policy.rewrite(headers, client_address, "http", "user-1", b"secret-key")

    folded = [(fold_header_name(name), value) for name, value in forwarded]
    assert [value for name, value in folded if name == b"xauthenticateduser"] == [b"user-1"]
    assert [value for name, value in folded if name == b"xapikey"] == []
    assert all(name == name.lower() for name, _ in forwarded)


# Through a running gateway.


@pytest.fixture(scope="module")
def gateway(mongodb_uri: str) -> Iterator[SharedGateway]:
    # The limiter is off so that hundreds of bad keys keep reaching the key checks.
    with shared_gateway(mongodb_uri, auth_failed_lookup_rate="0") as running:
        yield running


def exchange(port: int, request: bytes, timeout: float = 5) -> bytes:
    """Send one request with `Connection: close` and read the whole response; a hang fails the test."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as connection:
        connection.sendall(request)
        chunks = []
        while chunk := connection.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def status_of(answer: bytes) -> int:
    match = re.match(rb"HTTP/1\.1 (\d{3}) ", answer)
    assert match is not None, answer[:200]
    return int(match.group(1))


def request_with(*header_lines: bytes) -> bytes:
    return b"\r\n".join([b"GET /fuzz HTTP/1.1", b"Host: g", *header_lines, b"Connection: close", b"", b""])


@pytest.mark.parametrize(
    "key",
    [
        b"udata_abc\tdef",  # a tab inside
        b"udata_\xc2\x85abc",  # U+0085, a C1 control character, as UTF-8
        b"udata_" + b"a" * (MAX_KEY_LENGTH - 5),  # one character over 1024
        b"udata_" + b"a" * 10_000,
        b"udata_\xff\xfe",  # not UTF-8
        b"first,second",  # two keys joined
        b"first second",
        b"line\xe2\x80\xa8separator",  # U+2028, a line separator, as UTF-8
    ],
)
def test_impossible_key_is_401_without_store_query(gateway: SharedGateway, key: bytes) -> None:
    lookups = gateway.lookups.lookups
    count = len(gateway.upstream.requests)

    answer = exchange(gateway.port, request_with(b"X-API-KEY: " + key))

    assert status_of(answer) == 401
    assert b'{"message":"Invalid API token"}' in answer
    assert gateway.lookups.lookups == lookups
    assert len(gateway.upstream.requests) == count


@pytest.mark.parametrize("character", [b"\x00", b"\x01", b"\x08", b"\x0b", b"\x1f", b"\x7f"])
def test_control_character_in_key_rejected_without_store_query(gateway: SharedGateway, character: bytes) -> None:
    lookups = gateway.lookups.lookups

    answer = exchange(gateway.port, request_with(b"X-API-KEY: udata_abc" + character + b"def"))

    # uvicorn's httptools parser rejects it with 400 before the gateway sees the request.
    assert status_of(answer) == 400
    assert gateway.lookups.lookups == lookups


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
# A key of only whitespace counts as no key, which is forwarded anonymously
# while `auth.require_key` is off, so it is left out here.
@given(
    key=st.binary(min_size=1, max_size=1500).filter(lambda key: b"\r" not in key and b"\n" not in key and key.strip())
)
def test_fuzzed_key_never_errors(gateway: SharedGateway, key: bytes) -> None:
    lookups = gateway.lookups.lookups

    answer = exchange(gateway.port, request_with(b"X-API-KEY: " + key))

    status = status_of(answer)
    assert status in (400, 401)
    try:
        is_possible = is_well_formed_key(key.strip().decode("utf-8"))
    except UnicodeDecodeError:
        is_possible = False
    if not is_possible or status == 400:
        assert gateway.lookups.lookups == lookups


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    headers=st.lists(
        st.tuples(
            st.one_of(
                st.sampled_from([b"X-API-KEY", b"X_API_KEY", b"X-Authenticated-User", b"X.Authenticated.User"]),
                st.sampled_from([b"Content-Length", b"Transfer-Encoding", b"Connection", b"X-Request-ID", b"Expect"]),
                st.binary(min_size=1, max_size=20),
            ),
            st.binary(max_size=80),
        ).filter(lambda header: b"\r" not in header[0] + header[1] and b"\n" not in header[0] + header[1]),
        max_size=6,
    ),
    with_key=st.booleans(),
)
def test_fuzzed_headers_never_error_or_leak(
    gateway: SharedGateway, headers: list[tuple[bytes, bytes]], with_key: bool
) -> None:
    lines = [name + b": " + value for name, value in headers]
    if with_key:
        lines.append(b"X-API-KEY: " + gateway.plaintext.encode())
    count = len(gateway.upstream.requests)

    answer = exchange(gateway.port, request_with(*lines))

    status = status_of(answer)
    assert status in (200, 400, 401, 417)
    for seen in gateway.upstream.requests[count:]:
        assert gateway.plaintext not in repr(seen)
        user_values = [
            value for name, value in seen["headers"] if fold_header_name(name.encode()) == b"xauthenticateduser"
        ]
        assert user_values in ([], [str(gateway.user_id)])
        assert len(header_values(seen, "X-Request-ID")) == 1


def test_gateway_healthy_after_fuzzing(gateway: SharedGateway) -> None:
    answer = exchange(gateway.port, request_with(b"X-API-KEY: " + gateway.plaintext.encode()))

    assert status_of(answer) == 200
