"""Units of the token format: the precomputed hasher agrees with udata's scheme."""

from __future__ import annotations

import hashlib
import hmac

import pytest

from gateway.tokens import hash_token, token_hasher


@pytest.mark.parametrize(
    ("secret", "plaintext"),
    [
        ("test-secret-0123456789-abcdefghij", "udata_" + "a" * 64),
        # A key migrated from an older system, with non-ASCII characters sent as UTF-8.
        ("another-secret-0123456789", "légacy-kéy-✓"),
        ("short-secret-123", "x"),
    ],
)
def test_token_hasher_matches_hash_token(secret: str, plaintext: str) -> None:
    hash_plaintext = token_hasher(secret)
    expected = hmac.new(secret.encode(), plaintext.encode(), hashlib.sha256).hexdigest()

    assert hash_plaintext(plaintext) == expected
    assert hash_token(secret, plaintext) == expected


def test_token_hasher_keeps_no_state_between_calls() -> None:
    hash_plaintext = token_hasher("test-secret-0123456789-abcdefghij")

    first = hash_plaintext("udata_first")
    hash_plaintext("udata_second")

    assert hash_plaintext("udata_first") == first
