"""Units of the request header policy: the memo of folded names changes no decision."""

from __future__ import annotations

from gateway.headers import MAX_REMEMBERED_HEADER_NAMES, RequestHeaderPolicy, TrustedProxies

SPOOFED_SPELLINGS = [b"x-authenticated-user", b"x_authenticated_user", b"x.authenticated.user", b"X-AUTHENTICATED-USER"]


def _policy() -> RequestHeaderPolicy:
    return RequestHeaderPolicy("X-Authenticated-User", "X-API-KEY", False, TrustedProxies([]))


def _forwarded_names(policy: RequestHeaderPolicy, headers: list[tuple[bytes, bytes]]) -> list[bytes]:
    return [name for name, _ in policy.rewrite(headers, "127.0.0.1", "http", None, None)]


def test_rewrite_drops_spoofed_spellings_on_every_call() -> None:
    policy = _policy()
    headers = [(b"host", b"api"), (b"accept", b"*/*")] + [(name, b"admin") for name in SPOOFED_SPELLINGS]

    first = _forwarded_names(policy, headers)
    second = _forwarded_names(policy, headers)

    assert first == second
    assert first == [b"accept", b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host"]


def test_rewrite_drops_spoofed_spellings_with_memo_full() -> None:
    policy = _policy()
    # Fill the memo with names a client made up, then send the spoofed spellings.
    for index in range(MAX_REMEMBERED_HEADER_NAMES + 10):
        policy.rewrite([(f"x-made-up-{index}".encode(), b"1")], "127.0.0.1", "http", None, None)
    headers = [(name, b"admin") for name in SPOOFED_SPELLINGS] + [(b"x-kept", b"1")]

    assert _forwarded_names(policy, headers)[0] == b"x-kept"
    assert b"x-authenticated-user" not in _forwarded_names(policy, headers)


def test_rewrite_drops_long_spoofed_name_variant() -> None:
    policy = _policy()
    # Folding removes every character other than letters and digits, so padding does not help.
    long_spelling = b"x" + b"-" * 100 + b"authenticated_user"

    assert _forwarded_names(policy, [(long_spelling, b"admin")]) == [
        b"x-forwarded-for",
        b"x-forwarded-proto",
        b"x-forwarded-host",
    ]


def test_rewrite_replaces_client_request_ids() -> None:
    policy = RequestHeaderPolicy("X-Authenticated-User", "X-API-KEY", False, TrustedProxies([]), "X-Request-ID")
    headers = [(b"X-Request-ID", b"from-client"), (b"x-request-id", b"again"), (b"accept", b"*/*")]

    rewritten = policy.rewrite(headers, "127.0.0.1", "http", "user-1", None, b"gateway-id")

    assert [value for name, value in rewritten if name == b"x-request-id"] == [b"gateway-id"]
    assert rewritten[-1] == (b"x-request-id", b"gateway-id")


def test_rewrite_drops_request_id_spellings() -> None:
    policy = RequestHeaderPolicy("X-Authenticated-User", "X-API-KEY", False, TrustedProxies([]), "X-Request-ID")
    # Some WSGI and CGI upstreams read these as the request id header (see fold_header_name).
    headers = [(b"x_request_id", b"forged, id"), (b"x.request.id", b"forged"), (b"accept", b"*/*")]

    rewritten = policy.rewrite(headers, "127.0.0.1", "http", None, None, b"gateway-id")

    assert [name for name, _ in rewritten] == [
        b"accept",
        b"x-forwarded-for",
        b"x-forwarded-proto",
        b"x-forwarded-host",
        b"x-request-id",
    ]
    assert rewritten[-1] == (b"x-request-id", b"gateway-id")
