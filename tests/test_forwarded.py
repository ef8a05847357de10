"""Which client address and request target the gateway believes, and from whom."""

from __future__ import annotations

import pytest

from gateway.forwarded import client_address, original_method, original_path
from gateway.headers import TrustedProxies

TRUSTED = TrustedProxies(["10.0.0.0/8", "::1"])


@pytest.mark.parametrize(
    "peer, forwarded_for, expected",
    [
        ("203.0.113.5", ["198.51.100.1"], "203.0.113.5"),  # untrusted peer: its header is ignored
        ("10.0.0.2", [], "10.0.0.2"),  # trusted peer without the header
        ("10.0.0.2", ["198.51.100.1"], "198.51.100.1"),  # one proxy
        ("10.0.0.2", ["6.6.6.6, 198.51.100.1"], "198.51.100.1"),  # spoofed entry left of the real client
        ("10.0.0.2", ["198.51.100.1, 10.0.0.9"], "198.51.100.1"),  # two trusted proxies
        ("10.0.0.2", ["6.6.6.6", "198.51.100.1, 10.0.0.9"], "198.51.100.1"),  # header repeated
        ("10.0.0.2", ["10.0.0.8, 10.0.0.9"], "10.0.0.8"),  # only trusted hops: the leftmost
        ("10.0.0.2", ["6.6.6.6, unknown"], "10.0.0.2"),  # garbage right of the client: stop at the peer
        ("10.0.0.2", ["garbage, 198.51.100.1"], "198.51.100.1"),  # garbage left of the client is never read
        ("::1", ["2001:db8::7"], "2001:db8::7"),  # IPv6
        (None, ["198.51.100.1"], None),  # no peer address (a Unix socket)
    ],
)
def test_client_address_reads_trusted_chain_from_right(
    peer: str | None, forwarded_for: list[str], expected: str | None
) -> None:
    headers = [(b"x-forwarded-for", value.encode()) for value in forwarded_for]

    assert client_address(headers, peer, TRUSTED) == expected


@pytest.mark.parametrize(
    "peer, headers, expected",
    [
        ("203.0.113.5", [(b"x-original-uri", b"/public")], "/_auth"),  # untrusted peer
        ("10.0.0.2", [(b"x-original-uri", b"/private?key=1")], "/private"),  # query left out
        ("10.0.0.2", [(b"X-Forwarded-Uri", b"/other")], "/other"),  # the second header name
        ("10.0.0.2", [(b"x-forwarded-uri", b"/b"), (b"x-original-uri", b"/a")], "/a"),  # X-Original-URI first
        ("10.0.0.2", [], "/_auth"),  # no header
        ("10.0.0.2", [(b"x-original-uri", b"?only=query")], "/_auth"),  # empty path
    ],
)
def test_original_path_only_from_trusted_peer(peer: str, headers: list[tuple[bytes, bytes]], expected: str) -> None:
    assert original_path(headers, peer, TRUSTED, "/_auth") == expected


def test_original_method_only_from_trusted_peer() -> None:
    headers = [(b"x-original-method", b"DELETE")]

    assert original_method(headers, "10.0.0.2", TRUSTED, "GET") == "DELETE"
    assert original_method(headers, "203.0.113.5", TRUSTED, "GET") == "GET"
    assert original_method([], "10.0.0.2", TRUSTED, "GET") == "GET"
