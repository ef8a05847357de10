"""One access-log line per request, tied to a request id.

Each request gets a `RequestRecord`: its request id (the client's
`X-Request-ID` when well formed, else a new one), the client address, the
identity once known, the status and the timings. The id goes to the upstream
and back to the client. When the response ends, `AccessLog.finish` writes
one line on the `gateway.access` logger; in JSON format every field is also
a key of the JSON object.
"""

from __future__ import annotations

import logging
import os
import re
import time
from typing import Any

from gateway.authenticator import Identity
from gateway.config import LoggingConfig

access_logger = logging.getLogger("gateway.access")

Scope = dict[str, Any]
Send = Any

# Request ids seen in the field (UUIDs, AWS trace ids, base64 or hex digests)
# fit this set. Anything else, a comma or a control character for instance,
# would let a client forge log fields, so the gateway replaces it.
_WELL_FORMED_REQUEST_ID = re.compile(rb"[A-Za-z0-9._:;/+=@-]{1,128}")
REQUEST_ID_BYTES = 16


class RequestRecord:
    """The state of one request that the access and audit logs report."""

    __slots__ = (
        "client",
        "identity",
        "method",
        "path",
        "request_id",
        "started_at",
        "status",
        "upstream_seconds",
        "upstream_started_at",
    )

    def __init__(self, request_id: bytes, method: str, path: str, client: str | None) -> None:
        self.request_id = request_id
        self.method = method
        self.path = path
        self.client = client
        self.identity: Identity | None = None
        self.status: int | None = None
        self.started_at = time.perf_counter()
        self.upstream_started_at: float | None = None
        self.upstream_seconds: float | None = None

    def start_upstream(self) -> None:
        self.upstream_started_at = time.perf_counter()


class AccessLog:
    """Request ids and the access-log line, configured by `[logging]`."""

    def __init__(self, config: LoggingConfig) -> None:
        self.header = config.request_id_header.lower().encode()
        self.is_enabled = config.access_log

    def begin(self, scope: Scope, client: str | None) -> RequestRecord:
        """Start the record of a request; keep the client's request id when it is well formed."""
        request_id = None
        for name, value in scope["headers"]:
            if name == self.header:
                request_id = value
        if request_id is None or _WELL_FORMED_REQUEST_ID.fullmatch(request_id) is None:
            request_id = os.urandom(REQUEST_ID_BYTES).hex().encode()
        return RequestRecord(request_id, scope["method"], printable_path(scope), client)

    def wrap_send(self, send: Send, record: RequestRecord) -> Send:
        """Return a `send` that notes the status and timings and returns the request id."""

        async def send_with_request_id(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                record.status = message["status"]
                if record.upstream_started_at is not None:
                    record.upstream_seconds = time.perf_counter() - record.upstream_started_at
                headers = [(name, value) for name, value in message.get("headers", ()) if name != self.header]
                headers.append((self.header, record.request_id))
                message = {**message, "headers": headers}
            await send(message)

        return send_with_request_id

    def finish(self, record: RequestRecord) -> None:
        """Write the access-log line of a finished request (or one whose connection broke)."""
        if not self.is_enabled or not access_logger.isEnabledFor(logging.INFO):
            return

        total_ms = (time.perf_counter() - record.started_at) * 1000
        upstream_ms = None if record.upstream_seconds is None else round(record.upstream_seconds * 1000, 3)
        identity = record.identity
        fields = {
            "request_id": record.request_id.decode("ascii"),
            "client": record.client,
            "method": record.method,
            "path": record.path,
            "status": record.status,
            "user_id": identity.user_id if identity else None,
            "token_id": str(identity.token_id) if identity else None,
            "token_prefix": identity.token_prefix if identity else None,
            "duration_ms": round(total_ms, 3),
            "upstream_ms": upstream_ms,
        }
        access_logger.info(
            "%s %s %s %s user=%s token=%s prefix=%s duration_ms=%.3f upstream_ms=%s request_id=%s",
            fields["client"] or "-",
            fields["method"],
            fields["path"],
            fields["status"] or "-",
            fields["user_id"] or "-",
            fields["token_id"] or "-",
            fields["token_prefix"] or "-",
            total_ms,
            "-" if upstream_ms is None else upstream_ms,
            fields["request_id"],
            extra=fields,
        )


def printable_path(scope: Scope) -> str:
    """Return the request path as sent, with any byte that could forge a log line escaped.

    The query string is left out: it may carry secrets that clients put
    there by mistake, and a key belongs in no log line.
    """
    raw_path: bytes = scope.get("raw_path") or scope["path"].encode("utf-8", "surrogateescape")
    return printable(raw_path.decode("latin-1"))


def printable(text: str) -> str:
    """Return `text` with every character other than printable ASCII written as an escape."""
    if text.isascii() and text.isprintable():
        return text
    return "".join(char if char.isascii() and char.isprintable() else f"\\x{ord(char):02x}" for char in text)
