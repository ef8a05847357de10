"""Header rules for forwarding: which request and response headers cross the gateway.

Every header set here is computed once at start-up; per request the gateway
only folds names and looks them up.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence

from gateway.http_date import current_http_date

Headers = list[tuple[bytes, bytes]]

# RFC 9110 section 7.6.1 and RFC 9112: connection-specific headers that a proxy
# must not forward, plus Proxy-* credentials meant for this hop only.
HOP_BY_HOP_HEADERS = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-authorization",
        b"proxy-authenticate",
    }
)

# Headers that describe the client's hop and that the gateway sets itself.
FORWARDED_HEADERS = (b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host")
UNTRUSTED_FORWARDING_HEADERS = (*FORWARDED_HEADERS, b"forwarded", b"x-real-ip", b"x-forwarded-uri", b"x-original-uri")

# Bounds of the memo of folded header names: about 1,000 names of at most 64 bytes.
MAX_REMEMBERED_HEADER_NAMES = 1_000
MAX_REMEMBERED_HEADER_NAME_LENGTH = 64

_NOT_ALPHANUMERIC = bytes(code for code in range(256) if not chr(code).isascii() or not chr(code).isalnum())


def fold_header_name(name: bytes) -> bytes:
    """Return the name as servers that fold spellings see it.

    WSGI and CGI stacks map `X-User`, `X_User` and in some cases `X.User` to
    one variable, so the gateway compares names lowercased with every
    character other than a letter or a digit removed.
    """
    return name.lower().translate(None, _NOT_ALPHANUMERIC)


class TrustedProxies:
    """The peers whose forwarding headers the gateway believes."""

    def __init__(self, networks: Iterable[str]) -> None:
        self.networks = tuple(ipaddress.ip_network(network, strict=False) for network in networks)
        self._verdicts: dict[str, bool] = {}

    def __contains__(self, address: str | None) -> bool:
        if address is None or not self.networks:
            return False
        verdict = self._verdicts.get(address)
        if verdict is None:
            verdict = self._check(address)
            if len(self._verdicts) < 10_000:
                self._verdicts[address] = verdict
        return verdict

    def _check(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in network for network in self.networks)


def connection_named_headers(headers: Sequence[tuple[bytes, bytes]]) -> frozenset[bytes]:
    """Return the header names listed in `Connection`, which are hop-by-hop too."""
    named: set[bytes] = set()
    for name, value in headers:
        if name.lower() == b"connection":
            named.update(token.strip().lower() for token in value.split(b",") if token.strip())
    return frozenset(named)


def response_headers(raw_headers: Iterable[tuple[bytes, bytes]]) -> Headers:
    """Return the upstream's response headers minus hop-by-hop ones, names lowercased.

    Repeated headers such as `Set-Cookie` stay separate entries. A `Date`
    header is added when the upstream sent none.
    """
    forwarded: Headers = []
    has_date = False
    connection_values: list[bytes] = []
    for name, value in raw_headers:
        name = name.lower()
        if name in HOP_BY_HOP_HEADERS:
            if name == b"connection":
                connection_values.append(value)
            continue
        has_date = has_date or name == b"date"
        forwarded.append((name, value))
    if connection_values:
        # Rare: the upstream named more hop-by-hop headers in `Connection`.
        named = connection_named_headers([(b"connection", value) for value in connection_values])
        forwarded = [(name, value) for name, value in forwarded if name not in named]
        has_date = any(name == b"date" for name, _ in forwarded)
    if not has_date:
        forwarded.append((b"date", current_http_date()))
    return forwarded


def expects_continue(headers: Sequence[tuple[bytes, bytes]]) -> bool:
    """Return True when the request carries `Expect: 100-continue`."""
    return any(name == b"expect" and value.strip().lower() == b"100-continue" for name, value in headers)


class RequestHeaderPolicy:
    """Rewrite a client's request headers for the upstream.

    Removes every spelling of the trusted user header, of the request id
    header and of the key header (the key is forwarded only when
    `forward_api_key` is set, and then only the one copy that
    authenticated), hop-by-hop headers, `Host` and `Expect`, and the
    forwarding headers of peers that are not trusted proxies. Then sets the
    trusted user header, `X-Forwarded-*` and the gateway's request id.
    """

    def __init__(
        self,
        user_header: str,
        key_header: str,
        forward_api_key: bool,
        trusted_proxies: TrustedProxies,
        request_id_header: str | None = None,
    ) -> None:
        self.user_header = user_header.lower().encode()
        self.request_id_header = request_id_header.lower().encode() if request_id_header else None
        self.key_header = key_header.lower().encode()
        self.forward_api_key = forward_api_key
        self.trusted_proxies = trusted_proxies
        always_dropped = {self.user_header, self.key_header}
        if self.request_id_header is not None:
            # The gateway sends its own request id, and a spelling such as
            # `X_Request_ID` reaches some WSGI upstreams as the same header.
            always_dropped.add(self.request_id_header)
        self._always_dropped_folded = frozenset(fold_header_name(name) for name in always_dropped)
        self._untrusted_folded = frozenset(fold_header_name(name) for name in UNTRUSTED_FORWARDING_HEADERS)
        self._forwarded_folded = frozenset(fold_header_name(name) for name in FORWARDED_HEADERS)
        self._untrusted_dropped_folded = self._always_dropped_folded | self._untrusted_folded
        self._folded_names: dict[bytes, bytes] = {}
        # The gateway answers `Expect: 100-continue` itself when it reads the body.
        self._dropped_exact = HOP_BY_HOP_HEADERS | {b"host", b"expect"}

    def rewrite(
        self,
        headers: Sequence[tuple[bytes, bytes]],
        client_address: str | None,
        scheme: str,
        user_id: str | None,
        api_key: bytes | None,
        request_id: bytes | None = None,
    ) -> Headers:
        """Return the headers to send upstream for one request, with `request_id` when given."""
        is_trusted_peer = client_address in self.trusted_proxies
        connection_named = connection_named_headers(headers)
        dropped_exact = self._dropped_exact | connection_named if connection_named else self._dropped_exact
        dropped_folded = self._always_dropped_folded if is_trusted_peer else self._untrusted_dropped_folded

        forwarded: Headers = []
        incoming: dict[bytes, bytes] = {}
        host = b""
        for name, value in headers:
            name = name.lower()
            if name == b"host":
                host = value
            if name in dropped_exact:
                continue
            folded = self._fold(name)
            if folded in dropped_folded:
                continue
            if folded in self._forwarded_folded:
                # From a trusted proxy: merged into the values set below.
                incoming[name] = incoming[name] + b", " + value if name in incoming else value
                continue
            forwarded.append((name, value))

        forwarded.extend(self._forwarding_headers(incoming, client_address, scheme, host))
        if user_id is not None:
            forwarded.append((self.user_header, user_id.encode()))
        if api_key is not None and self.forward_api_key:
            forwarded.append((self.key_header, api_key))
        if request_id is not None and self.request_id_header is not None:
            forwarded.append((self.request_id_header, request_id))
        return forwarded

    def _fold(self, name: bytes) -> bytes:
        # Clients send the same few names again and again. The memo is bounded
        # because a client can also send long names never seen before.
        folded = self._folded_names.get(name)
        if folded is None:
            folded = fold_header_name(name)
            is_short = len(name) <= MAX_REMEMBERED_HEADER_NAME_LENGTH
            if is_short and len(self._folded_names) < MAX_REMEMBERED_HEADER_NAMES:
                self._folded_names[name] = folded
        return folded

    def _forwarding_headers(
        self, incoming: dict[bytes, bytes], client_address: str | None, scheme: str, host: bytes
    ) -> Headers:
        client = (client_address or "").encode()
        chain = incoming.get(b"x-forwarded-for")
        return [
            (b"x-forwarded-for", chain + b", " + client if chain else client),
            (b"x-forwarded-proto", incoming.get(b"x-forwarded-proto") or scheme.encode()),
            (b"x-forwarded-host", incoming.get(b"x-forwarded-host") or host),
        ]


class KeyHeaderError(ValueError):
    """The request carries the key header more than once or a value that cannot be one key."""


def read_key_header(headers: Sequence[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    """Return the raw value of the key header `name` (lowercase), or None when absent.

    Raises `KeyHeaderError` when the header appears more than once: a proxy in
    between may join copies with commas, and the gateway would not know which
    copy the client meant.
    """
    found: bytes | None = None
    for header_name, value in headers:
        if header_name == name:
            if found is not None:
                raise KeyHeaderError("The key header appears more than once.")
            found = value
    return found
