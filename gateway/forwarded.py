"""The client address and request target that a trusted proxy reports.

A peer listed in `server.trusted_proxies` (nginx, a load balancer) may name
the client in `X-Forwarded-For`. It may also name the request it checks in
`X-Original-URI` or `X-Forwarded-Uri` and `X-Original-Method`, because nginx's
`auth_request` sends a GET subrequest to the gateway's own path. From any
other peer these headers are ignored, and the peer's address and the
request's own method and path are used.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

from gateway.headers import TrustedProxies

Headers = Sequence[tuple[bytes, bytes]]

# The first of these headers present names the original request target.
ORIGINAL_URI_HEADERS = (b"x-original-uri", b"x-forwarded-uri")
ORIGINAL_METHOD_HEADER = b"x-original-method"


def client_address(headers: Headers, peer: str | None, trusted_proxies: TrustedProxies) -> str | None:
    """Return the client's address: the peer's, or the one its trusted proxies report.

    `X-Forwarded-For` is read from the right. Each proxy appends the address
    it received the request from, so the entries left of the last trusted
    proxy's entry are whatever the client sent and prove nothing. The walk
    stops at the first address that is not a trusted proxy, or at an entry
    that is not an IP address, whose right neighbour is then returned.
    """
    if peer not in trusted_proxies:
        return peer

    address = peer
    for hop in reversed(_forwarded_for_hops(headers)):
        if not _is_ip_address(hop):
            break
        address = hop
        if hop not in trusted_proxies:
            break
    return address


def original_path(headers: Headers, peer: str | None, trusted_proxies: TrustedProxies, path: str) -> str:
    """Return the path of the request a trusted proxy checks, else `path`.

    The query string is left out: it is not needed to describe the request,
    and a client may have put a key in it.
    """
    if peer not in trusted_proxies:
        return path
    for name in ORIGINAL_URI_HEADERS:
        value = _header_value(headers, name)
        if value:
            return value.split("?", 1)[0] or path
    return path


def original_method(headers: Headers, peer: str | None, trusted_proxies: TrustedProxies, method: str) -> str:
    """Return the method of the request a trusted proxy checks, else `method`."""
    if peer not in trusted_proxies:
        return method
    return _header_value(headers, ORIGINAL_METHOD_HEADER) or method


def _header_value(headers: Headers, name: bytes) -> str | None:
    for header_name, value in headers:
        if header_name.lower() == name:
            return value.decode("latin-1")
    return None


def _forwarded_for_hops(headers: Headers) -> list[str]:
    # Several X-Forwarded-For lines are one list, joined in order (RFC 9110 section 5.3).
    hops: list[str] = []
    for name, value in headers:
        if name.lower() == b"x-forwarded-for":
            hops.extend(hop.strip() for hop in value.decode("latin-1").split(",") if hop.strip())
    return hops


def _is_ip_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True
