"""The gateway's own header syntax and framing check, for servers whose parser lets more through."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.header_syntax import has_invalid_header


def test_has_invalid_header_leaves_key_to_authentication() -> None:
    headers = [(b"x-api-key", b"udata_a\x01b"), (b"x_api_key", b"udata_a\x01b")]

    assert has_invalid_header(headers[:1], key_header=b"x-api-key") is False
    assert has_invalid_header(headers, key_header=b"x-api-key") is True


@pytest.mark.parametrize(
    "headers, is_invalid",
    [
        ([(b"host", b"g"), (b"x-thing", b"a\tb c")], False),  # tab and space are allowed
        ([(b"x-thing", b"caf\xe9")], False),  # obs-text is allowed
        ([(b"content-length", b"5")], False),
        ([(b"transfer-encoding", b"chunked")], False),
        ([(b"x-thing", b"a\x00b")], True),
        ([(b"x-thing", b"a\x01b")], True),
        ([(b"x-thing", b"a\x7fb")], True),
        ([(b"x-thing", b"a\rb")], True),
        ([(b"x-thing", b"a\nb")], True),
        ([(b"x thing", b"a")], True),  # a space is not a token character
        ([(b"x:thing", b"a")], True),
        ([(b"", b"a")], True),
        ([(b"content-length", b"5"), (b"transfer-encoding", b"chunked")], True),
        ([(b"transfer-encoding", b"chunked"), (b"Content-Length", b"5")], True),
        ([(b"content-length", b"5"), (b"content-length", b"5")], True),
        ([(b"content-length", b"5, 5")], True),
        ([(b"content-length", b"+5")], True),
        ([(b"content-length", b"-1")], True),
        ([(b"content-length", b"")], True),
    ],
)
def test_has_invalid_header_table(headers: list[tuple[bytes, bytes]], is_invalid: bool) -> None:
    assert has_invalid_header(headers) is is_invalid


TOKEN_CHARACTERS = b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
names = st.binary(min_size=1, max_size=20).filter(
    lambda name: name.lower() not in (b"content-length", b"transfer-encoding")
)


@given(st.lists(st.tuples(names, st.binary(max_size=40)), max_size=8))
def test_has_invalid_header_matches_rfc_grammar(headers: list[tuple[bytes, bytes]]) -> None:
    expected = any(
        any(byte not in TOKEN_CHARACTERS for byte in name)
        or any((byte < 0x20 and byte != 0x09) or byte == 0x7F for byte in value)
        for name, value in headers
    )

    assert has_invalid_header(headers) is expected
