"""The token-management routes: create, list and revoke the caller's own tokens.

The routes live under `management.prefix` and under `/api/1/me/api_tokens/`,
as in later udata versions. The application authenticates the caller before
calling `ManagementRoutes.handle`, exactly as for a proxied request, and
never forwards these paths upstream. Plain ASGI keeps them free of framework
layers and lets the body be read with a hard size limit.
"""

from __future__ import annotations

import datetime
import json
import logging
import re
from collections.abc import Sequence
from typing import Any

from bson import ObjectId

from gateway.authenticator import Authenticator, Identity
from gateway.config import Config
from gateway.errors import ClientDisconnected, InvalidRequestBody
from gateway.openapi import build_openapi_document
from gateway.responses import JSON_CONTENT_TYPE, send_error, send_json
from gateway.store import parse_user_id
from gateway.token_manager import DEFAULT_SCOPES, RevokeOutcome, TokenManager
from gateway.token_request import CREATE_FIELDS, parse_create_request, read_body
from gateway.token_views import listed_token, token_metadata

logger = logging.getLogger(__name__)

Scope = dict[str, Any]
Receive = Any
Send = Any

ALIAS_PREFIX = "/api/1/me/api_tokens/"
ADMIN_SCOPE = "admin"
NOT_FOUND_MESSAGE = "Token not found"
NO_STORE = (b"cache-control", b"no-store")
COLLECTION_METHODS = b"GET, POST"
TOKEN_METHODS = b"DELETE"


# Empty segments, dot segments and path parameters: spellings some servers rewrite.
_NON_CANONICAL = re.compile(r"//|/\.\.?(?:/|$)|;")


def canonical_path(path: str) -> str:
    """Return `path` with parameters dropped, empty and dot segments resolved (RFC 3986 section 5.2.4)."""
    segments: list[str] = []
    parts = path.split("/")
    for part in parts[1:]:
        part = part.split(";", 1)[0]
        if part in ("", "."):
            continue
        if part == "..":
            if segments:
                segments.pop()
            continue
        segments.append(part)
    trailing = "/" if parts[-1].split(";", 1)[0] in ("", ".", "..") and segments else ""
    return "/" + "/".join(segments) + trailing


class ManagementRoutes:
    """Serve the management routes for an authenticated caller.

    Every response is JSON with `Cache-Control: no-store`. Raises
    `StoreUnavailable`, before anything is sent, when the store fails.
    """

    def __init__(self, manager: TokenManager, authenticator: Authenticator, config: Config) -> None:
        self.manager = manager
        self.authenticator = authenticator
        self.allowed_scopes = tuple(config.management.allowed_scopes)
        self.prefixes = tuple(dict.fromkeys((config.management.prefix, ALIAS_PREFIX)))
        self._bare_prefixes = frozenset(prefix.rstrip("/") for prefix in self.prefixes)
        document = build_openapi_document(
            self.prefixes, config.auth.header, self.allowed_scopes, config.cache.ttl_seconds
        )
        self.openapi_body = json.dumps(document, separators=(",", ":")).encode()

    def owns(self, path: str) -> bool:
        """Tell whether `path` belongs to the management routes (and must never go upstream)."""
        return path in self._bare_prefixes or path.startswith(self.prefixes)

    def owns_disguised(self, path: str) -> bool:
        """Tell whether a non-canonical spelling of `path` reaches the management routes.

        Upstream servers may merge slashes, resolve dot segments or drop
        `;parameters`, so `/api/1/me/./tokens/` can mean the same route there.
        Such paths are rejected instead of forwarded.
        """
        if not _NON_CANONICAL.search(path):
            return False
        return self.owns(canonical_path(path))

    async def handle(self, scope: Scope, receive: Receive, send: Send, identity: Identity) -> None:
        path = scope["path"]
        prefix = next((prefix for prefix in self.prefixes if path.startswith(prefix)), None)
        remainder = path[len(prefix) :] if prefix is not None else ""

        if remainder == "":
            await self._collection(scope, receive, send, identity)
            return
        token_id = remainder.removesuffix("/")
        if "/" in token_id:
            await send_error(send, 404, "Not found", [NO_STORE])
            return
        await self._token(scope, send, identity, token_id)

    async def serve_openapi(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["method"] not in ("GET", "HEAD"):
            await _method_not_allowed(send, b"GET, HEAD")
            return
        headers = [JSON_CONTENT_TYPE, (b"content-length", str(len(self.openapi_body)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": self.openapi_body})

    async def _collection(self, scope: Scope, receive: Receive, send: Send, identity: Identity) -> None:
        method = scope["method"]
        if method == "GET":
            await self._list(send, identity)
        elif method == "POST":
            await self._create(scope, receive, send, identity)
        else:
            await _method_not_allowed(send, COLLECTION_METHODS)

    async def _token(self, scope: Scope, send: Send, identity: Identity, token_id: str) -> None:
        if scope["method"] != "DELETE":
            await _method_not_allowed(send, TOKEN_METHODS)
            return
        # A malformed id gets the same response as an unknown one or another
        # user's, so the response reveals nothing about other users' tokens.
        if not ObjectId.is_valid(token_id) or len(token_id) != 24:
            await send_error(send, 404, NOT_FOUND_MESSAGE, [NO_STORE])
            return
        await self._revoke(send, identity, ObjectId(token_id))

    async def _list(self, send: Send, identity: Identity) -> None:
        documents = await self.manager.list(parse_user_id(identity.user_id))

        now = datetime.datetime.now(datetime.UTC)
        await send_json(send, 200, [listed_token(document, now) for document in documents], [NO_STORE])

    async def _create(self, scope: Scope, receive: Receive, send: Send, identity: Identity) -> None:
        try:
            body = await read_body(receive, _content_length(scope["headers"]))
            request = parse_create_request(body, self.allowed_scopes, datetime.datetime.now(datetime.UTC))
        except InvalidRequestBody as exc:
            logger.info("Rejected token creation for user %s with %d: %s", identity.user_id, exc.status, _problem(exc))
            await _send_invalid_body(send, exc)
            return
        except ClientDisconnected:
            logger.info("The client left before sending its token-creation body; nothing was created.")
            return

        scopes = request.scopes or DEFAULT_SCOPES
        missing = _scopes_beyond(identity.scopes, scopes)
        if missing:
            logger.info(
                "Rejected token creation for user %s: scopes %s exceed the calling token's.", identity.user_id, missing
            )
            message = f"The calling token cannot grant the scopes {', '.join(missing)}: it does not hold them."
            await send_error(send, 403, message, [NO_STORE])
            return

        plaintext, document = await self.manager.create(
            parse_user_id(identity.user_id), request.name, request.expires_at, scopes
        )
        logger.info("Created token %s for user %s through the management routes.", document["_id"], identity.user_id)
        await send_json(send, 201, {**token_metadata(document), "token": plaintext}, [NO_STORE])

    async def _revoke(self, send: Send, identity: Identity, token_id: ObjectId) -> None:
        revocation = await self.manager.revoke(token_id, parse_user_id(identity.user_id))
        if revocation.outcome is RevokeOutcome.NOT_FOUND:
            logger.info("User %s tried to revoke token %s, which is not one of theirs.", identity.user_id, token_id)
            await send_error(send, 404, NOT_FOUND_MESSAGE, [NO_STORE])
            return

        # Evicted in both cases, because another process may have revoked the
        # token while this one still had it in its cache.
        self.authenticator.evict_token(token_id)
        if revocation.outcome is RevokeOutcome.ALREADY_REVOKED:
            await send_error(send, 410, "Token already revoked", [NO_STORE])
            return
        logger.info("Revoked token %s of user %s through the management routes.", token_id, identity.user_id)
        await send({"type": "http.response.start", "status": 204, "headers": [NO_STORE]})
        await send({"type": "http.response.body", "body": b""})


def _scopes_beyond(held: Sequence[str], requested: Sequence[str]) -> list[str]:
    # An admin token has the full access of its owner, so it may grant any
    # allowed scope. Any other token may grant only its own scopes.
    if ADMIN_SCOPE in held:
        return []
    return [scope for scope in requested if scope not in held]


def _problem(error: InvalidRequestBody) -> str:
    # Error messages quote values and field names from the body, where a
    # client may have pasted a key, so the log line names only known fields.
    if not error.errors:
        return "the body is too large, not JSON or not a JSON object"
    invalid = [field for field in CREATE_FIELDS if field in error.errors]
    unknown = len(error.errors) - len(invalid)
    return f"invalid fields {', '.join(invalid) or 'none'}, {unknown} unknown field(s)"


def _content_length(headers: list[tuple[bytes, bytes]]) -> int | None:
    for name, value in headers:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                # uvicorn rejects such requests before calling the application.
                # Were one to pass, read_body still enforces the limit.
                return None
    return None


async def _send_invalid_body(send: Send, error: InvalidRequestBody) -> None:
    payload: dict[str, Any] = {"message": str(error)}
    if error.errors:
        payload["errors"] = error.errors
    headers = [NO_STORE]
    if error.status == 413:
        # The rest of the body is never read, so the connection cannot carry
        # another request: closing it spares the server from waiting on it.
        headers.append((b"connection", b"close"))
    await send_json(send, error.status, payload, headers)


async def _method_not_allowed(send: Send, allowed: bytes) -> None:
    await send_error(send, 405, "Method not allowed", [(b"allow", allowed), NO_STORE])
