"""The gateway's ASGI application: routing, authentication and forwarding.

The request hot path is plain ASGI: a dictionary lookup for the gateway's own
routes, the key header read, one HMAC, one cache lookup and the forward.
Everything that can be computed once is computed in `GatewayApp.__init__`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Literal

from gateway.access_log import AccessLog, RequestRecord
from gateway.audit import AuditLog, AuditOutcome
from gateway.auth_request import AuthRequestEndpoint
from gateway.authenticator import Authenticator, Identity
from gateway.config import Config, mask_password
from gateway.errors import (
    AuthenticationFailed,
    AuthFailureReason,
    ClientDisconnected,
    StoreUnavailable,
    UpstreamError,
    UpstreamTimeout,
)
from gateway.forwarded import client_address, original_method, original_path
from gateway.header_syntax import has_invalid_header, header_bytes
from gateway.headers import KeyHeaderError, RequestHeaderPolicy, TrustedProxies, expects_continue, read_key_header
from gateway.legacy_keys import LegacyKeyStore
from gateway.limiter import FailedLookupLimiter
from gateway.management import ManagementRoutes
from gateway.metrics import METRICS_CONTENT_TYPE, GatewayMetrics
from gateway.policy import FORBIDDEN_MESSAGE, REFUSED, AccessPolicy, Refusal
from gateway.proxy import UpstreamProxy
from gateway.responses import (
    STORE_UNAVAILABLE_MESSAGE,
    send_error,
    send_json,
    send_websocket_error,
    unauthorized_headers,
)
from gateway.store import TokenStore
from gateway.token_manager import TokenManager
from gateway.usage import UsageRecorder
from gateway.watcher import RevocationWatcher, UserWatcher

logger = logging.getLogger(__name__)

Scope = dict[str, Any]
Receive = Any
Send = Any
Route = Callable[[Scope, Receive, Send], Awaitable[None]]
StoreFailureAnswer = Callable[[Scope, Send, StoreUnavailable], Awaitable[None]]

# The scope key under which each request carries its `RequestRecord`, so
# that callbacks taking only the scope (the auth_request endpoint's) reach it.
REQUEST_RECORD = "gateway.request_record"


class GatewayApp:
    """The ASGI application; `config` is final, `event_listeners` go to the MongoDB client."""

    def __init__(self, config: Config, event_listeners: Sequence[Any] = ()) -> None:
        self.config = config
        self.metrics = GatewayMetrics()

        # Services: the store, authentication and its caches, logs, usage records.
        self.store = TokenStore.connect(config.store.uri, config.store, event_listeners)
        self.legacy_keys = _legacy_key_store(config, self.store)
        self.failed_lookups = FailedLookupLimiter(
            config.auth.failed_lookup_rate, config.auth.failed_lookup_burst, config.auth.failed_lookup_clients
        )
        self.authenticator = Authenticator(
            self.store,
            config.tokens.secret,
            config.cache,
            legacy_keys=self.legacy_keys,
            failed_lookups=self.failed_lookups,
            metrics=self.metrics,
        )
        self.watcher: RevocationWatcher | None = None
        self.user_watcher: UserWatcher | None = None
        if config.store.watch_changes:
            self.watcher = RevocationWatcher(self.store.tokens, self.authenticator, self.metrics)
        if config.store.watch_changes and self.store.users is not None:
            self.user_watcher = UserWatcher(self.store.users, self.authenticator, self.metrics)
        self.access_log = AccessLog(config.logging)
        self.audit = AuditLog(config.logging.audit_log)
        self.usage = UsageRecorder(self.store, config.management.usage_flush_seconds)

        # Forwarding: the upstream and the header rules, computed once.
        self.upstream = (
            UpstreamProxy(config.upstream, self.metrics.upstream_duration.observe) if config.upstream.url else None
        )
        self.metrics_readers = TrustedProxies(config.logging.metrics_allowed_networks)
        self.trusted_proxies = TrustedProxies(config.server.trusted_proxies)
        self.header_policy = RequestHeaderPolicy(
            config.auth.user_header,
            config.auth.header,
            config.upstream.forward_api_key,
            self.trusted_proxies,
            config.logging.request_id_header,
        )
        self.key_header = config.auth.header.lower().encode()
        self.forward_api_key = config.upstream.forward_api_key
        self.max_header_bytes = config.server.max_header_bytes
        self.require_key = config.auth.require_key

        # The gateway's own routes, which are never forwarded.
        self.policy = AccessPolicy(config.auth.required_scopes)
        self.management = ManagementRoutes(TokenManager(self.store, config.tokens), self.authenticator, config)
        self.auth_request = AuthRequestEndpoint(
            self.admit, config.auth.user_header, config.auth.header, self.describe_request
        )
        self.routes: dict[str, Route] = {
            config.logging.health_path: self.health,
            config.logging.ready_path: self.ready,
            config.auth.auth_request_path: self.auth_request,
            config.management.openapi_path: self.management.serve_openapi,
            config.logging.metrics_path: self.serve_metrics,
        }

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self.handle_http(scope, receive, send)
        elif scope["type"] == "websocket":
            await self.reject_websocket(scope, send)
        elif scope["type"] == "lifespan":
            await self.lifespan(receive, send)

    async def handle_http(self, scope: Scope, receive: Receive, send: Send) -> None:
        peer = scope.get("client")
        record = self.access_log.begin(
            scope, client_address(scope["headers"], peer[0] if peer else None, self.trusted_proxies)
        )
        scope[REQUEST_RECORD] = record
        send = self.access_log.wrap_send(send, record)
        try:
            await self.dispatch(scope, receive, send)
        finally:
            self.access_log.finish(record)

    async def dispatch(self, scope: Scope, receive: Receive, send: Send) -> None:
        route = self.routes.get(scope["path"])
        if route is not None:
            await route(scope, receive, send)
            return
        if header_bytes(scope["headers"]) > self.max_header_bytes:
            logger.warning("Rejected %s %s with 431: the headers are too large.", scope["method"], _record(scope).path)
            await send_error(send, 431, "Request headers too large", [(b"connection", b"close")])
            return
        if has_invalid_header(scope["headers"], key_header=self.key_header):
            logger.warning("Rejected %s %s with 400: a header is malformed.", scope["method"], _record(scope).path)
            # The connection closes: what follows on it cannot be trusted to be framed right.
            await send_error(send, 400, "Malformed request header", [(b"connection", b"close")])
            return
        if self.management.owns(scope["path"]):
            await self.manage(scope, receive, send)
            return
        if self.management.owns_disguised(scope["path"]):
            await send_error(send, 400, "Invalid path: management routes take their canonical path")
            return

        self.metrics.in_flight.inc()
        try:
            identity = await self.admit(scope, send)
            if identity is not REFUSED:
                await self.forward(scope, receive, send, identity)
        finally:
            self.metrics.in_flight.dec()

    async def admit(
        self, scope: Scope, send: Send, store_unavailable: StoreFailureAnswer | None = None
    ) -> Identity | Literal[Refusal.REFUSED] | None:
        """Authenticate and authorize the request; return its identity, or None when anonymous.

        A refused request is answered here (401, 403, or `store_unavailable`,
        503 by default, when the store fails) and `REFUSED` is returned.
        """
        try:
            identity = await self.identify(scope)
        except AuthenticationFailed as exc:
            await self.reject(scope, send, exc.reason)
            return REFUSED
        except StoreUnavailable as exc:
            await (store_unavailable or self.store_unavailable)(scope, send, exc)
            return REFUSED

        if identity is not None and not self.policy.allows(identity):
            await self.forbid(scope, send, identity)
            return REFUSED
        return identity

    async def identify(self, scope: Scope) -> Identity | None:
        """Return the identity behind the request's key, or None for an anonymous request.

        Raises `AuthenticationFailed` when a key is present and does not
        authenticate (or is missing while required), and `StoreUnavailable`.
        """
        headers = scope["headers"]
        try:
            raw_key = read_key_header(headers, self.key_header)
        except KeyHeaderError:
            self.metrics.authentications["invalid"].inc()
            raise AuthenticationFailed(AuthFailureReason.INVALID) from None
        if raw_key is None or not raw_key.strip():
            if self.require_key:
                self.metrics.authentications["missing"].inc()
                raise AuthenticationFailed(AuthFailureReason.MISSING)
            return None

        record = _record(scope)
        try:
            identity = await self.authenticator.authenticate(_decode_key(raw_key), record.client)
        except AuthenticationFailed as exc:
            self.metrics.authentications[exc.reason.value].inc()
            raise
        except StoreUnavailable:
            self.metrics.authentications["store_unavailable"].inc()
            # Audited here, so that the auth_request endpoint's store failures are audited too.
            self.write_audit(AuditOutcome.STORE_UNAVAILABLE, scope)
            raise
        self.metrics.authentications["success"].inc()
        record.identity = identity
        self.write_audit(AuditOutcome.SUCCESS, scope, identity)
        self.usage.record(identity.token_id, _user_agent(headers), identity.user_agents)
        return identity

    async def manage(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve a management route; the caller must authenticate even where keys are optional."""
        try:
            identity = await self.identify(scope)
            if identity is None:
                raise AuthenticationFailed(AuthFailureReason.MISSING)
            if not self.policy.allows(identity):
                await self.forbid(scope, send, identity)
                return
            await self.management.handle(scope, receive, send, identity)
        except AuthenticationFailed as exc:
            await self.reject(scope, send, exc.reason)
        except StoreUnavailable as exc:
            await self.store_unavailable(scope, send, exc)

    async def store_unavailable(self, scope: Scope, send: Send, error: StoreUnavailable) -> None:
        record = _record(scope)
        logger.error(
            "Rejected %s %s with 503 because the token store is unavailable: %s (request id %s)",
            scope["method"],
            record.path,
            error,
            record.request_id.decode(),
        )
        self.metrics.requests["store_unavailable"].inc()
        await send_error(send, 503, STORE_UNAVAILABLE_MESSAGE, [(b"retry-after", b"1"), *_closing_headers(scope)])

    async def reject(self, scope: Scope, send: Send, reason: AuthFailureReason) -> None:
        record = _record(scope)
        self.write_audit(AuditOutcome(reason.value), scope)
        headers = [*unauthorized_headers(reason, self.config.auth.header), *_closing_headers(scope)]
        if reason is AuthFailureReason.THROTTLED and record.client is not None:
            retry_after = math.ceil(self.failed_lookups.retry_after(record.client))
            headers.append((b"retry-after", str(max(1, retry_after)).encode()))
        self.metrics.requests["unauthorized"].inc()
        await send_error(send, 401, reason.message, headers)

    async def forbid(self, scope: Scope, send: Send, identity: Identity) -> None:
        self.write_audit(AuditOutcome.FORBIDDEN, scope, identity)
        self.metrics.requests["forbidden"].inc()
        await send_error(send, 403, FORBIDDEN_MESSAGE, _closing_headers(scope))

    def write_audit(self, outcome: AuditOutcome, scope: Scope, identity: Identity | None = None) -> None:
        # Describing the request reads the forwarding headers, so it waits until a line is written.
        if self.audit.is_writing():
            self.audit.write(outcome, _record(scope).request_id, self.describe_request(scope), identity)

    def describe_request(self, scope: Scope) -> tuple[str, str, str]:
        """Return the client address, method and path for log lines, as trusted proxies report them."""
        peer = scope.get("client")
        peer_address = peer[0] if peer else None
        headers = scope["headers"]
        return (
            client_address(headers, peer_address, self.trusted_proxies) or "-",
            original_method(headers, peer_address, self.trusted_proxies, scope["method"]),
            original_path(headers, peer_address, self.trusted_proxies, scope["path"]),
        )

    async def forward(self, scope: Scope, receive: Receive, send: Send, identity: Identity | None) -> None:
        if self.upstream is None:
            self.metrics.requests["no_upstream"].inc()
            await send_error(send, 404, "Not found: no upstream is configured", _closing_headers(scope))
            return
        if not scope["path"].startswith("/"):
            # uvicorn passes the asterisk form (`OPTIONS *`) through, and
            # appended to the upstream's URL it would make an invalid URL.
            logger.info("Rejected %s %r with 400: the request target is not a path.", scope["method"], scope["path"])
            await send_error(
                send, 400, "Invalid request target: expected a path starting with '/'", _closing_headers(scope)
            )
            return

        record = _record(scope)
        client = scope.get("client")
        headers = self.header_policy.rewrite(
            scope["headers"],
            client[0] if client else None,
            scope.get("scheme", "http"),
            identity.user_id if identity else None,
            read_key_header(scope["headers"], self.key_header) if identity and self.forward_api_key else None,
            record.request_id,
        )
        record.start_upstream()
        try:
            is_complete = await self.upstream.forward(scope, receive, send, headers)
        except ClientDisconnected as exc:
            logger.info(
                "Stopped %s %s: %s (request id %s)", scope["method"], record.path, exc, record.request_id.decode()
            )
            self.metrics.requests["client_disconnected"].inc()
        except UpstreamTimeout as exc:
            logger.error(
                "Upstream timed out for %s %s: %s (request id %s)",
                scope["method"],
                record.path,
                exc,
                record.request_id.decode(),
            )
            self.metrics.requests["upstream_timeout"].inc()
            await send_error(send, 504, "The upstream API did not answer in time", _closing_headers(scope))
        except UpstreamError as exc:
            logger.error(
                "Upstream failed for %s %s: %s (request id %s)",
                scope["method"],
                record.path,
                exc,
                record.request_id.decode(),
            )
            self.metrics.requests["upstream_unreachable"].inc()
            await send_error(send, 502, "The upstream API is unreachable", _closing_headers(scope))
        else:
            self.metrics.requests["forwarded" if is_complete else "upstream_interrupted"].inc()

    async def health(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send_json(send, 200, {"status": "ok"})

    async def ready(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await self.store.ping()
        except StoreUnavailable as exc:
            logger.warning("Readiness check failed: %s", exc)
            await send_json(send, 503, {"status": "unavailable", "message": "The token store is unreachable"})
            return
        await send_json(send, 200, {"status": "ok"})

    async def serve_metrics(self, scope: Scope, receive: Receive, send: Send) -> None:
        # The TCP peer decides, never a forwarding header: a proxy in front
        # would otherwise let every client read the metrics.
        client = scope.get("client")
        if (client[0] if client else None) not in self.metrics_readers:
            await send_error(send, 403, "Metrics are only served to the networks in logging.metrics_allowed_networks")
            return
        body = self.metrics.render()
        headers = [(b"content-type", METRICS_CONTENT_TYPE.encode()), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def reject_websocket(self, scope: Scope, send: Send) -> None:
        # WebSocket upgrades are not proxied. The gateway sends 501 where the
        # server lets an application send an HTTP response (the ASGI
        # extension), else it closes the handshake, which servers turn into 403.
        if "websocket.http.response" in (scope.get("extensions") or {}):
            await send_websocket_error(send, 501, "WebSocket upgrades are not supported by the gateway")
            return
        await send({"type": "websocket.close", "code": 1003})

    async def startup(self) -> None:
        try:
            await self.store.ensure_indexes()
            if self.legacy_keys is not None:
                await self.legacy_keys.ensure_index()
        except StoreUnavailable as exc:
            logger.warning(
                "The token store is unreachable at start-up; requests with keys get 503 until it responds: %s", exc
            )
        if self.upstream is not None:
            await self.upstream.start()
        self.usage.start()
        if self.watcher is not None:
            self.watcher.start()
        if self.user_watcher is not None:
            self.user_watcher.start()
        logger.info("The gateway is ready: upstream %s.", mask_password(self.config.upstream.url) or "(none)")

    async def shutdown(self) -> None:
        if self.watcher is not None:
            await self.watcher.stop()
        if self.user_watcher is not None:
            await self.user_watcher.stop()
        await self.authenticator.rehasher.drain(self.config.store.timeout_seconds)
        await self.usage.stop()
        if self.upstream is not None:
            await self.upstream.close()
        await self.store.close()
        logger.info("The gateway stopped.")

    async def lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self.startup()
                except Exception as exc:
                    logger.exception("The gateway failed to start.")
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return


def _legacy_key_store(config: Config, store: TokenStore) -> LegacyKeyStore | None:
    if not config.auth.legacy_fallback or store.users is None:
        return None
    return LegacyKeyStore(store.users, config.auth.legacy_field)


def _closing_headers(scope: Scope) -> list[tuple[bytes, bytes]]:
    # A client that sent `Expect: 100-continue` and gets a final status
    # instead of `100 Continue` may send its body or skip it (RFC 9110
    # section 10.1.1), so the server could not tell where the next request
    # starts. The gateway closes the connection after its own response.
    return [(b"connection", b"close")] if expects_continue(scope["headers"]) else []


def _decode_key(raw_key: bytes) -> str:
    try:
        return raw_key.strip().decode("utf-8")
    except UnicodeDecodeError:
        raise AuthenticationFailed(AuthFailureReason.INVALID) from None


def _record(scope: Scope) -> RequestRecord:
    record: RequestRecord = scope[REQUEST_RECORD]
    return record


def _user_agent(headers: list[tuple[bytes, bytes]]) -> str | None:
    for name, value in headers:
        if name == b"user-agent":
            return value.decode("latin-1")
    return None
