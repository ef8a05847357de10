"""The endpoint for nginx's `auth_request`: who sent this request, without forwarding it.

nginx sends a subrequest with the client's headers and no body to
`auth.auth_request_path`. The auth_request module of nginx 1.22 accepts
three kinds of status: 2xx allows the request, 401 and 403 deny it, and any
other status becomes a 500 for the client. The endpoint therefore returns
only these:

    outcome                                   status  headers
    key authenticates, or anonymous allowed   204     user header (absent when anonymous)
    key rejected, or missing while required   401     WWW-Authenticate, X-Auth-Error: <reason>
    key lacks every `auth.required_scopes`    403     -
    token store unavailable                   401     X-Auth-Error: unavailable, Retry-After: 1

On a store failure the endpoint returns 401 rather than 503, so nginx denies
the request (fail closed). With deploy/nginx/auth_request.conf the client
then gets this 401 with the gateway's JSON body, where a 503 would have
become a bare 500. Anonymous requests never query the store, so they pass
while it is down when `auth.require_key` is off.

The endpoint never calls `receive`: the request body is not read, whatever
`Content-Length` or `Transfer-Encoding` claim, so an answer never waits for
a slow or absent body.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any, Literal

from gateway.authenticator import Identity
from gateway.errors import StoreUnavailable
from gateway.policy import REFUSED, Refusal
from gateway.responses import STORE_UNAVAILABLE_MESSAGE, challenge_headers, send_error

logger = logging.getLogger(__name__)

Scope = dict[str, Any]
Send = Callable[[dict[str, Any]], Awaitable[None]]
StoreFailureAnswer = Callable[[Scope, Send, StoreUnavailable], Awaitable[None]]
Admit = Callable[[Scope, Send, StoreFailureAnswer], Awaitable[Identity | Literal[Refusal.REFUSED] | None]]
Describe = Callable[[Scope], tuple[str, str, str]]

STORE_UNAVAILABLE_REASON = "unavailable"
RETRY_AFTER_SECONDS = b"1"


class AuthRequestEndpoint:
    """ASGI endpoint for nginx's auth subrequests, which returns 204, 401 or 403.

    `admit` and `describe_request` (client address, method and path for log
    lines) are the gateway's own, so both modes share the authenticator, its
    cache, the access policy, usage tracking and the audit log.
    """

    def __init__(self, admit: Admit, user_header: str, key_header: str, describe_request: Describe) -> None:
        self.admit = admit
        self.user_header = user_header.lower().encode()
        self.describe_request = describe_request
        self.unavailable_headers = [
            *challenge_headers(STORE_UNAVAILABLE_REASON, key_header),
            (b"retry-after", RETRY_AFTER_SECONDS),
        ]

    async def __call__(self, scope: Scope, receive: Any, send: Send) -> None:
        identity = await self.admit(scope, send, self.store_unavailable)
        if identity is REFUSED:
            return
        await self.allow(send, identity)

    async def allow(self, send: Send, identity: Identity | None) -> None:
        # RFC 9110 section 8.6: a 204 carries no Content-Length.
        headers: list[tuple[bytes, bytes]] = []
        if identity is not None:
            headers.append((self.user_header, identity.user_id.encode()))
        await send({"type": "http.response.start", "status": 204, "headers": headers})
        await send({"type": "http.response.body", "body": b""})

    async def store_unavailable(self, scope: Scope, send: Send, error: StoreUnavailable) -> None:
        client, method, path = self.describe_request(scope)
        logger.error(
            "Denied the auth request for %s %s from %s with 401 because the token store is unavailable: %s",
            method,
            path,
            client,
            error,
        )
        await send_error(send, 401, STORE_UNAVAILABLE_MESSAGE, self.unavailable_headers)
